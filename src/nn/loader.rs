//! [`Loader`]: what every layer constructor reads its tensors through.

use crate::io::Weights;
use crate::nn::lora::Adapters;
use crate::ops::qmatmul::{FpWeight, QuantizedWeight};
use crate::quant::{Mode, QuantParams, QuantSpec};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// What every layer constructor needs: the weights, the compute dtype and device, and which
/// layers the config's `quantization` block says are quantized.
pub struct Loader<'a> {
    pub weights: &'a Weights,
    /// dtype of the large weight matrices (linear and embedding weights)
    pub dtype: DType,
    /// dtype of activations, norms, biases and the KV cache: the weight dtype on accelerators;
    /// f32 on the CPU, where half-precision arithmetic has no hardware support and every op
    /// would convert (weights stay in their dtype and are widened inside the kernels)
    pub act_dtype: DType,
    pub device: Device,
    pub quant: Option<&'a QuantSpec>,
    /// LoRA / DoRA adapters to wrap the linear layers they name with.
    pub adapters: Option<&'a Adapters>,
}

impl Loader<'_> {
    /// A small tensor (norm weight, bias) in the activation dtype.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.parameter(name, shape, self.act_dtype)
    }

    /// A weight matrix in the weight dtype.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.parameter(name, shape, self.dtype)
    }

    /// A small tensor in the activation dtype that is never trained.
    pub fn frozen_tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(name, shape, self.act_dtype, &self.device)
    }

    /// A model tensor in `dtype`, or, when full fine-tuning trains it, a trainable tensor in the
    /// activation dtype (what the forward pass computes in).
    fn parameter(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if let Some(a) = self.adapters {
            if let Some(t) = a.full_parameter(name, shape, self.act_dtype, &self.device, self.weights)? {
                return Ok(t);
            }
        }
        self.weights.get(name, shape, dtype, &self.device)
    }

    /// How the layer at `prefix` (with `in_dim` inputs) is quantized, as mlx_lm decides it: a
    /// layer listed in the config's `quantization` block uses its entry (`false`: kept in float);
    /// any other layer is quantized when `{prefix}.scales` exists, with bits and group size read
    /// off the stored shapes.
    pub fn quant_params(&self, prefix: &str, in_dim: usize) -> Result<Option<QuantParams>> {
        let w = self.weights;
        let scales = format!("{prefix}.scales");
        let weight = format!("{prefix}.weight");
        let has_scales = w.contains(&scales);
        let Some(spec) = self.quant else {
            if w.contains(&weight) && w.dtype(&weight)? == DType::U32 {
                anyhow::bail!("`{weight}` is a packed (uint32) weight but config.json has no `quantization` block");
            }
            return Ok(None);
        };
        match spec.layers.get(prefix) {
            Some(None) => Ok(None),
            Some(Some(p)) if has_scales => Ok(Some(*p)),
            Some(Some(p)) => anyhow::bail!(
                "config.json lists layer `{prefix}` as quantized ({}-bit, group {}), but `{scales}` is missing from the weights",
                p.bits,
                p.group_size
            ),
            None if !has_scales => Ok(None),
            None => {
                let width = *w.shape(&weight)?.last().context("packed weight has no dimensions")?;
                let groups = *w.shape(&scales)?.last().context("scales have no dimensions")?;
                if width * 32 % in_dim != 0 || groups == 0 || !in_dim.is_multiple_of(groups) {
                    anyhow::bail!(
                        "layer `{prefix}`: packed weight rows of {width} u32 words and {groups} scale groups do not fit {in_dim} inputs for any bits / group size"
                    );
                }
                let (bits, group_size) = (width * 32 / in_dim, in_dim / groups);
                let what = format!("layer `{prefix}`");
                if w.dtype(&scales)? != DType::U8 {
                    return Ok(Some(QuantParams::new(bits, group_size, &what)?));
                }
                // u8 scales: the one float mode with these bits and group size (mlx_lm's
                // `infer_quant_config`)
                let mode = Mode::ALL.into_iter().find(|m| m.is_fp() && m.defaults() == (group_size, bits));
                match mode {
                    Some(m) => Ok(Some(QuantParams::with_mode(m, None, None, &what)?)),
                    None => anyhow::bail!(
                        "Cannot infer the quantization mode of {prefix}: {bits} bits with group size {group_size}."
                    ),
                }
            }
        }
    }

    /// Loads and validates the three tensors of a quantized layer (`.weight`, `.scales`, `.biases`).
    pub fn quantized(
        &self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        params: QuantParams,
    ) -> Result<QuantizedWeight> {
        self.quantized_stack(prefix, &[], out_dim, in_dim, params)
    }

    /// [`Loader::quantized`] for a stack of `experts` matrices (each part with a leading expert
    /// axis, mlx_lm's `QuantizedSwitchLinear`); `out_dim` and `in_dim` are one expert's.
    pub fn quantized_experts(
        &self,
        prefix: &str,
        experts: usize,
        out_dim: usize,
        in_dim: usize,
        params: QuantParams,
    ) -> Result<QuantizedWeight> {
        self.quantized_stack(prefix, &[experts], out_dim, in_dim, params)
    }

    /// A matrix (`lead` empty) or a stack of them in a float mode (`params.mode`): `.weight`
    /// u32 and `.scales` u8, validated, and nvfp4's `.global_scale` (one f32 per matrix) where
    /// the file has one; `out_dim` and `in_dim` are one matrix's.
    pub fn fp(
        &self,
        prefix: &str,
        lead: &[usize],
        out_dim: usize,
        in_dim: usize,
        params: QuantParams,
    ) -> Result<FpWeight> {
        let w = self.weights;
        let mode = params.mode;
        if !in_dim.is_multiple_of(params.group_size) {
            bail!(
                "layer `{prefix}`: input dimension {in_dim} is not divisible by {mode}'s group of {}",
                params.group_size
            );
        }
        let parts =
            [("weight", DType::U32, in_dim * params.bits / 32), ("scales", DType::U8, in_dim / params.group_size)];
        for (part, dtype, last) in parts {
            let name = format!("{prefix}.{part}");
            if !w.contains(&name) {
                bail!("layer `{prefix}` is quantized in mode {mode} according to config.json, but `{name}` is missing from the weights");
            }
            let (shape, stored) = (w.shape(&name)?, w.dtype(&name)?);
            let want = [lead, &[out_dim, last]].concat();
            if shape != want || stored != dtype {
                bail!(
                    "layer `{prefix}`: {mode} `{name}` is {stored:?} {shape:?}, expected {dtype:?} {want:?} ({lead:?} × {out_dim}×{in_dim} in groups of {})",
                    params.group_size
                );
            }
        }
        let gname = format!("{prefix}.global_scale");
        let global_scale = if w.contains(&gname) {
            if mode != Mode::Nvfp4 {
                bail!("layer `{prefix}`: `{gname}` is given, but a global scale exists in nvfp4 mode only (this layer is {mode})");
            }
            let shape = w.shape(&gname)?;
            if shape != lead && !(lead.is_empty() && shape == [1]) {
                bail!("layer `{prefix}`: `{gname}` has shape {shape:?}, expected one value per matrix {lead:?}");
            }
            Some(w.get(&gname, &shape, DType::F32, &self.device)?.reshape(lead)?)
        } else {
            None
        };
        Ok(FpWeight {
            mode,
            packed: w.raw(&format!("{prefix}.weight"), &self.device)?,
            scales: w.raw(&format!("{prefix}.scales"), &self.device)?,
            global_scale,
            out_dim,
            in_dim,
        })
    }

    fn quantized_stack(
        &self,
        prefix: &str,
        lead: &[usize],
        out_dim: usize,
        in_dim: usize,
        params: QuantParams,
    ) -> Result<QuantizedWeight> {
        let (w, ld) = (self.weights, self);
        let wname = format!("{prefix}.weight");
        if !w.contains(&format!("{prefix}.scales")) {
            bail!(
                "layer `{prefix}` should be quantized ({}-bit, group {}) according to config.json, but `{prefix}.scales` is missing from the weights",
                params.bits,
                params.group_size
            );
        }
        if params.mode.is_fp() {
            bail!("layer `{prefix}` is quantized in mode {}, which this layer does not read", params.mode);
        }
        let wshape = w.shape(&wname)?;
        if w.dtype(&wname)? != DType::U32 {
            bail!("layer `{prefix}`: quantized weight `{wname}` must be uint32, found {:?}", w.dtype(&wname)?);
        }
        if !in_dim.is_multiple_of(params.group_size) {
            bail!("layer `{prefix}`: input dimension {in_dim} is not divisible by group_size {}", params.group_size);
        }
        let expect_w = [lead, &[out_dim, params.packed_width(in_dim)]].concat();
        if wshape != expect_w {
            bail!(
                "layer `{prefix}`: packed weight has shape {wshape:?}, but {}-bit values of a {out_dim}×{in_dim} matrix pack to {expect_w:?} (does `bits` in config.json match the file?)",
                params.bits
            );
        }
        let gshape = [lead, &[out_dim, in_dim / params.group_size]].concat();
        for part in ["scales", "biases"] {
            let s = w.shape(&format!("{prefix}.{part}"))?;
            if s != gshape {
                bail!(
                    "layer `{prefix}`: {part} have shape {s:?}, expected {gshape:?} ({out_dim} rows × {in_dim}/{} groups; does `group_size` in config.json match the file?)",
                    params.group_size
                );
            }
        }
        let packed = w.raw(&wname, &ld.device)?;
        // On the CPU the kernels read scales and biases as f32 (exact for f16/bf16 values):
        // no per-group conversion in the inner loop, and the bias term becomes one dot product.
        let sdtype = if ld.device.is_cpu() { DType::F32 } else { ld.dtype };
        let scales = w.raw(&format!("{prefix}.scales"), &ld.device)?.to_dtype(sdtype)?;
        let biases = w.raw(&format!("{prefix}.biases"), &ld.device)?.to_dtype(sdtype)?;
        Ok(QuantizedWeight { packed, scales, biases, params, out_dim, in_dim, compute_dtype: ld.act_dtype })
    }
}
