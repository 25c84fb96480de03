//! Folding adapters into a model folder (mlx_lm.fuse), as a step of `convert`: each adapted
//! layer's weight becomes `W + scale·(A B)ᵀ` (DoRA: rescaled per row to the magnitude `m`),
//! re-quantized with the layer's own bits and group size unless the output is dequantized.
//! Full fine-tuning adapters simply replace the tensors they hold.

use crate::io::Weights;
use crate::nn::lora::{Adapters, FineTuneType};
use crate::nn::{Linear, Loader, SwitchLinear};
use crate::quant::QuantSpec;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;

/// Lays full fine-tuning tensors over `weights`, or lists the layers the LoRA / DoRA adapters
/// change (checking that the model has them).
pub fn prepare(weights: &mut Weights, adapters: &Adapters) -> Result<BTreeSet<String>> {
    if adapters.config.fine_tune_type == FineTuneType::Full {
        weights.add_file(&adapters.dir.join(crate::nn::lora::ADAPTER_WEIGHTS))?;
        return Ok(BTreeSet::new());
    }
    let mut layers = BTreeSet::new();
    for name in adapters.weights().names() {
        if let Some(layer) = name.strip_suffix(".lora_a") {
            if !weights.contains(&format!("{layer}.weight")) {
                bail!(
                    "the adapters in {} change layer `{layer}`, which the model does not have — they were trained for a different model",
                    adapters.dir.display()
                );
            }
            layers.insert(layer.to_string());
        }
    }
    Ok(layers)
}

/// The adapted layer a tensor name belongs to (its weight, or its quantization's scales and
/// biases), if any.
pub fn layer_of<'a>(name: &str, layers: &'a BTreeSet<String>) -> Option<&'a str> {
    [".weight", ".scales", ".biases"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .and_then(|p| layers.get(p))
        .map(|s| s.as_str())
}

/// The tensors that replace layer `prefix`'s weight (and quantization) once its adapter is
/// folded in; the layer's bias is left as stored.
pub fn fuse_layer(
    weights: &Weights,
    quant: Option<&QuantSpec>,
    adapters: &Adapters,
    prefix: &str,
    dequantize: bool,
) -> Result<Vec<(String, Tensor)>> {
    let weight = format!("{prefix}.weight");
    let a_shape = adapters.weights().shape(&format!("{prefix}.lora_a"))?;
    let quantized = weights.dtype(&weight)? == DType::U32;
    // a quantized weight is fused in its scales' dtype; u8 scales (the float modes) in bfloat16,
    // what mx.dequantize gives for them
    let store = match quantized {
        true => match weights.dtype(&format!("{prefix}.scales"))? {
            DType::U8 => DType::BF16,
            d => d,
        },
        false => weights.dtype(&weight)?,
    };
    let ld =
        Loader { weights, dtype: store, act_dtype: DType::F32, device: Device::Cpu, quant, adapters: Some(adapters) };
    if let [experts, _, in_dim] = a_shape[..] {
        // stacked experts (mlx_lm's LoRASwitchLinear: lora_a is experts × rank × in)
        let out_dim = weights.shape(&weight)?[1];
        let layer = SwitchLinear::load(&ld, prefix, experts, in_dim, out_dim, false)
            .with_context(|| format!("fusing layer `{prefix}`"))?;
        let fused = layer.fuse(dequantize, store)?.context("the adapters hold no lora_a/lora_b pair")?;
        return Ok(fused.into_iter().map(|(part, t)| (format!("{prefix}.{part}"), t)).collect());
    }
    let in_dim = a_shape[0];
    let out_dim = weights.shape(&weight)?[0];
    let layer =
        Linear::load(&ld, prefix, in_dim, out_dim, false).with_context(|| format!("fusing layer `{prefix}`"))?;
    let Linear::Lora(l) = layer else {
        bail!("layer `{prefix}`: the adapters hold no lora_a/lora_b pair for it");
    };
    Ok(match l.fuse(dequantize, store)? {
        Linear::Dense { weight: w, .. } => vec![(weight, w)],
        Linear::Quantized { weight: q, .. } => {
            vec![(weight, q.packed), (format!("{prefix}.scales"), q.scales), (format!("{prefix}.biases"), q.biases)]
        }
        Linear::Fp { weight: q, .. } => vec![(weight, q.packed), (format!("{prefix}.scales"), q.scales)],
        Linear::Lora(_) => unreachable!("fuse returns a plain layer"),
    })
}
