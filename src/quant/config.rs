//! config.json's `quantization` (or `quantization_config`) block, as mlx_lm writes and reads it:
//! global `bits`, `group_size` and `mode`, plus per-layer entries keyed by the layer's path — a
//! dict with its own `bits` / `group_size` / `mode` (a dict without `mode` is affine, as mlx's
//! `to_quantized` defaults it), `true` for the global ones, or `false` for a layer kept in float.

use super::affine::QuantParams;
use super::Mode;
use anyhow::{bail, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct QuantSpec {
    /// the global bits, group size and mode
    pub default: QuantParams,
    /// per-layer overrides: `Some(params)` or `None` (kept in float)
    pub layers: BTreeMap<String, Option<QuantParams>>,
}

impl QuantSpec {
    /// Reads the block from a config, `None` when the model is not quantized.
    pub fn from_config(config: &Value, path: &str) -> Result<Option<Self>> {
        let block = match config.get("quantization").or_else(|| config.get("quantization_config")) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(_) => bail!("{path}: `quantization` must be an object"),
        };
        // the original checkpoints' `quantization_config` (mlx_lm maps it to its own block)
        let method = block.get("quant_method").and_then(|m| m.as_str());
        if let (Some(m @ ("mxfp4" | "mxfp8")), false) = (method, block.contains_key("bits")) {
            let default = QuantParams::with_mode(Mode::parse(m)?, None, None, path)?;
            return Ok(Some(Self { default, layers: BTreeMap::new() }));
        }
        // compressed-tensors' packed int4 (Kimi K2-Thinking / K2.5): affine 4-bit in groups of 32
        // once the architecture's sanitize has renamed its tensors (mlx_lm's mapping)
        if block.get("quant_method").and_then(|m| m.as_str()) == Some("compressed-tensors")
            && !block.contains_key("bits")
        {
            let format = block.get("format").and_then(|f| f.as_str()).unwrap_or("");
            if format != "pack-quantized" {
                bail!("{path}: compressed-tensors format `{format}` is not supported (only pack-quantized int4)");
            }
            let default = QuantParams::new(4, 32, path)?;
            return Ok(Some(Self { default, layers: BTreeMap::new() }));
        }
        // FP8 checkpoints (DeepSeek, Kimi, Mistral): dequantized by the architecture's sanitize
        if block.get("quant_method").and_then(|m| m.as_str()) == Some("fp8") && !block.contains_key("bits") {
            return Ok(None);
        }
        let default = params_of(block, &format!("{path}: quantization"), true)?;
        let mut layers = BTreeMap::new();
        for (k, v) in block {
            match (k.as_str(), v) {
                ("bits" | "group_size" | "mode" | "quant_method" | "global_scale", _) => {}
                (_, Value::Bool(false)) => {
                    layers.insert(k.clone(), None);
                }
                (_, Value::Bool(true)) => {
                    layers.insert(k.clone(), Some(default));
                }
                (_, Value::Object(m)) => {
                    let p = params_of(m, &format!("{path}: quantization override for layer `{k}`"), false)?;
                    layers.insert(k.clone(), Some(p));
                }
                _ => {}
            }
        }
        Ok(Some(Self { default, layers }))
    }

    /// Overrides that name a layer the model does not have (a clear error, naming it).
    pub fn check_layers_exist(&self, known: &dyn Fn(&str) -> bool, path: &str) -> Result<()> {
        for k in self.layers.keys() {
            if !known(k) {
                bail!("{path}: the quantization block has an override for layer `{k}`, which this model does not have");
            }
        }
        Ok(())
    }
}

/// Bits, group size and mode of a block (`required`: the global one, where mlx_lm needs both
/// numbers; a layer's entry takes its mode's defaults for a missing one).
fn params_of(m: &Map<String, Value>, what: &str, required: bool) -> Result<QuantParams> {
    let get = |k: &str| -> Result<Option<usize>> {
        match m.get(k) {
            Some(v) => Ok(Some(
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| anyhow::anyhow!("{what}: `{k}` must be a positive integer"))?,
            )),
            None if required => bail!("{what}: missing `{k}`"),
            None => Ok(None),
        }
    };
    let mode = match m.get("mode") {
        None | Some(Value::Null) => Mode::Affine,
        Some(Value::String(s)) => Mode::parse(s).map_err(|e| anyhow::anyhow!("{what}: `mode`: {e}"))?,
        Some(_) => bail!("{what}: `mode` must be a string (affine, mxfp4, nvfp4 or mxfp8)"),
    };
    QuantParams::with_mode(mode, get("group_size")?, get("bits")?, what)
}
