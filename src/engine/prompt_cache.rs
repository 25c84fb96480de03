//! Prompt cache files, in mlx_lm's `save_prompt_cache` layout so that either tool reads the
//! other's: one safetensors file whose tensors are each layer's `cache.state` flattened
//! (`"<layer>.<field>"`, quantized buffers `"<layer>.<field>.<part>"`, integers as 0-d int32
//! arrays) and whose metadata flattens `[metadata, class names, scalar list]` (`"0.<key>"`,
//! `"1.<layer>"`, `"2.<n>.0"`/`"2.<n>.1"`).

use crate::cache::{CacheState, KvCache};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A cache read from a file, with the metadata it was saved with (`model`, `tokenizer_config`).
pub struct PromptCacheFile {
    pub cache: Vec<KvCache>,
    pub metadata: BTreeMap<String, String>,
}

/// Writes `cache` and `metadata` to `path` (through a temporary file, renamed at the end).
pub fn save(path: &Path, cache: &[KvCache], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vec![];
    let mut meta: HashMap<String, String> = HashMap::new();
    // the scalar list starts with "" so that it is never empty (as mlx_lm writes it)
    meta.insert("2.0".into(), String::new());
    let mut scalars = 0usize;
    // an integer (a 0-d int32 array) or None (an empty float32 array), recorded in the scalar list
    let mut scalar =
        |tensors: &mut Vec<(String, Tensor)>, meta: &mut HashMap<String, String>, name: String, v: Option<usize>| {
            scalars += 1;
            meta.insert(format!("2.{scalars}.0"), name.clone());
            meta.insert(format!("2.{scalars}.1"), if v.is_some() { "scalar" } else { "none" }.into());
            let t = match v {
                Some(v) => {
                    let v = i32::try_from(v).map_err(|_| anyhow!("{name}: {v} does not fit an int32"))?;
                    Tensor::new(v, &Device::Cpu)?
                }
                None => Tensor::zeros(0, DType::F32, &Device::Cpu)?,
            };
            tensors.push((name, t));
            Ok::<_, anyhow::Error>(())
        };
    for (k, v) in metadata {
        meta.insert(format!("0.{k}"), v.clone());
    }
    for (i, c) in cache.iter().enumerate() {
        meta.insert(format!("1.{i}"), c.kind().class_name().into());
        let state = c.state()?.with_context(|| format!("layer {i}'s cache is empty: nothing to save"))?;
        let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.contiguous()?) };
        match state {
            CacheState::Standard { keys, values, offset } => {
                tensors.push((format!("{i}.0"), host(&keys)?));
                tensors.push((format!("{i}.1"), host(&values)?));
                scalar(&mut tensors, &mut meta, format!("{i}.2"), Some(offset))?;
            }
            CacheState::Rotating { keys, values, offset, keep, max_size, idx } => {
                tensors.push((format!("{i}.0"), host(&keys)?));
                tensors.push((format!("{i}.1"), host(&values)?));
                for (f, v) in [(2, offset), (3, keep), (4, max_size), (5, idx)] {
                    scalar(&mut tensors, &mut meta, format!("{i}.{f}"), Some(v))?;
                }
            }
            CacheState::Quantized { keys, values, offset, group_size, bits } => {
                for (f, parts) in [(0, &keys), (1, &values)] {
                    for (j, t) in parts.iter().enumerate() {
                        tensors.push((format!("{i}.{f}.{j}"), host(t)?));
                    }
                }
                for (f, v) in [(2, offset), (3, group_size), (4, bits)] {
                    scalar(&mut tensors, &mut meta, format!("{i}.{f}"), Some(v))?;
                }
            }
            // (arrays, left_padding, lengths): a saved cache is a single sequence's
            CacheState::Arrays { arrays, .. } => {
                for (j, a) in arrays.iter().enumerate() {
                    match a {
                        Some(t) => tensors.push((format!("{i}.0.{j}"), host(t)?)),
                        None => scalar(&mut tensors, &mut meta, format!("{i}.0.{j}"), None)?,
                    }
                }
                for f in [1, 2] {
                    scalar(&mut tensors, &mut meta, format!("{i}.{f}"), None)?;
                }
            }
        }
    }
    crate::io::output::write_file_atomic(path, |tmp| {
        Ok(safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), tmp)?)
    })
}

/// The metadata a prompt cache file was saved with (its `"0.<key>"` entries).
pub fn metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let what = path.display();
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read the prompt cache file {what}"))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{what} is not a safetensors file"))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        bail!("{what} is not a safetensors file (header of {n} bytes)");
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_context(|| format!("{what} is not a safetensors file"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| anyhow!("{what} is not a safetensors file: {e}"))?;
    let entries = v.get("__metadata__").and_then(|m| m.as_object());
    Ok(user_metadata(entries.into_iter().flatten().filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))))
}

/// The user's entries (`"0.<key>"`) among a file's metadata entries.
fn user_metadata<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
    entries.filter_map(|(k, v)| Some((k.strip_prefix("0.")?.to_string(), v.to_string()))).collect()
}

/// Reads a prompt cache file written by wick or mlx_lm; keys and values come back in `dtype`
/// on `device`.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<PromptCacheFile> {
    let what = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the prompt cache file {what}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{what} is not a safetensors file: {e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("cannot read the tensors of {what}"))?;
    let metadata = user_metadata(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut classes: BTreeMap<usize, String> = BTreeMap::new();
    for (k, v) in &meta {
        if let Some(i) = k.strip_prefix("1.") {
            let i: usize = i.parse().map_err(|_| anyhow!("{what}: bad metadata key {k:?}"))?;
            classes.insert(i, v.clone());
        }
    }
    if classes.is_empty() {
        bail!("{what} is not a prompt cache file (its metadata names no cache classes; make one with `wick cache-prompt`)");
    }
    if classes.keys().copied().ne(0..classes.len()) {
        bail!("{what}: the cache class list has gaps");
    }
    let tensor = |name: String| -> Result<Tensor> {
        tensors.get(&name).cloned().with_context(|| format!("{what}: tensor {name:?} is missing"))
    };
    let int = |name: String| -> Result<usize> {
        let t = tensor(name.clone())?;
        let v = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        match v.as_slice() {
            [x] if *x >= 0 => Ok(*x as usize),
            _ => bail!("{what}: {name:?} should be one non-negative integer"),
        }
    };
    let kv = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
    // the entries the scalar list marks None
    let nones: std::collections::HashSet<&str> = meta
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix("2.")?.strip_suffix(".1")?;
            (v == "none").then(|| meta.get(&format!("2.{n}.0")).map(String::as_str)).flatten()
        })
        .collect();
    let mut cache = Vec::with_capacity(classes.len());
    for (i, class) in &classes {
        let state = match class.as_str() {
            "KVCache" => CacheState::Standard {
                keys: kv(tensor(format!("{i}.0"))?)?,
                values: kv(tensor(format!("{i}.1"))?)?,
                offset: int(format!("{i}.2"))?,
            },
            "RotatingKVCache" => CacheState::Rotating {
                keys: kv(tensor(format!("{i}.0"))?)?,
                values: kv(tensor(format!("{i}.1"))?)?,
                offset: int(format!("{i}.2"))?,
                keep: int(format!("{i}.3"))?,
                max_size: int(format!("{i}.4"))?,
                idx: int(format!("{i}.5"))?,
            },
            "QuantizedKVCache" => {
                let parts = |f: usize| -> Result<[Tensor; 3]> {
                    Ok([kv(tensor(format!("{i}.{f}.0"))?)?, kv(tensor(format!("{i}.{f}.1"))?)?, kv(tensor(format!("{i}.{f}.2"))?)?])
                };
                CacheState::Quantized {
                    keys: parts(0)?,
                    values: parts(1)?,
                    offset: int(format!("{i}.2"))?,
                    group_size: int(format!("{i}.3"))?,
                    bits: int(format!("{i}.4"))?,
                }
            }
            "ArraysCache" => {
                let mut arrays = vec![];
                for j in 0.. {
                    let name = format!("{i}.0.{j}");
                    match tensors.get(&name) {
                        _ if nones.contains(name.as_str()) => arrays.push(None),
                        Some(t) => arrays.push(Some(kv(t.clone())?)),
                        None => break,
                    }
                }
                if !nones.contains(format!("{i}.1").as_str()) || !nones.contains(format!("{i}.2").as_str()) {
                    bail!("{what}: layer {i} is an ArraysCache of a batch (left padding or lengths set); wick reads single sequences");
                }
                // the offset is the attention layers' (set below)
                CacheState::Arrays { arrays, offset: 0 }
            }
            other => bail!(
                "{what}: layer {i} holds a {other}, which wick does not read (KVCache, RotatingKVCache, QuantizedKVCache, ArraysCache)"
            ),
        };
        cache.push(KvCache::from_state(state, dtype).with_context(|| format!("{what}: layer {i}"))?);
    }
    let offsets: Vec<usize> = cache.iter().filter(|c| !c.is_arrays()).map(|c| c.offset()).collect();
    if offsets.iter().any(|&o| o != offsets[0]) {
        bail!("{what}: the layers hold different numbers of positions ({offsets:?})");
    }
    // a recurrent layer's state stands for as many positions as the attention layers hold
    let offset = offsets.first().copied().unwrap_or(0);
    for c in cache.iter_mut().filter(|c| c.is_arrays()) {
        c.advance_by(offset);
    }
    Ok(PromptCacheFile { cache, metadata })
}

/// Checks that a loaded cache has one layer cache per layer of the model (`model_cache` is the
/// cache the model makes for itself).
pub fn check_fits(file: &Path, cache: &[KvCache], model_cache: &[KvCache]) -> Result<()> {
    if cache.len() != model_cache.len() {
        bail!(
            "{}: the prompt cache has {} layers but the model has {}: it was made with another model",
            file.display(),
            cache.len(),
            model_cache.len()
        );
    }
    Ok(())
}
