//! Memory-mapped safetensors weights: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json` (or matching `model-*.safetensors`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where a tensor's data is.
#[derive(Debug, Clone)]
enum Source {
    /// tensor `name` of shard `shard`, or its slice `slice` along the first axis (a stacked
    /// tensor seen as one tensor per slice)
    File { shard: usize, name: String, slice: Option<usize> },
    /// equal-shaped tensors stacked along a new first axis (per-expert weights seen as one
    /// stacked tensor)
    Stack(Vec<Source>),
    /// a tensor changed by `op` (read whole, then changed)
    Derived { of: Box<Source>, op: Derive },
    /// a tensor computed by a `sanitize` (held on the CPU)
    Memory(Tensor),
    /// an FP8 (e4m3) weight times its scales, in bf16: per 128 × 128 block (`blocks`:
    /// DeepSeek's `weight_scale_inv`) or broadcast (a scalar, one per expert)
    Fp8 { weight: Box<Source>, scale: Box<Source>, blocks: bool },
}

/// How a [`Source::Derived`] tensor comes from its source.
#[derive(Debug, Clone, Copy)]
enum Derive {
    /// positions `start .. start + len` along `axis` (a fused tensor seen as its parts)
    Narrow { axis: usize, start: usize, len: usize },
    /// axes `a` and `b` swapped
    Transpose { a: usize, b: usize },
    /// positions `start, start + step, …` along `axis` (interleaved rows seen apart)
    Every { axis: usize, start: usize, step: usize },
    /// u8 bytes (…, g, 4·w) read as little-endian u32 words (…, g·w): mlx's `view(uint32)` and
    /// `flatten(-2)` of packed blocks
    BytesAsWords,
    /// 1 added to every value, in the stored dtype (a zero-centred norm weight)
    AddOne,
    /// the first axis (n, …) seen as (parts, n / parts, …)
    SplitFirst { parts: usize },
    /// every value times this factor, in the stored dtype
    Times(f32),
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// the header, parsed once
    meta: safetensors::tensor::Metadata,
    /// byte offset of the data section
    data_start: usize,
}

/// All tensors of a model folder, by (sanitized) name, read lazily from the mapped files.
pub struct Weights {
    shards: Vec<Shard>,
    /// sanitized name → where its data is
    index: BTreeMap<String, Source>,
    /// names a `sanitize` consumed into others ([`Weights::remove`])
    consumed: std::collections::BTreeSet<String>,
    pub dir: PathBuf,
}

impl Weights {
    /// Maps every safetensors file of `dir`, validating headers and sizes.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut w =
            Self { shards: vec![], index: BTreeMap::new(), consumed: Default::default(), dir: dir.to_path_buf() };
        for path in &files {
            w.add_file(path)?;
        }
        Ok(w)
    }

    /// The tensors of one safetensors file (an adapter file).
    pub fn open_file(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut w = Self { shards: vec![], index: BTreeMap::new(), consumed: Default::default(), dir };
        w.add_file(path)?;
        Ok(w)
    }

    /// Maps `path` and indexes its tensors; a name already present is replaced by this file's
    /// tensor (full fine-tuning adapters laid over a model's weights).
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let i = self.shards.len();
        let file = std::fs::File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
        // SAFETY: the file is only read; a concurrent writer is the user's error, as with mlx.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map weights file {}", path.display()))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| {
            anyhow::anyhow!(
                "weights file {} is not a valid safetensors file ({e}); it may be truncated or corrupt — re-download or re-convert it",
                path.display()
            )
        })?;
        for name in st.names() {
            self.index.insert(name.to_string(), Source::File { shard: i, name: name.to_string(), slice: None });
        }
        drop(st);
        let (header_len, meta) = SafeTensors::read_metadata(&mmap)?;
        self.shards.push(Shard { path: path.to_path_buf(), mmap, meta, data_start: 8 + header_len });
        Ok(())
    }

    /// Renames or drops tensors (an architecture's `sanitize`): `f` returns the new name or `None`.
    pub fn sanitize(&mut self, f: impl Fn(&str) -> Option<String>) {
        let old = std::mem::take(&mut self.index);
        for (k, v) in old {
            if let Some(n) = f(&k) {
                self.index.insert(n, v);
            }
        }
    }

    /// Exposes each slice `e` along the first axis of the stacked tensor `name` as its own
    /// tensor `slice_name(e)` (stacked expert weights seen as one tensor per expert); returns the
    /// number of slices.
    pub fn split_first_axis(&mut self, name: &str, slice_name: impl Fn(usize) -> String) -> Result<usize> {
        let n = *self.shape(name)?.first().with_context(|| format!("tensor `{name}` has no dimensions to split"))?;
        let Some(Source::File { shard, name: orig, slice: None }) = self.index.get(name).cloned() else {
            bail!("tensor `{name}` is not a whole tensor of a file: it cannot be split");
        };
        for e in 0..n {
            self.index.insert(slice_name(e), Source::File { shard, name: orig.clone(), slice: Some(e) });
        }
        Ok(n)
    }

    /// Stacks the tensors `parts` (equal shapes and dtypes, each then gone under its own name)
    /// along a new first axis as the tensor `name` (mlx_lm's `mx.stack` of per-expert weights
    /// in a `sanitize`). Nothing is read until the tensor is.
    pub fn stack(&mut self, name: &str, parts: &[String]) -> Result<()> {
        let Some(first) = parts.first() else { bail!("stacking `{name}`: no tensors to stack") };
        let (shape, dtype) = (self.shape(first)?, self.dtype(first)?);
        for p in parts {
            // float parts of different dtypes are promoted, as mx.stack does (one FP8 expert
            // dequantized to bf16 among float16 ones)
            let same = self.dtype(p)? == dtype || (self.dtype(p)?.is_float() && dtype.is_float());
            if self.shape(p)? != shape || !same {
                bail!(
                    "stacking `{name}` in {}: `{p}` has shape {:?} ({:?}), but `{first}` has {shape:?} ({dtype:?})",
                    self.dir.display(),
                    self.shape(p)?,
                    self.dtype(p)?
                );
            }
        }
        let sources = parts.iter().map(|p| self.index.remove(p).expect("checked above")).collect();
        self.index.insert(name.to_string(), Source::Stack(sources));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// Splits the tensor `name` along `axis` into `names.len()` equal parts named `names`, in
    /// order (mlx_lm's `mx.split` of a fused tensor in a `sanitize`).
    pub fn split_axis(&mut self, name: &str, axis: usize, names: &[String]) -> Result<()> {
        self.split_parts(name, axis, names, "equal", |i, n, size| Derive::Narrow {
            axis,
            start: i * size / n,
            len: size / n,
        })
    }

    /// Splits the tensor `name` into `names.len()` interleaved parts along `axis`: part `i`
    /// holds positions `i, i + n, i + 2n, …` (mlx's `v[..., i::n, :]` in a `sanitize`).
    pub fn deinterleave(&mut self, name: &str, axis: usize, names: &[String]) -> Result<()> {
        self.split_parts(name, axis, names, "interleaved", |i, n, _| Derive::Every { axis, start: i, step: n })
    }

    /// `name` replaced by the parts `names`, part `i` of `n` derived by `op(i, n, axis size)`,
    /// once the axis is known to divide into `n` (`kind` names the split in the error).
    fn split_parts(
        &mut self,
        name: &str,
        axis: usize,
        names: &[String],
        kind: &str,
        op: impl Fn(usize, usize, usize) -> Derive,
    ) -> Result<()> {
        let shape = self.shape(name)?;
        let n = names.len();
        let Some(&size) = shape.get(axis).filter(|&&s| n > 0 && s % n == 0) else {
            bail!(
                "tensor `{name}` in {}: axis {axis} of shape {shape:?} cannot be split into {n} {kind} parts",
                self.dir.display()
            );
        };
        let src = self.index.remove(name).expect("shape read above");
        for (i, part) in names.iter().enumerate() {
            self.index.insert(part.clone(), Source::Derived { of: Box::new(src.clone()), op: op(i, n, size) });
        }
        Ok(())
    }

    /// Splits the tensor `name` along `axis` into consecutive parts of the given lengths, named as
    /// given (mlx's `mx.split` at indices in a `sanitize`); the lengths must cover the axis.
    pub fn split_sizes(&mut self, name: &str, axis: usize, parts: &[(String, usize)]) -> Result<()> {
        let shape = self.shape(name)?;
        let total: usize = parts.iter().map(|p| p.1).sum();
        if shape.get(axis) != Some(&total) {
            bail!(
                "tensor `{name}` in {}: axis {axis} of shape {shape:?} does not split into parts of {:?}",
                self.dir.display(),
                parts.iter().map(|p| p.1).collect::<Vec<_>>()
            );
        }
        let src = self.index.remove(name).expect("shape read above");
        let mut start = 0;
        for (part, len) in parts {
            let op = Derive::Narrow { axis, start, len: *len };
            self.index.insert(part.clone(), Source::Derived { of: Box::new(src.clone()), op });
            start += len;
        }
        Ok(())
    }

    /// Sees the first axis (n, …) of the tensor `name` as (parts, n / parts, …) (a reshape in a
    /// `sanitize`).
    pub fn split_first(&mut self, name: &str, parts: usize) -> Result<()> {
        let shape = self.shape(name)?;
        if shape.is_empty() || parts == 0 || shape[0] % parts != 0 {
            bail!("tensor `{name}` in {}: shape {shape:?} has no first axis of {parts} parts", self.dir.display());
        }
        let src = self.index.remove(name).expect("shape read above");
        self.index.insert(name.to_string(), Source::Derived { of: Box::new(src), op: Derive::SplitFirst { parts } });
        Ok(())
    }

    /// Reads the u8 tensor `name` (…, g, 4·w) as u32 words (…, g·w), little-endian (mlx's
    /// `view(uint32).flatten(-2)` of packed blocks).
    pub fn bytes_as_words(&mut self, name: &str) -> Result<()> {
        let shape = self.shape(name)?;
        if self.dtype(name)? != DType::U8 || shape.len() < 2 || shape[shape.len() - 1] % 4 != 0 {
            bail!("tensor `{name}` in {} is not u8 blocks of whole u32 words (shape {shape:?})", self.dir.display());
        }
        let src = self.index.remove(name).expect("shape read above");
        self.index.insert(name.to_string(), Source::Derived { of: Box::new(src), op: Derive::BytesAsWords });
        Ok(())
    }

    /// The FP8 (e4m3, stored as bytes) tensor `name` dequantized with the scales `scale` (gone
    /// under their own name): broadcast when `scale` broadcasts to the weight (a scalar, one per
    /// expert or row), else per 128 × 128 block when it is (⌈rows/128⌉, ⌈cols/128⌉) and the weight
    /// a matrix (where both fit, they agree); the result in bf16, as mlx_lm's sanitize
    /// dequantizes DeepSeek's and Mistral's FP8 checkpoints.
    pub fn dequantize_fp8(&mut self, name: &str, scale: &str) -> Result<()> {
        let (shape, sshape) = (self.shape(name)?, self.shape(scale)?);
        if self.dtype(name)? != DType::U8 {
            bail!("tensor `{name}` in {} has FP8 scales `{scale}` but is not FP8", self.dir.display());
        }
        let blocks = shape.len() == 2 && sshape == [shape[0].div_ceil(FP8_BLOCK), shape[1].div_ceil(FP8_BLOCK)];
        let broadcasts =
            sshape.len() <= shape.len() && sshape.iter().rev().zip(shape.iter().rev()).all(|(&s, &w)| s == 1 || s == w);
        if !blocks && !broadcasts {
            bail!(
                "tensor `{scale}` in {}: FP8 scales of shape {sshape:?} fit neither 128×128 blocks nor the shape {shape:?} of `{name}`",
                self.dir.display()
            );
        }
        let weight = Box::new(self.index.remove(name).expect("shape read above"));
        let scale = Box::new(self.index.remove(scale).expect("shape read above"));
        self.index.insert(name.to_string(), Source::Fp8 { weight, scale, blocks: !broadcasts });
        Ok(())
    }

    /// Swaps axes `a` and `b` of the tensor `name` (mlx's `swapaxes` in a `sanitize`).
    pub fn transpose(&mut self, name: &str, a: usize, b: usize) -> Result<()> {
        let rank = self.shape(name)?.len();
        if a.max(b) >= rank {
            bail!("tensor `{name}` in {} has {rank} axes: cannot swap axes {a} and {b}", self.dir.display());
        }
        let src = self.index.remove(name).expect("shape read above");
        self.index.insert(name.to_string(), Source::Derived { of: Box::new(src), op: Derive::Transpose { a, b } });
        Ok(())
    }

    /// Adds 1 to every value of the float tensor `name`, in its stored dtype (mlx's `v + 1.0` of a
    /// zero-centred norm weight in a `sanitize`).
    pub fn add_one(&mut self, name: &str) -> Result<()> {
        let src = self
            .index
            .remove(name)
            .with_context(|| format!("tensor `{name}` is missing from the weights in {}", self.dir.display()))?;
        self.index.insert(name.to_string(), Source::Derived { of: Box::new(src), op: Derive::AddOne });
        Ok(())
    }

    /// Adds the tensor `to`: the tensor `from` times `factor`, in its stored dtype (mlx's
    /// `-8 * scales` of compressed-tensors' int4 weights in a `sanitize`).
    pub fn add_scaled(&mut self, from: &str, to: &str, factor: f32) -> Result<()> {
        let src = self.source(from)?.clone();
        self.index.insert(to.to_string(), Source::Derived { of: Box::new(src), op: Derive::Times(factor) });
        Ok(())
    }

    /// Adds (or replaces) the tensor `name` with `t`, computed by a `sanitize` (mlx_lm's
    /// `weights[name] = …` of a new array).
    pub fn insert(&mut self, name: &str, t: Tensor) -> Result<()> {
        self.index.insert(name.to_string(), Source::Memory(t.to_device(&Device::Cpu)?.contiguous()?));
        Ok(())
    }

    /// Removes the tensor `name`, consumed into others by a `sanitize` ([`Weights::was_consumed`]).
    pub fn remove(&mut self, name: &str) {
        if self.index.remove(name).is_some() {
            self.consumed.insert(name.to_string());
        }
    }

    /// Whether a `sanitize` consumed the tensor `name` into others (a quantization block may
    /// still name its layer, as mlx_lm's loader allows).
    pub fn was_consumed(&self, name: &str) -> bool {
        self.consumed.contains(name)
    }

    /// Renames the tensor `from` to `to`.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        let src = self
            .index
            .remove(from)
            .with_context(|| format!("tensor `{from}` is missing from the weights in {}", self.dir.display()))?;
        self.index.insert(to.to_string(), src);
        Ok(())
    }

    fn source(&self, name: &str) -> Result<&Source> {
        self.index
            .get(name)
            .with_context(|| format!("tensor `{name}` is missing from the weights in {}", self.dir.display()))
    }

    /// The file a tensor is read from (its first part's, for a stacked one).
    fn location(&self, src: &Source) -> &Path {
        match src {
            Source::File { shard, .. } => &self.shards[*shard].path,
            Source::Stack(parts) => self.location(&parts[0]),
            Source::Derived { of, .. } | Source::Fp8 { weight: of, .. } => self.location(of),
            Source::Memory(_) => &self.dir,
        }
    }

    fn view(&self, src: &Source) -> Result<(safetensors::tensor::TensorView<'_>, &Path)> {
        let Source::File { shard: i, name: orig, slice } = src else {
            bail!("a stacked tensor has no single view");
        };
        let shard = &self.shards[*i];
        let info = shard.meta.info(orig).with_context(|| format!("tensor `{orig}` in {}", shard.path.display()))?;
        let (a, b) = info.data_offsets;
        let mut data = &shard.mmap[shard.data_start + a..shard.data_start + b];
        let mut shape = info.shape.clone();
        if let Some(e) = *slice {
            let each = data.len() / shape[0];
            data = &data[e * each..(e + 1) * each];
            shape.remove(0);
        }
        let view = safetensors::tensor::TensorView::new(info.dtype, shape, data)
            .map_err(|e| anyhow::anyhow!("tensor `{orig}` in {}: {e}", shard.path.display()))?;
        Ok((view, &shard.path))
    }

    /// Stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.source_shape(self.source(name)?)
    }

    fn source_shape(&self, src: &Source) -> Result<Vec<usize>> {
        Ok(match src {
            Source::Stack(parts) => {
                let mut shape = vec![parts.len()];
                shape.extend(self.source_shape(&parts[0])?);
                shape
            }
            Source::Derived { of, op } => {
                let mut shape = self.source_shape(of)?;
                match *op {
                    Derive::Narrow { axis, len, .. } => shape[axis] = len,
                    Derive::Transpose { a, b } => shape.swap(a, b),
                    Derive::Every { axis, start, step } => shape[axis] = (shape[axis] - start).div_ceil(step),
                    Derive::AddOne | Derive::Times(_) => {}
                    Derive::SplitFirst { parts } => {
                        shape[0] /= parts;
                        shape.insert(0, parts);
                    }
                    Derive::BytesAsWords => {
                        let words = shape.pop().expect("checked") / 4;
                        *shape.last_mut().expect("checked") *= words;
                    }
                }
                shape
            }
            Source::Fp8 { weight, .. } => self.source_shape(weight)?,
            Source::Memory(t) => t.dims().to_vec(),
            file => self.view(file)?.0.shape().to_vec(),
        })
    }

    /// Stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        self.source_dtype(self.source(name)?).with_context(|| format!("tensor `{name}`"))
    }

    fn source_dtype(&self, src: &Source) -> Result<DType> {
        match src {
            Source::Stack(parts) => {
                let first = self.source_dtype(&parts[0])?;
                let mixed =
                    parts.iter().map(|p| self.source_dtype(p)).collect::<Result<Vec<_>>>()?.iter().any(|&d| d != first);
                Ok(if mixed { DType::F32 } else { first })
            }
            Source::Derived { op: Derive::BytesAsWords, .. } => Ok(DType::U32),
            Source::Fp8 { .. } => Ok(DType::BF16),
            Source::Memory(t) => Ok(t.dtype()),
            Source::Derived { of, .. } => self.source_dtype(of),
            file => {
                let (v, p) = self.view(file)?;
                st_dtype(v.dtype()).with_context(|| format!("in {}", p.display()))
            }
        }
    }

    /// A tensor as stored (dtype unchanged), on `device`.
    pub fn raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        let src = self.source(name)?;
        let dtype = self.dtype(name)?;
        let shape = self.source_shape(src)?;
        let ctx = || format!("tensor `{name}` in {}", self.location(src).display());
        self.read(src, dtype, &shape, device).with_context(ctx)
    }

    fn read(&self, src: &Source, dtype: DType, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(match src {
            // straight from the mapped file into the device's memory (for Metal: one copy into
            // unified memory, no host staging copy)
            Source::File { .. } => Tensor::from_raw_buffer(self.view(src)?.0.data(), dtype, shape, device)?,
            // the parts' bytes one after another: the stacked tensor's layout
            Source::Stack(parts)
                if parts.iter().all(|p| matches!(p, Source::File { .. } | Source::Stack(_)))
                    && parts.iter().all(|p| self.source_dtype(p).is_ok_and(|d| d == dtype)) =>
            {
                let mut bytes = Vec::new();
                self.append_bytes(parts, &mut bytes)?;
                Tensor::from_raw_buffer(&bytes, dtype, shape, device)?
            }
            Source::Stack(parts) => {
                let parts = parts
                    .iter()
                    .map(|p| {
                        Ok(self
                            .read(p, self.source_dtype(p)?, &self.source_shape(p)?, &Device::Cpu)?
                            .to_dtype(dtype)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&parts, 0)?.to_device(device)?
            }
            Source::Derived { of, op } => {
                let whole = self.read(of, self.source_dtype(of)?, &self.source_shape(of)?, &Device::Cpu)?;
                let t = match *op {
                    Derive::Narrow { axis, start, len } => whole.narrow(axis, start, len)?,
                    Derive::Transpose { a, b } => whole.transpose(a, b)?,
                    Derive::AddOne => (whole + 1.0)?,
                    Derive::Times(f) => (whole * f as f64)?,
                    Derive::SplitFirst { .. } => whole.reshape(shape)?,
                    Derive::Every { axis, start, step } => {
                        let idx: Vec<u32> = (start..whole.dim(axis)?).step_by(step).map(|i| i as u32).collect();
                        whole.index_select(&Tensor::new(idx, &Device::Cpu)?, axis)?
                    }
                    Derive::BytesAsWords => {
                        let bytes: Vec<u8> = whole.flatten_all()?.to_vec1()?;
                        let words: Vec<u32> =
                            bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                        Tensor::from_vec(words, shape, &Device::Cpu)?
                    }
                };
                t.contiguous()?.to_device(device)?
            }
            Source::Memory(t) => t.to_device(device)?,
            Source::Fp8 { weight, scale, blocks } => {
                let w = self.read(weight, DType::U8, shape, &Device::Cpu)?;
                let s = self.read(scale, self.source_dtype(scale)?, &self.source_shape(scale)?, &Device::Cpu)?;
                fp8_dequantize(&w, &s.to_dtype(DType::F32)?, *blocks)?.to_device(device)?
            }
        })
    }

    fn append_bytes(&self, parts: &[Source], out: &mut Vec<u8>) -> Result<()> {
        for p in parts {
            match p {
                Source::Stack(inner) => self.append_bytes(inner, out)?,
                Source::Derived { .. } | Source::Fp8 { .. } | Source::Memory(_) => {
                    bail!("a stack of derived tensors is read part by part")
                }
                file => out.extend_from_slice(self.view(file)?.0.data()),
            }
        }
        Ok(())
    }

    /// A float tensor with a checked shape, cast to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let stored = self.shape(name)?;
        if stored != shape {
            bail!(
                "tensor `{name}` in {} has shape {stored:?}, expected {shape:?} from config.json",
                self.location(self.source(name)?).display()
            );
        }
        let t = self.raw(name, device)?;
        Ok(t.to_dtype(dtype)?)
    }

    /// The float dtype most weights are stored in (the model's native dtype).
    pub fn dominant_float_dtype(&self) -> DType {
        let mut counts: HashMap<DType, usize> = HashMap::new();
        for name in self.index.keys() {
            if let Ok(d) = self.dtype(name) {
                if d.is_float() {
                    *counts.entry(d).or_default() += 1;
                }
            }
        }
        counts.into_iter().max_by_key(|(_, c)| *c).map(|(d, _)| d).unwrap_or(DType::F32)
    }
}

/// The side of the square blocks DeepSeek's FP8 checkpoints scale.
const FP8_BLOCK: usize = 128;

/// `w` (FP8 e4m3 bytes) times `s` (f32: per 128 × 128 block of a matrix with `blocks`, else
/// broadcast), in bf16: `bf16(f32(e4m3) · s)`, mlx's arithmetic.
fn fp8_dequantize(w: &Tensor, s: &Tensor, blocks: bool) -> Result<Tensor> {
    let bytes: Vec<u8> = w.flatten_all()?.to_vec1()?;
    let table: Vec<f32> = (0..=255u8).map(e4m3).collect();
    let vals: Vec<f32> = bytes.iter().map(|&b| table[b as usize]).collect();
    let w = Tensor::from_vec(vals, w.shape(), &Device::Cpu)?;
    let dims = w.dims().to_vec();
    let out = if blocks {
        // each scale over its block: repeat rows and columns 128 times, cut to the weight
        let (r, c) = s.dims2()?;
        let s = s.reshape((r, 1, c, 1))?.broadcast_as((r, FP8_BLOCK, c, FP8_BLOCK))?;
        let s = s.reshape((r * FP8_BLOCK, c * FP8_BLOCK))?.narrow(0, 0, dims[0])?.narrow(1, 0, dims[1])?;
        (w * s.contiguous()?)?
    } else {
        w.broadcast_mul(s)?
    };
    Ok(out.to_dtype(DType::BF16)?)
}

/// The value of an FP8 e4m3 ("fn": no infinities) byte: sign, 4 exponent bits (bias 7), 3
/// mantissa bits; all exponent and mantissa bits set is NaN.
fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0xf, b & 0x7);
    let v = match (e, m) {
        (0xf, 0x7) => f32::NAN,
        (0, _) => m as f32 / 8.0 * 2f32.powi(-6),
        _ => (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7),
    };
    sign * v
}

fn st_dtype(d: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as S;
    Ok(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        // FP8 weights are read as their bytes (mlx loads them as uint8), dequantized by a sanitize
        S::F8_E4M3 => DType::U8,
        // int32 tensors are read as their bits: compressed-tensors' packed int4 words, which a
        // sanitize takes as mlx's u32 words (`view(uint32)`)
        S::I32 => DType::U32,
        S::I64 => DType::I64,
        S::F64 => DType::F64,
        other => bail!("unsupported tensor dtype {other:?}"),
    })
}

/// The safetensors files of a model folder.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("model folder {} does not exist", dir.display());
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{}: missing object field `weight_map`", index.display());
        };
        let mut files: Vec<String> = map.values().filter_map(|x| x.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let mut out = vec![];
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                bail!("{} lists shard {f}, which is missing from {}", index.display(), dir.display());
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("model") || n.starts_with("weights")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no model*.safetensors files in {}", dir.display());
    }
    Ok(files)
}
