//! Converting a model folder as `mlx_lm.convert` does: cast float weights, quantize the linear
//! and embedding layers (uniformly or with a mixed-precision recipe), or dequantize; the output is
//! an mlx-style folder written atomically, with the config's `quantization` block as mlx_lm
//! writes it.

pub mod gguf;

use crate::io::output::{copy_tokenizer_files, AtomicFolder};
use crate::io::{ConfigFile, Weights};
use crate::models::LayerQuant;
use crate::quant::{affine, fp, Mode, QuantParams, QuantSpec};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// mlx_lm's mixed-precision recipes (`--quant-predicate`).
pub const QUANT_RECIPES: [&str; 4] = ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"];

/// How to quantize.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// the uniform bits, group size and mode
    pub params: QuantParams,
    /// a mixed recipe name, or `None` for uniform quantization
    pub recipe: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// target float dtype (else config.json's `torch_dtype`, else unchanged)
    pub dtype: Option<DType>,
    pub quantize: Option<QuantizeOptions>,
    pub dequantize: bool,
    pub force: bool,
    /// Fold the adapters of this folder into the weights (`wick fuse`); stored dtypes are
    /// then kept unless `dtype` is given.
    pub adapter: Option<PathBuf>,
}

/// `(low, high)` bits of a recipe.
fn recipe_bits(recipe: &str) -> Result<(usize, usize)> {
    Ok(match recipe {
        "mixed_2_6" => (2, 6),
        "mixed_3_4" => (3, 4),
        "mixed_3_6" => (3, 6),
        "mixed_4_6" => (4, 6),
        other => bail!("--quant-predicate {other}: unknown recipe (expected one of {})", QUANT_RECIPES.join(", ")),
    })
}

/// The layers `nn.quantize` would touch: 2-D float `*.weight` tensors of linear and embedding
/// layers (norm weights are 1-D), by module path.
fn quantizable_layers(weights: &Weights) -> Result<Vec<String>> {
    let mut out = vec![];
    for name in weights.names() {
        if let Some(path) = name.strip_suffix(".weight") {
            // matrices, stacked expert matrices (mlx_lm's SwitchLinear) and per-head ones (its
            // MultiLinear: latent attention's embed_q / unembed_out)
            let rank = weights.shape(name)?.len();
            let experts = path.contains("switch_mlp") || path.contains(".experts.");
            let per_head = path.ends_with("self_attn.embed_q") || path.ends_with("self_attn.unembed_out");
            let quantizable = rank == 2 || (rank == 3 && (experts || per_head));
            if quantizable && weights.dtype(name)?.is_float() && !path.contains("norm") {
                out.push(path.to_string());
            }
        }
    }
    Ok(out)
}

/// mlx_lm's mixed predicate: more bits for v_proj and down_proj in the first and last eighth of
/// the layers and every third layer between, and for lm_head.
fn mixed_params(
    path: &str,
    recipe: &str,
    group_size: usize,
    num_layers: usize,
    layer_location: usize,
) -> Result<QuantParams> {
    let (low, high) = recipe_bits(recipe)?;
    let parts: Vec<&str> = path.split('.').collect();
    let index: i64 = if parts.len() > layer_location { parts[layer_location].parse().unwrap_or(0) } else { 0 };
    let n = num_layers as i64;
    let more = index < n / 8 || index >= 7 * n / 8 || (index - n / 8).rem_euclid(3) == 2;
    let v_or_down =
        path.contains("v_proj") || path.contains("v_a_proj") || path.contains("v_b_proj") || path.contains("down_proj");
    let bits = if (v_or_down && more) || path.contains("lm_head") { high } else { low };
    QuantParams::new(bits, group_size, &format!("layer `{path}`"))
}

/// The bits, group size and mode a layer the config does not list was stored with, read off its
/// tensors as mlx_lm's `infer_quant_config` does: u8 scales are the float mode whose bits times
/// group size fit (64 nvfp4, 128 mxfp4, 256 mxfp8); float scales are affine with the global bits.
fn stored_params(spec: &QuantSpec, packed: &Tensor, scales: &Tensor, path: &str) -> Result<QuantParams> {
    let width = packed.dim(candle_core::D::Minus1)?;
    let groups = scales.dim(candle_core::D::Minus1)?.max(1);
    let what = format!("layer `{path}`");
    if scales.dtype() == DType::U8 {
        let fits = |m: &Mode| m.is_fp() && m.defaults().0 * m.defaults().1 == width * 32 / groups;
        return match Mode::ALL.iter().find(|m| fits(m)) {
            Some(&m) => QuantParams::with_mode(m, None, None, &what),
            None => {
                bail!("Cannot infer the quantization mode of {path}: u8 scales of {groups} groups for {width} words")
            }
        };
    }
    let in_dim = width * 32 / spec.default.bits;
    QuantParams::new(spec.default.bits, in_dim / groups, &what)
}

fn dtype_of_config(cfg: &ConfigFile) -> Option<DType> {
    cfg.value
        .get("torch_dtype")
        .or_else(|| cfg.value.get("dtype"))
        .and_then(|v| v.as_str())
        .and_then(|s| crate::backend::device::parse_dtype(s).ok())
}

/// Largest shard mlx_lm writes (5 GB).
const MAX_SHARD_BYTES: usize = 5 << 30;

/// Converts the model folder `src` into `dst`.
pub fn convert(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<PathBuf> {
    if opts.quantize.is_some() && opts.dequantize {
        bail!("choose either -q/--quantize or -d/--dequantize, not both");
    }
    let cfg = ConfigFile::read(src)?;
    let spec = QuantSpec::from_config(&cfg.value, &cfg.path.display().to_string())?;
    if opts.quantize.is_some() && spec.is_some() {
        bail!("{} is already quantized; dequantize it first (-d) or convert the float original", src.display());
    }
    let mut weights = Weights::open(src)?;
    let model_type = cfg.model_type()?.to_string();
    crate::models::sanitize_weights(&cfg, &mut weights)?;
    let adapters = opts.adapter.as_deref().map(crate::nn::lora::Adapters::open).transpose()?;
    let fused = match &adapters {
        Some(a) => crate::lora::fuse::prepare(&mut weights, a)?,
        None => Default::default(),
    };
    let target = if adapters.is_some() { opts.dtype } else { opts.dtype.or_else(|| dtype_of_config(&cfg)) };
    let flag = if opts.adapter.is_some() { "--save-path" } else { "--mlx-path" };
    let out = AtomicFolder::create(dst, opts.force, flag)?;

    let layers = quantizable_layers(&weights)?;
    let mut config = cfg.value.as_object().cloned().context("config.json is not an object")?;
    let mut qblock = Map::new();
    let (num_layers, layer_location) = {
        let n = config.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let loc = layers
            .iter()
            .find(|p| p.contains("down_proj"))
            .and_then(|p| p.split('.').position(|c| c.chars().all(|ch| ch.is_ascii_digit())))
            .unwrap_or(0);
        (n, loc)
    };
    if let Some(q) = &opts.quantize {
        if q.recipe.is_some() && !layers.iter().any(|p| p.contains("down_proj")) {
            bail!("--quant-predicate: the model does not have the expected `down_proj` layers for mixed quantization");
        }
        qblock.insert("group_size".into(), json!(q.params.group_size));
        qblock.insert("bits".into(), json!(q.params.bits));
        qblock.insert("mode".into(), json!(q.params.mode.name()));
    }

    let names: Vec<String> = weights.names().map(String::from).collect();
    let bar = ProgressBar::new(names.len() as u64);
    bar.set_style(ProgressStyle::with_template("converting {bar:40} {pos}/{len} tensors {msg}")?);
    let mut tensors: Vec<(String, Tensor)> = vec![];
    let dev = Device::Cpu;
    for name in &names {
        bar.set_message(name.clone());
        let t = weights.raw(name, &dev)?;
        let path = name.strip_suffix(".weight").unwrap_or(name);
        let is_layer = name.ends_with(".weight") && layers.iter().any(|l| l == path);
        // an adapted layer: its weight (and quantization) replaced by the fused one
        if let (Some(a), Some(layer)) = (&adapters, crate::lora::fuse::layer_of(name, &fused)) {
            if name.ends_with(".weight") {
                bar.set_message(format!("fusing {layer}"));
                for (n, t) in crate::lora::fuse::fuse_layer(&weights, spec.as_ref(), a, layer, opts.dequantize)? {
                    let t = match target {
                        Some(dt) if t.dtype().is_float() => t.to_dtype(dt)?,
                        _ => t,
                    };
                    tensors.push((n, t));
                }
            }
            bar.inc(1);
            continue;
        }
        // already-quantized layers: dequantize or copy
        if let Some(spec) = &spec {
            let part = [".scales", ".biases", ".global_scale"].into_iter().find(|p| name.ends_with(p));
            if let Some(part) = part {
                let base = &name[..name.len() - part.len()];
                if opts.dequantize
                    && weights.contains(&format!("{base}.weight"))
                    && weights.dtype(&format!("{base}.weight"))? == DType::U32
                {
                    bar.inc(1);
                    continue;
                }
            }
            if name.ends_with(".weight") && t.dtype() == DType::U32 && opts.dequantize {
                let scales = weights.raw(&format!("{path}.scales"), &dev)?;
                let p = match spec.layers.get(path) {
                    Some(Some(p)) => *p,
                    _ => stored_params(spec, &t, &scales, path)?,
                };
                let d = if p.mode.is_fp() {
                    // mx.dequantize of u8 scales gives bfloat16 (mlx_lm casts before, not after)
                    let gname = format!("{path}.global_scale");
                    let global = match weights.contains(&gname) {
                        true => Some(weights.raw(&gname, &dev)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                        false => None,
                    };
                    fp::dequantize_tensor(&t, &scales, p.mode, DType::BF16, global.as_deref())?
                } else {
                    let biases = weights.raw(&format!("{path}.biases"), &dev)?;
                    let d = crate::ops::qmatmul::dequantize_tensor(&t, &scales, &biases, p)?;
                    match target {
                        Some(dt) => d.to_dtype(dt)?,
                        None => d,
                    }
                };
                tensors.push((name.clone(), d));
                bar.inc(1);
                continue;
            }
        }
        let t = match target {
            Some(dt) if t.dtype().is_float() && !crate::models::keeps_dtype(&model_type, name) => t.to_dtype(dt)?,
            _ => t,
        };
        if let (Some(q), true) = (&opts.quantize, is_layer) {
            let in_dim = t.dim(candle_core::D::Minus1)?;
            // a recipe replaces the architecture's own predicate, as in mlx_lm
            let arch = crate::models::layer_quant(&model_type, path);
            let own = match arch {
                LayerQuant::Params(p) if q.recipe.is_none() => Some(p),
                _ => None,
            };
            let p = match (&q.recipe, own) {
                (Some(r), _) => mixed_params(path, r, q.params.group_size, num_layers, layer_location)?,
                (None, Some(p)) => p,
                (None, None) => q.params,
            };
            // mlx_lm checks the input size against the uniform group size only
            if in_dim % q.params.group_size == 0 && arch != LayerQuant::Float {
                if in_dim % p.group_size != 0 {
                    bail!(
                        "layer `{path}`: its {in_dim} inputs cannot be quantized in groups of {} (the architecture's setting for it)",
                        p.group_size
                    );
                }
                if q.recipe.is_some() {
                    let entry = json!({"group_size": p.group_size, "bits": p.bits, "mode": p.mode.name()});
                    qblock.insert(path.to_string(), entry);
                } else if own.is_some() {
                    // the architecture's dict as it gives it: affine, no `mode`
                    qblock.insert(path.to_string(), json!({"group_size": p.group_size, "bits": p.bits}));
                }
                if p.mode.is_fp() {
                    let (pk, s) = fp::quantize_tensor(&t, p.mode, None)?;
                    tensors.push((format!("{path}.weight"), pk));
                    tensors.push((format!("{path}.scales"), s));
                } else {
                    let (pk, s, b) = affine::quantize_tensor(&t, p)?;
                    tensors.push((format!("{path}.weight"), pk));
                    tensors.push((format!("{path}.scales"), s));
                    tensors.push((format!("{path}.biases"), b));
                }
                bar.inc(1);
                continue;
            }
        }
        tensors.push((name.clone(), t));
        bar.inc(1);
    }
    bar.finish_and_clear();

    if opts.quantize.is_some() {
        config.insert("quantization".into(), Value::Object(qblock.clone()));
        config.insert("quantization_config".into(), Value::Object(qblock));
    }
    if opts.dequantize {
        config.remove("quantization");
        config.remove("quantization_config");
    }
    let mut sorted: Vec<(String, Value)> = config.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    out.write_json("config.json", &Value::Object(sorted.into_iter().collect()))?;
    write_shards(&out, tensors)?;
    copy_tokenizer_files(src, &out)?;
    if let Some(a) = &adapters {
        a.finish()?;
    }
    out.commit()
}

/// Writes tensors as mlx_lm does: one `model.safetensors`, or 5 GB shards with an index.
fn write_shards(out: &AtomicFolder, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut size = 0usize;
    for (n, t) in tensors {
        let b = t.elem_count() * t.dtype().size_in_bytes();
        if size + b > MAX_SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        size += b;
        shards.last_mut().unwrap().push((n, t));
    }
    let count = shards.len();
    let mut weight_map = Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        for (n, t) in &shard {
            weight_map.insert(n.clone(), json!(file));
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "mlx".to_string())]);
        safetensors::serialize_to_file(shard.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), &out.path(&file))
            .with_context(|| format!("cannot write {file}"))?;
    }
    let mut sorted: Vec<(String, Value)> = weight_map.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    out.write_json(
        "model.safetensors.index.json",
        &json!({"metadata": {"total_size": total}, "weight_map": Value::Object(sorted.into_iter().collect())}),
    )
}
