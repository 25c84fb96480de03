//! GGUF import: a llama.cpp GGUF file becomes an mlx-style model folder (config.json,
//! model.safetensors in f16/bf16/f32, tokenizer.json built from the GGUF's vocabulary,
//! tokenizer_config.json with the chat template, generation_config.json).
//!
//! The file reader and the import driver live here; what differs between architectures is a
//! table ([`arch`]), and the vocabulary is [`tokenizer`]'s.

pub mod arch;
pub mod tokenizer;

use crate::io::output::AtomicFolder;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The GGML tensor types candle dequantizes.
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

fn meta_err(path: &Path, key: &str, what: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: metadata key `{key}` {what}", path.display())
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let content = match Content::read(&mut f) {
            Ok(c) => c,
            Err(e) => {
                // candle refuses the whole file for one tensor type it does not know: name it
                if let Ok(infos) = scan::tensor_types(path) {
                    if let Some((name, t)) = infos.iter().find(|(_, t)| !scan::candle_reads(*t)) {
                        bail!(
                            "{}: tensor {name} has GGML type {}, which cannot be dequantized (supported: {SUPPORTED_TYPES})",
                            path.display(),
                            scan::type_name(*t)
                        );
                    }
                }
                bail!("{} is not a readable GGUF file: {e}", path.display())
            }
        };
        Ok(Self { path: path.to_path_buf(), content })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn get(&self, key: &str) -> Result<&GValue> {
        self.content.metadata.get(key).ok_or_else(|| meta_err(&self.path, key, "is missing"))
    }

    pub fn opt(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_i64().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|_| meta_err(&self.path, key, "is not an integer"))
    }

    /// A float metadata value; an f32 as the shortest decimal that reads back to it (1e-5, not
    /// 9.99e-6).
    pub fn float(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        if let Ok(f) = v.to_f64() {
            return Ok(f);
        }
        let f = v.to_f32().map_err(|_| meta_err(&self.path, key, "is not a float"))?;
        Ok(format!("{f}").parse::<f64>()?)
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        self.get(key)?.to_bool().map_err(|_| meta_err(&self.path, key, "is not a bool"))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        Ok(self.get(key)?.to_string().map_err(|_| meta_err(&self.path, key, "is not a string"))?.clone())
    }

    fn array(&self, key: &str) -> Result<&Vec<GValue>> {
        self.get(key)?.to_vec().map_err(|_| meta_err(&self.path, key, "is not an array"))
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| meta_err(&self.path, key, "must hold strings")))
            .collect()
    }

    pub fn floats(&self, key: &str) -> Result<Vec<f32>> {
        self.array(key)?
            .iter()
            .map(|v| v.to_f32().map_err(|_| meta_err(&self.path, key, "must hold f32 numbers")))
            .collect()
    }

    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.to_i64()
                    .or_else(|_| v.to_i32().map(|x| x as i64))
                    .or_else(|_| v.to_u32().map(|x| x as i64))
                    .map_err(|_| meta_err(&self.path, key, "must hold integers"))
            })
            .collect()
    }
}

/// Undoes llama.cpp's row permutation of Q/K projections (its converter interleaves the two
/// rotary halves of each head): rows (heads, 2, half) ← (heads, half, 2).
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let shape = w.dims().to_vec();
    let rows = shape[0];
    if n_heads == 0 || !rows.is_multiple_of(2 * n_heads) {
        bail!("cannot undo the Q/K permutation: {rows} rows are not 2 × {n_heads} heads × a half");
    }
    let mut split = vec![n_heads, rows / n_heads / 2, 2];
    split.extend_from_slice(&shape[1..]);
    Ok(w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(shape)?)
}

/// The model and tokenizer files of a GGUF, built in memory (what [`import`] writes).
pub struct Imported {
    pub config: Value,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Value,
    pub tokenizer_config: Value,
    pub generation_config: Value,
}

/// tokenizer.json and tokenizer_config.json of a GGUF file's vocabulary (a vocabulary-only
/// GGUF is enough).
pub fn tokenizer_files(gguf: &Path) -> Result<(Value, Value)> {
    let g = GgufFile::open(gguf)?;
    let (tj, tc, _) = tokenizer::build(&g)?;
    Ok((tj, tc))
}

/// Reads and converts everything; `dtype` is the float type of the weights (by default the
/// architecture's: bfloat16 for the gemma family, float16 for the others).
pub fn read(gguf: &Path, dtype: Option<DType>) -> Result<Imported> {
    let g = GgufFile::open(gguf)?;
    let arch_name = g.string("general.architecture")?;
    let infos = &g.content.tensor_infos;
    let experts = infos.keys().any(|n| n.contains("_exps."));
    let Some(arch) = arch::find(&arch_name, experts) else {
        bail!(
            "{}: GGUF architecture `{arch_name}` cannot be imported (supported: {})",
            gguf.display(),
            arch::supported()
        );
    };
    let dtype = dtype.unwrap_or(arch.dtype);
    let shapes: BTreeMap<String, Vec<usize>> =
        infos.iter().map(|(n, i)| (n.clone(), i.shape.dims().to_vec())).collect();
    // every tensor must have a place before anything is read
    for name in shapes.keys() {
        if arch.hf_name(name).is_none() {
            bail!(
                "{}: tensor {name} has no counterpart in mlx_lm's {} model (architecture `{arch_name}`)",
                gguf.display(),
                arch.model_type
            );
        }
    }
    let mut file = std::fs::File::open(gguf)?;
    let mut load = |name: &str| -> Result<Tensor> {
        let q = g
            .content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", gguf.display()))?;
        q.dequantize(&Device::Cpu).map_err(|e| {
            anyhow::anyhow!(
                "{}: tensor {name} of GGML type {:?} cannot be dequantized: {e} (supported: {SUPPORTED_TYPES})",
                gguf.display(),
                q.dtype()
            )
        })
    };

    // RoPE factors are configuration
    let mut factors = BTreeMap::new();
    for name in shapes.keys().filter(|n| matches!(arch.hf_name(n), Some(None))) {
        factors.insert(name.clone(), load(name)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let layers = g.usize(&format!("{arch_name}.block_count"))?;
    let meta = arch::Meta { g: &g, arch: &arch_name, shapes: &shapes, factors: &factors, layers };
    let mut cfg = arch.config(&meta, crate::backend::device::dtype_name(dtype))?;
    let heads = cfg["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let kv_heads = cfg["num_key_value_heads"].as_u64().unwrap_or(0) as usize;

    // Tensors.
    let names: Vec<&String> = shapes.keys().filter(|n| matches!(arch.hf_name(n), Some(Some(_)))).collect();
    let bar = ProgressBar::new(names.len() as u64);
    bar.set_style(ProgressStyle::with_template("importing {bar:40} {pos}/{len} tensors {msg}")?);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in names {
        bar.set_message(name.clone());
        let hf = arch.hf_name(name).flatten().expect("filtered above");
        let mut t = load(name)?;
        let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
        if arch.unpermute_qk {
            let n = if stem.ends_with(".attn_q") {
                heads
            } else if stem.ends_with(".attn_k") {
                kv_heads
            } else {
                0
            };
            if n > 0 {
                t = unpermute_qk(&t, n).with_context(|| format!("{}: tensor {name}", gguf.display()))?;
            }
        }
        if arch.norm_offset != 0.0 && name.ends_with("norm.weight") {
            t = (t - arch.norm_offset as f64)?;
        }
        tensors.insert(hf, t.to_dtype(dtype)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    for (name, t) in (arch.extra)(&meta)? {
        tensors.insert(name, t.to_dtype(dtype)?);
    }
    if !arch.ties && !tensors.contains_key("lm_head.weight") {
        let e = tensors.get("model.embed_tokens.weight").context("no embedding")?.clone();
        tensors.insert("lm_head.weight".into(), e);
        cfg.insert("tie_word_embeddings".into(), json!(false));
    }

    // Tokenizer, special tokens.
    let (tokenizer, mut tokenizer_config, sp) = tokenizer::build(&g)?;
    let mut gen = Map::new();
    if let Some(b) = sp.bos {
        cfg.insert("bos_token_id".into(), json!(b));
        gen.insert("bos_token_id".into(), json!(b));
    }
    let eos: Vec<usize> = sp.eos.into_iter().chain(sp.eot).collect();
    match eos.as_slice() {
        [] => {}
        [e] => {
            cfg.insert("eos_token_id".into(), json!(e));
            gen.insert("eos_token_id".into(), json!(e));
        }
        many => {
            cfg.insert("eos_token_id".into(), json!(many));
            gen.insert("eos_token_id".into(), json!(many));
        }
    }
    if let (Some(ctx), Some(tc)) = (cfg.get("max_position_embeddings").cloned(), tokenizer_config.as_object_mut()) {
        tc.insert("model_max_length".into(), ctx);
    }
    Ok(Imported {
        config: Value::Object(cfg),
        tensors,
        tokenizer,
        tokenizer_config,
        generation_config: Value::Object(gen),
    })
}

/// Imports `gguf` into an mlx-style folder at `out` with weights in `dtype` (by default the
/// architecture's, see [`read`]).
pub fn import(gguf: &Path, out: &Path, dtype: Option<DType>, force: bool) -> Result<PathBuf> {
    let folder = AtomicFolder::create(out, force, "--mlx-path")?;
    let m = read(gguf, dtype)?;
    candle_core::safetensors::save(&m.tensors, folder.path("model.safetensors"))?;
    folder.write_json("config.json", &m.config)?;
    folder.write_json("tokenizer.json", &m.tokenizer)?;
    folder.write_json("tokenizer_config.json", &m.tokenizer_config)?;
    folder.write_json("generation_config.json", &m.generation_config)?;
    folder.commit()
}

/// A minimal walk over a GGUF header for the tensor types, used only to name a tensor whose
/// type candle's reader refuses.
mod scan {
    use std::io::{BufReader, Read};
    use std::path::Path;

    /// GGML type ids and names (ggml.h).
    const NAMES: &[(u32, &str)] = &[
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (30, "BF16"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ];

    pub fn type_name(t: u32) -> String {
        NAMES.iter().find(|(i, _)| *i == t).map_or_else(|| format!("#{t} (unknown)"), |(_, n)| n.to_string())
    }

    pub fn candle_reads(t: u32) -> bool {
        matches!(t, 0..=3 | 6..=15 | 30)
    }

    fn u32(r: &mut impl Read) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(r: &mut impl Read) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn skip(r: &mut impl Read, n: u64) -> std::io::Result<()> {
        let got = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
        if got != n {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn string(r: &mut impl Read) -> std::io::Result<String> {
        let n = u64(r)?;
        if n > 1 << 24 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut b = vec![0u8; n as usize];
        r.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn skip_value(r: &mut impl Read, t: u32, depth: usize) -> std::io::Result<()> {
        match t {
            0 | 1 | 7 => skip(r, 1),
            2 | 3 => skip(r, 2),
            4..=6 => skip(r, 4),
            10..=12 => skip(r, 8),
            8 => {
                let n = u64(r)?;
                skip(r, n)
            }
            9 if depth < 4 => {
                let et = u32(r)?;
                let n = u64(r)?;
                match et {
                    0 | 1 | 7 => skip(r, n),
                    2 | 3 => skip(r, 2 * n),
                    4..=6 => skip(r, 4 * n),
                    10..=12 => skip(r, 8 * n),
                    _ => (0..n).try_for_each(|_| skip_value(r, et, depth + 1)),
                }
            }
            _ => Err(std::io::ErrorKind::InvalidData.into()),
        }
    }

    /// (name, GGML type) of every tensor, in file order (GGUF v2/v3).
    pub fn tensor_types(path: &Path) -> std::io::Result<Vec<(String, u32)>> {
        let mut r = BufReader::new(std::fs::File::open(path)?);
        let (_magic, _version) = (u32(&mut r)?, u32(&mut r)?);
        let n_tensors = u64(&mut r)?;
        let n_kv = u64(&mut r)?;
        for _ in 0..n_kv {
            string(&mut r)?;
            let t = u32(&mut r)?;
            skip_value(&mut r, t, 0)?;
        }
        let mut out = vec![];
        for _ in 0..n_tensors.min(1 << 20) {
            let name = string(&mut r)?;
            let dims = u32(&mut r)?;
            skip(&mut r, 8 * dims as u64)?;
            let t = u32(&mut r)?;
            u64(&mut r)?;
            out.push((name, t));
        }
        Ok(out)
    }
}
