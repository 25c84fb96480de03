//! config.json's `quantization` (or `quantization_config`) block, as mlx_lm writes and reads it:
//! global `bits` and `group_size` (and `mode`), plus per-layer entries keyed by the layer's path —
//! a dict with its own `bits`/`group_size`, or `false` for a layer kept in float.

use super::affine::QuantParams;
use anyhow::{bail, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct QuantSpec {
    pub default: QuantParams,
    pub mode: String,
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
        if block.get("quant_method").and_then(|m| m.as_str()) == Some("mxfp4") && !block.contains_key("bits") {
            let default = QuantParams::new(4, 32, path)?;
            return Ok(Some(Self { default, mode: "mxfp4".into(), layers: BTreeMap::new() }));
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
            return Ok(Some(Self { default, mode: "affine".into(), layers: BTreeMap::new() }));
        }
        // FP8 checkpoints (DeepSeek, Kimi, Mistral): dequantized by the architecture's sanitize
        if block.get("quant_method").and_then(|m| m.as_str()) == Some("fp8") && !block.contains_key("bits") {
            return Ok(None);
        }
        let mode = block.get("mode").and_then(|m| m.as_str()).unwrap_or("affine").to_string();
        if mode != "affine" && mode != "mxfp4" {
            bail!("{path}: quantization mode `{mode}` is not supported (supported: affine, mxfp4)");
        }
        let default = params_of(block, &format!("{path}: quantization"))?;
        let mut layers = BTreeMap::new();
        for (k, v) in block {
            match (k.as_str(), v) {
                ("bits" | "group_size" | "mode" | "quant_method", _) => {}
                (_, Value::Bool(false)) => {
                    layers.insert(k.clone(), None);
                }
                (_, Value::Bool(true)) => {
                    layers.insert(k.clone(), Some(default));
                }
                (_, Value::Object(m)) => {
                    let p = params_of(m, &format!("{path}: quantization override for layer `{k}`"))?;
                    layers.insert(k.clone(), Some(p));
                }
                _ => {}
            }
        }
        Ok(Some(Self { default, mode, layers }))
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

    /// The JSON block mlx_lm writes.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("group_size".into(), self.default.group_size.into());
        m.insert("bits".into(), self.default.bits.into());
        m.insert("mode".into(), self.mode.clone().into());
        for (k, v) in &self.layers {
            match v {
                None => m.insert(k.clone(), Value::Bool(false)),
                Some(p) => {
                    let mut o = Map::new();
                    o.insert("group_size".into(), p.group_size.into());
                    o.insert("bits".into(), p.bits.into());
                    m.insert(k.clone(), Value::Object(o))
                }
            };
        }
        Value::Object(m)
    }
}

fn params_of(m: &Map<String, Value>, what: &str) -> Result<QuantParams> {
    let get = |k: &str| -> Result<usize> {
        match m.get(k) {
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| anyhow::anyhow!("{what}: `{k}` must be a positive integer")),
            None => bail!("{what}: missing `{k}`"),
        }
    };
    QuantParams::new(get("bits")?, get("group_size")?, what)
}
