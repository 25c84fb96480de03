//! Shared layers every architecture is built from: `Linear` (dense or quantized),
//! `Embedding` (dense or quantized, also the tied lm head), `RmsNorm`, `Rope`.

use crate::cache::MaskSpec;
use crate::load::Weights;
use crate::quant::{QuantParams, QuantSpec, QuantizedWeight};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use std::sync::{Arc, Mutex};

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
    pub adapters: Option<&'a crate::lora::Adapters>,
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
                Ok(Some(QuantParams::new(width * 32 / in_dim, in_dim / groups, &format!("layer `{prefix}`"))?))
            }
        }
    }
}

/// A linear layer `y = x Wᵀ + b`, dense or MLX-affine-quantized, or one of those with a LoRA /
/// DoRA adapter.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense { weight: Tensor, bias: Option<Tensor> },
    Quantized { weight: QuantizedWeight, bias: Option<Tensor> },
    Lora(Box<crate::lora::LoraLinear>),
}

impl Linear {
    /// Loads `{prefix}.weight` (and `.bias` when `bias`), quantized when the config says so.
    pub fn load(ld: &Loader, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias_name = format!("{prefix}.bias");
        let base = if let Some(params) = ld.quant_params(prefix, in_dim)? {
            if let Some(a) = ld.adapters {
                a.check_trainable_quantized(prefix)?;
            }
            let bias = if bias { Some(ld.frozen_tensor(&bias_name, &[out_dim])?) } else { None };
            Linear::Quantized { weight: QuantizedWeight::load(ld, prefix, out_dim, in_dim, params)?, bias }
        } else {
            let bias = if bias { Some(ld.tensor(&bias_name, &[out_dim])?) } else { None };
            Linear::Dense { weight: ld.matrix(&format!("{prefix}.weight"), &[out_dim, in_dim])?, bias }
        };
        match ld.adapters {
            Some(a) => a.wrap(prefix, base, in_dim, out_dim, ld.act_dtype, &ld.device),
            None => Ok(base),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Linear::Lora(l) = self {
            return l.forward(x);
        }
        let y = self.forward_no_bias(x)?;
        Ok(match self.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `x Wᵀ` without the bias (with the adapter's update for an adapted layer).
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense { weight, .. } => dense_matmul(x, weight),
            Linear::Quantized { weight, .. } => weight.matmul(x),
            Linear::Lora(l) => l.base.forward_no_bias(x),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => bias.as_ref(),
            Linear::Lora(l) => l.base.bias(),
        }
    }

    /// The (base) weight as a dense matrix (out × in) in `dtype`, dequantized when quantized.
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Linear::Dense { weight, .. } => Ok(weight.to_dtype(dtype)?),
            Linear::Quantized { weight, .. } => Ok(weight.dequantize()?.to_dtype(dtype)?),
            Linear::Lora(l) => l.base.dense_weight(dtype),
        }
    }

    /// The dtype the (base) weight is stored in: a quantized weight's scales' dtype.
    pub fn weight_dtype(&self) -> DType {
        match self {
            Linear::Dense { weight, .. } => weight.dtype(),
            Linear::Quantized { weight, .. } => weight.scales.dtype(),
            Linear::Lora(l) => l.base.weight_dtype(),
        }
    }
}

/// `x Wᵀ` for `x` of any rank (…, in) and `W` (out, in). On the CPU our own kernels run
/// (`kernels`: matrix-vector for decode, f32 tiles + gemm for half-precision prefill); elsewhere,
/// and for f32 prefill, the device's matmul.
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().context("matmul input has no dimensions")?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, in_dim))?;
    let own_kernel = x.device().is_cpu()
        && w.is_contiguous()
        && (x.dtype() == w.dtype() || x.dtype() == DType::F32)
        && (rows <= crate::kernels::GEMV_MAX_ROWS || w.dtype() != DType::F32);
    let y = if own_kernel { x2.contiguous()?.apply_op2(w, DenseMatMul)? } else { x2.matmul(&w.t()?)? };
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    Ok(y.reshape(out_dims)?)
}

/// `x (m × k) · Wᵀ (k × n)` on the CPU with our kernels; differentiable in both arguments.
struct DenseMatMul;

impl candle_core::CustomOp2 for DenseMatMul {
    fn name(&self) -> &'static str {
        "dense-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use crate::kernels::{matmul_f32, DenseRows, Elem};
        use candle_core::CpuStorage as C;
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("dense matmul: input has {k} features, the weight {k2}");
        }
        let (xa, xb) = xl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dense matmul: input not contiguous".into()))?;
        let (wa, wb) = wl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dense matmul: weight not contiguous".into()))?;
        fn go<T: Elem>(x: &[T], w: &[T], m: usize, n: usize, k: usize) -> Vec<f32> {
            let mut xf = vec![0f32; x.len()];
            T::to_f32_slice(x, &mut xf);
            matmul_f32(&DenseRows { data: w, n, k }, &xf, m)
        }
        fn go_f32<T: Elem>(x: &[f32], w: &[T], m: usize, n: usize, k: usize) -> Vec<f32> {
            matmul_f32(&DenseRows { data: w, n, k }, x, m)
        }
        let out = match (xs, ws) {
            (C::F32(x), C::F32(w)) => C::F32(go(&x[xa..xb], &w[wa..wb], m, n, k)),
            // f32 activations over half-precision weights (the CPU's compute dtype)
            (C::F32(x), C::F16(w)) => C::F32(go_f32(&x[xa..xb], &w[wa..wb], m, n, k)),
            (C::F32(x), C::BF16(w)) => C::F32(go_f32(&x[xa..xb], &w[wa..wb], m, n, k)),
            (C::F16(x), C::F16(w)) => {
                C::F16(go(&x[xa..xb], &w[wa..wb], m, n, k).into_iter().map(half::f16::from_f32).collect())
            }
            (C::BF16(x), C::BF16(w)) => {
                C::BF16(go(&x[xa..xb], &w[wa..wb], m, n, k).into_iter().map(half::bf16::from_f32).collect())
            }
            _ => candle_core::bail!("dense matmul: input and weight must share a float dtype"),
        };
        Ok((out, candle_core::Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // y = x Wᵀ: dx = dy W, dW = dyᵀ x (in the weight's dtype)
        let dx = grad.matmul(&w.to_dtype(grad.dtype())?)?;
        let dw = grad.t()?.matmul(x)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Token embeddings, dense or quantized; `as_linear` serves as the tied lm head.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense { weight: Tensor, act_dtype: DType },
    Quantized(QuantizedWeight),
}

impl Embedding {
    pub fn load(ld: &Loader, prefix: &str, vocab: usize, dim: usize) -> Result<Self> {
        if let Some(params) = ld.quant_params(prefix, dim)? {
            return Ok(Embedding::Quantized(QuantizedWeight::load(ld, prefix, vocab, dim, params)?));
        }
        Ok(Embedding::Dense { weight: ld.matrix(&format!("{prefix}.weight"), &[vocab, dim])?, act_dtype: ld.act_dtype })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let rows = match self {
            Embedding::Dense { weight, act_dtype } => weight.index_select(&flat, 0)?.to_dtype(*act_dtype)?,
            Embedding::Quantized(q) => q.gather_rows(&flat)?.to_dtype(q.compute_dtype)?,
        };
        let mut out = shape;
        out.push(rows.dim(1)?);
        Ok(rows.reshape(out)?)
    }

    /// `x Eᵀ`: the embedding matrix used as the output projection (tied lm head).
    pub fn as_linear(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense { weight, .. } => dense_matmul(x, weight),
            Embedding::Quantized(q) => q.matmul(x),
        }
    }
}

/// RMSNorm with a learned scale, computed in f32 internally.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
    /// Added to the weight in each pass (a trained gemma weight); 0 otherwise.
    shift: f64,
}

impl RmsNorm {
    pub fn load(ld: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Self::load_shifted(ld, name, dim, eps, 0.0)
    }

    /// Scale by `shift + weight` (gemma stores the weight as an offset from 1).
    /// A trained weight (full fine-tuning) keeps its shift apart and adds it in each pass, as
    /// the optimizer updates the weight in place.
    pub fn load_shifted(ld: &Loader, name: &str, dim: usize, eps: f64, shift: f64) -> Result<Self> {
        let weight = ld.tensor(&format!("{name}.weight"), &[dim])?;
        if weight.is_variable() || shift == 0.0 {
            return Ok(Self { weight, eps: eps as f32, shift });
        }
        Ok(Self { weight: (weight + shift)?, eps: eps as f32, shift: 0.0 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() {
            // training: candle's fused kernel has no backward; the same formula in tensor ops
            let x32 = x.to_dtype(DType::F32)?;
            let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
            let w = (self.weight.to_dtype(DType::F32)? + self.shift)?;
            return Ok(x32.broadcast_mul(&inv)?.broadcast_mul(&w)?.to_dtype(x.dtype())?);
        }
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }

    /// The residual add before the norm: `(x + r, norm(x + r))`, in one CUDA kernel where it
    /// applies (inference, same dtypes, contiguous; the same values as the two ops); without
    /// `r`, `(x, norm(x))`.
    pub fn forward_residual(&self, x: &Tensor, r: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let Some(r) = r else { return Ok((x.clone(), self.forward(x)?)) };
        #[cfg(feature = "cuda")]
        if x.device().is_cuda()
            && !(x.track_op() || r.track_op() || self.weight.track_op())
            && self.shift == 0.0
            && x.dtype() == r.dtype()
            && x.dtype() == self.weight.dtype()
            && x.shape() == r.shape()
            && x.dim(D::Minus1)? <= crate::cuda::ADD_RMS_NORM_MAX_DIM
        {
            let both = x.contiguous()?.apply_op3_no_bwd(
                &r.contiguous()?,
                &self.weight.contiguous()?,
                &crate::cuda::AddRmsNorm { eps: self.eps },
            )?;
            return Ok((both.get(1)?, both.get(0)?));
        }
        let h = (x + r)?;
        let n = self.forward(&h)?;
        Ok((h, n))
    }

    /// The norm of `x` plus the residual branch `pending` (none, a tensor, or a projection not
    /// yet run: see [`Pending`]): `(h, norm(h))`. With a projection and `next` (the weights
    /// of the matmuls that take the norm) the norm is deferred where the CUDA decode kernels
    /// apply: one launch runs the projection, adds the residual and leaves the norm's scale to
    /// the next fused matmul ([`Normed::Deferred`]).
    pub fn forward_pending(&self, x: &Tensor, pending: Option<&Pending>, next: &[&Linear]) -> Result<(Tensor, Normed)> {
        if let (Some(Pending::Projection(a, Linear::Quantized { weight, bias: None })), Some(next)) =
            (pending, quantized_weights(next))
        {
            if self.shift == 0.0 && deferred_norms_enabled() {
                if let Some(carrier) = crate::quant::matmul::deferred_norm(a, weight, x, &self.weight, &next)? {
                    DEFERRED_NORMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let d = DeferredNorm::new(carrier, x.shape(), self.clone())?;
                    return Ok((d.h.clone(), Normed::Deferred(d)));
                }
            }
        }
        let (h, n) = self.forward_residual(x, Pending::resolve(pending)?.as_ref())?;
        Ok((h, Normed::Plain(n)))
    }
}

/// A layer's last residual branch, left for the next norm to add (see
/// [`crate::models::blocks::Layer::forward_deferred`]): computed, or the projection that will
/// compute it (so that the norm may run it: [`RmsNorm::forward_pending`]).
#[derive(Clone)]
pub enum Pending<'a> {
    Branch(Tensor),
    /// `input · Wᵀ` of this input and layer
    Projection(Tensor, &'a Linear),
}

impl Pending<'_> {
    /// The branch as a tensor (the projection run).
    pub fn resolve(p: Option<&Self>) -> Result<Option<Tensor>> {
        p.map(|p| match p {
            Pending::Branch(t) => Ok(t.clone()),
            Pending::Projection(x, l) => l.forward(x),
        })
        .transpose()
    }

    /// Positions `start .. start + len` along `dim` (of the branch, or the projection's input).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Pending::Branch(t) => Pending::Branch(t.narrow(dim, start, len)?),
            Pending::Projection(x, l) => Pending::Projection(x.narrow(dim, start, len)?, l),
        })
    }
}

/// A norm's output as the next matmuls take it.
pub enum Normed {
    Plain(Tensor),
    /// CUDA decode: the residual sum and the carrier from which the next fused matmul finishes
    /// the norm ([`crate::quant::matmul::deferred_norm`])
    Deferred(DeferredNorm),
}

/// See [`Normed::Deferred`].
pub struct DeferredNorm {
    carrier: Tensor,
    /// the residual sum the norm is of (the norm's input, shaped as the layer's hidden states)
    h: Tensor,
    norm: RmsNorm,
}

impl DeferredNorm {
    fn new(carrier: Tensor, shape: &candle_core::Shape, norm: RmsNorm) -> Result<Self> {
        let d = shape.dims().last().copied().unwrap_or(0);
        let h = carrier.narrow(0, d, d)?.reshape(shape)?;
        Ok(Self { carrier, h, norm })
    }

    /// The norm input's leading dimensions (all but the features).
    fn lead(&self) -> &[usize] {
        &self.h.dims()[..self.h.rank() - 1]
    }
}

impl Normed {
    /// The normalized tensor (a deferred norm computed from its input as [`RmsNorm::forward`]).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Normed::Plain(t) => Ok(t.clone()),
            Normed::Deferred(d) => d.norm.forward(&d.h),
        }
    }

    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        Ok(match self {
            Normed::Plain(t) => t.dims3()?,
            Normed::Deferred(d) => d.h.dims3()?,
        })
    }
}

/// Norms deferred into the next matmul so far ([`RmsNorm::forward_pending`]; a replayed CUDA graph
/// defers without counting).
pub static DEFERRED_NORMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static DEFERRED_NORMS_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the deferred norm off (`false`) or back on; also off with `WICK_DEFERRED_NORM=0`.
pub fn set_deferred_norms(on: bool) {
    DEFERRED_NORMS_OFF.store(!on, std::sync::atomic::Ordering::Relaxed);
}

fn deferred_norms_enabled() -> bool {
    static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !DEFERRED_NORMS_OFF.load(std::sync::atomic::Ordering::Relaxed)
        && !*ENV_OFF.get_or_init(|| std::env::var("WICK_DEFERRED_NORM").is_ok_and(|v| v == "0"))
}

/// The quantized weights of bias-free quantized layers, or `None` (also for no layers).
fn quantized_weights<'a>(ls: &[&'a Linear]) -> Option<Vec<&'a QuantizedWeight>> {
    if ls.is_empty() {
        return None;
    }
    ls.iter()
        .map(|l| match l {
            Linear::Quantized { weight, bias: None } => Some(weight),
            _ => None,
        })
        .collect()
}

/// LayerNorm with a learned scale and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(ld: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: ld.tensor(&format!("{name}.weight"), &[dim])?,
            bias: ld.tensor(&format!("{name}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() || self.bias.track_op() {
            // training: the fused kernel has no backward
            let x32 = x.to_dtype(DType::F32)?;
            let c = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
            let inv = (c.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
            let y = c.broadcast_mul(&inv)?.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?;
            return Ok(y.broadcast_add(&self.bias.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?);
        }
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)?)
    }
}

/// Rotary position embeddings over the first `dims` features of each head, as mlx's `nn.RoPE`
/// (non-traditional: rotate halves) with per-frequency periods (`freqs`, so llama3/linear
/// scaling is folded in) and a position `scale`.
#[derive(Debug, Clone)]
pub struct Rope {
    dims: usize,
    traditional: bool,
    /// inverse periods, one per rotated pair
    inv_freq: Vec<f32>,
    /// position scale (linear scaling)
    scale: f32,
    /// multiplies the rotated features (yarn's mscale, longrope's scale)
    input_scale: f32,
    /// dynamic NTK: (factor, max_position_embeddings, base), the base grows with the sequence
    dynamic: Option<(f64, usize, f64)>,
    /// CUDA: the tables of positions 0..n on the device (see [`Rope::tables`])
    on_device: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

/// `base^(2i/dims)` for each rotated pair, as mlx computes them (f32).
fn periods(base: f64, dims: usize) -> Vec<f64> {
    (0..dims / 2).map(|i| (base as f32).powf(2.0 * i as f32 / dims as f32) as f64).collect()
}

/// Inverse periods (angular frequencies), in f32 as the tables use them.
fn inverse(periods: &[f64]) -> Vec<f32> {
    periods.iter().map(|p| (1.0 / p) as f32).collect()
}

impl Rope {
    fn with_periods(dims: usize, traditional: bool, periods: &[f64], scale: f64, input_scale: f64) -> Self {
        Self {
            dims,
            traditional,
            inv_freq: inverse(periods),
            scale: scale as f32,
            input_scale: input_scale as f32,
            dynamic: None,
            on_device: Arc::default(),
        }
    }

    /// Phi-3's "su" / "longrope" scaling (mlx_lm's SuScaledRoPE, which always uses the long
    /// factors): periods times `long_factor`, features scaled by `long_mscale` or
    /// `sqrt(1 + ln(max / original) / ln(original))`.
    pub fn su_scaled(
        dims: usize,
        base: f64,
        max_position_embeddings: usize,
        original: usize,
        long_factor: &serde_json::Value,
        long_mscale: Option<f64>,
    ) -> Result<Self> {
        let base_periods = periods(base, dims);
        let factors: Vec<f64> = match long_factor {
            serde_json::Value::Array(a) => {
                a.iter().map(|v| v.as_f64().context("long_factor: expected numbers")).collect::<Result<_>>()?
            }
            v => vec![v.as_f64().context("long_factor: expected a number or a list")?; base_periods.len()],
        };
        if factors.len() != base_periods.len() {
            anyhow::bail!(
                "rope_scaling.long_factor has {} entries, expected {} (rotary dims / 2)",
                factors.len(),
                base_periods.len()
            );
        }
        let p: Vec<f64> = factors.iter().zip(&base_periods).map(|(f, p)| (*f as f32 * *p as f32) as f64).collect();
        let factor = max_position_embeddings as f64 / original as f64;
        let mscale = long_mscale.unwrap_or(if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        });
        Ok(Self::with_periods(dims, false, &p, 1.0, mscale))
    }

    /// Builds the RoPE an mlx_lm config asks for (`rope_theta`, `rope_scaling`), as mlx_lm's
    /// `initialize_rope`: default, linear, llama3, yarn, longrope, dynamic.
    pub fn from_config(
        dims: usize,
        base: f64,
        traditional: bool,
        scaling: Option<&serde_json::Value>,
        max_position_embeddings: Option<usize>,
    ) -> Result<Self> {
        let kind = scaling
            .and_then(|s| s.get("type").or_else(|| s.get("rope_type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let get = |k: &str| -> Option<f64> { scaling.and_then(|s| s.get(k)).and_then(|v| v.as_f64()) };
        let need = |k: &str| get(k).with_context(|| format!("rope_scaling of type {kind} needs `{k}`"));
        let mut p = periods(base, dims);
        match kind {
            "default" => Ok(Self::with_periods(dims, traditional, &p, 1.0, 1.0)),
            "linear" => Ok(Self::with_periods(dims, traditional, &p, 1.0 / need("factor")?, 1.0)),
            "llama3" => {
                let factor = need("factor")?;
                let low = get("low_freq_factor").unwrap_or(1.0);
                let high = get("high_freq_factor").unwrap_or(4.0);
                let old_ctx = get("original_max_position_embeddings").unwrap_or(8192.0);
                let (low_wl, high_wl) = (old_ctx / low, old_ctx / high);
                for p in p.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI * *p;
                    let f = if wavelen > low_wl { *p * factor } else { *p };
                    *p = if wavelen > high_wl && wavelen < low_wl {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        f / ((1.0 - smooth) / factor + smooth)
                    } else {
                        f
                    };
                }
                Ok(Self::with_periods(dims, traditional, &p, 1.0, 1.0))
            }
            "yarn" | "deepseek_yarn" => {
                let factor = need("factor")?;
                let orig = get("original_max_position_embeddings").unwrap_or(4096.0);
                let (beta_fast, beta_slow) = (get("beta_fast").unwrap_or(32.0), get("beta_slow").unwrap_or(1.0));
                let (mscale, mscale_all) = (get("mscale").unwrap_or(1.0), get("mscale_all_dim").unwrap_or(0.0));
                let corr = |rot: f64| dims as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
                let low = corr(beta_fast).floor().max(0.0);
                let high = corr(beta_slow).ceil().min(dims as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let get_mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
                for (i, p) in p.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let mask = 1.0 - ramp;
                    let (extra, inter) = (*p, factor * *p);
                    *p = inter * extra / (inter * mask + extra * (1.0 - mask));
                }
                Ok(Self::with_periods(dims, traditional, &p, 1.0, get_mscale(mscale) / get_mscale(mscale_all)))
            }
            "longrope" => {
                let s = scaling.expect("a kind other than default comes from a scaling block");
                let orig = need("original_max_position_embeddings")? as usize;
                let max = max_position_embeddings.context("longrope RoPE needs max_position_embeddings")?;
                let long = s.get("long_factor").context("rope_scaling of type longrope needs `long_factor`")?;
                Self::su_scaled(dims, base, max, orig, long, None)
            }
            "dynamic" => {
                let max = max_position_embeddings.context("dynamic RoPE needs max_position_embeddings")?;
                let mut r = Self::with_periods(dims, traditional, &p, 1.0, 1.0);
                r.dynamic = Some((need("factor")?, max, base));
                Ok(r)
            }
            other => anyhow::bail!(
                "rope_scaling type `{other}` is not supported (supported: default, linear, llama3, yarn, longrope, dynamic)"
            ),
        }
    }

    /// cos/sin tables for positions `offset .. offset + len`, computed once per forward pass and
    /// shared by every layer that uses this RoPE.
    pub fn tables(&self, offset: usize, len: usize, dtype: DType, device: &Device) -> Result<RopeTables> {
        if device.is_cuda() && self.dynamic.is_none() {
            // the same values as below, computed once for positions 0..n (a power of two)
            // and kept on the device: a prompt's tables are then a view, instead of ~0.3 µs of
            // host trigonometry per position and an upload before every prefill
            let mut kept = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |(c, _): &(Tensor, Tensor)| {
                c.dtype() == dtype && c.device().same_device(device) && c.dim(0).is_ok_and(|n| n >= offset + len)
            };
            if !kept.as_ref().is_some_and(fits) {
                let n = (offset + len).next_power_of_two().max(1024);
                let t = self.tables_at(&(0..n).collect::<Vec<_>>(), &[n], n, dtype, device)?;
                *kept = Some((t.cos, t.sin));
            }
            let (cos, sin) = kept.as_ref().expect("kept above");
            let (cos, sin) = (cos.narrow(0, offset, len)?, sin.narrow(0, offset, len)?);
            return Ok(RopeTables { cos, sin, dims: self.dims, traditional: self.traditional });
        }
        let positions: Vec<usize> = (offset..offset + len).collect();
        self.tables_at(&positions, &[len], offset + len, dtype, device)
    }

    /// Tables for a left-padded batch: row `b`'s query `i` sits at index `offset + i` of the
    /// cache, which is its position `offset + i - left_padding[b]` (padding queries get 0).
    pub fn batch_tables(
        &self,
        offset: usize,
        len: usize,
        left_padding: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let positions: Vec<usize> =
            left_padding.iter().flat_map(|&p| (offset..offset + len).map(move |i| i.saturating_sub(p))).collect();
        self.tables_at(&positions, &[left_padding.len(), len], offset + len, dtype, device)
    }

    /// cos/sin for the given positions, shaped `lead` × half the rotated dims; `seq` is the
    /// sequence length the dynamic-NTK base is computed for.
    fn tables_at(
        &self,
        positions: &[usize],
        lead: &[usize],
        seq: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let (cos, sin) = self.host_tables(positions, seq);
        let shape = [lead, &[self.inv_freq.len()]].concat();
        let cos = Tensor::from_vec(cos, shape.clone(), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok(RopeTables { cos, sin, dims: self.dims, traditional: self.traditional })
    }

    /// Tables of one position per batch row whose values are written in place before each
    /// replay of a captured decode step ([`RopeTables::write_positions`]).
    pub fn position_tables(&self, rows: usize, dtype: DType, device: &Device) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let cos = Tensor::zeros((rows, 1, half), dtype, device)?;
        Ok(RopeTables { cos: cos.clone(), sin: cos.zeros_like()?, dims: self.dims, traditional: self.traditional })
    }

    /// The f32 cos/sin values for `positions` (row-major, half the rotated dims per position).
    fn host_tables(&self, positions: &[usize], seq: usize) -> (Vec<f32>, Vec<f32>) {
        let dyn_freq;
        let inv_freq = match self.dynamic {
            Some((factor, max, base)) => {
                // mlx_lm's DynamicNTKScalingRoPE: the base for this call's sequence length
                let seq = seq.max(max) as f64;
                let d = self.dims as f64;
                let b = base * ((factor * seq / max as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                dyn_freq = inverse(&periods(b, self.dims));
                &dyn_freq
            }
            None => &self.inv_freq,
        };
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let pos = p as f32 * self.scale;
            for f in inv_freq {
                let theta = pos * f;
                cos.push(theta.cos() * self.input_scale);
                sin.push(theta.sin() * self.input_scale);
            }
        }
        (cos, sin)
    }
}

/// RoPE tables for one forward pass.
#[derive(Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    dims: usize,
    traditional: bool,
}

impl RopeTables {
    /// Writes each row's position into tables made by [`Rope::position_tables`] (host to device
    /// copies outside any kernel, so a captured graph reads them at replay); `seq`: the
    /// sequence length of the step, as [`Rope::batch_tables`] takes it (offset + 1).
    #[cfg(feature = "cuda")]
    pub fn write_positions(&self, rope: &Rope, positions: &[usize], seq: usize) -> Result<()> {
        let (cos, sin) = rope.host_tables(positions, seq);
        crate::cuda::upload_f32(&self.cos, &cos)?;
        crate::cuda::upload_f32(&self.sin, &sin)?;
        Ok(())
    }

    /// Applies RoPE to `x` of shape (B, heads, L, head_dim).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(3)?;
        let rot = if self.dims < head_dim { x.narrow(D::Minus1, 0, self.dims)?.contiguous()? } else { x.contiguous()? };
        // training: candle's fused kernels have no backward; their tensor-op forms do
        let out = match (self.traditional, rot.track_op()) {
            (true, false) => candle_nn::rotary_emb::rope_i(&rot, &self.cos, &self.sin)?,
            (false, false) => candle_nn::rotary_emb::rope(&rot, &self.cos, &self.sin)?,
            (true, true) => candle_nn::rotary_emb::rope_i_slow(&rot, &self.cos, &self.sin)?,
            (false, true) => candle_nn::rotary_emb::rope_slow(&rot, &self.cos, &self.sin)?,
        };
        if self.dims < head_dim {
            let pass = x.narrow(D::Minus1, self.dims, head_dim - self.dims)?;
            Ok(Tensor::cat(&[&out, &pass], D::Minus1)?)
        } else {
            Ok(out)
        }
    }
}

/// A decode step captured into a CUDA graph ([`MaskSpec::pos`]): RoPE of `q` and `k`, the
/// cache write of `k` and `v` and the attention of `q` over the cache in one kernel
/// (`crate::cuda::DecodeStep`); returns the attention's output (B, H, 1, D). `None`: the step
/// does not fit the kernel (RoPE over part of the head, another cache dtype, value heads of
/// another size, too many heads); apply RoPE, update the cache and attend the usual way.
#[allow(clippy::too_many_arguments)]
pub fn decode_step_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &RopeTables,
    mask: &crate::cache::MaskSpec,
    cache: &crate::cache::KvCache,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let (Some(pos), Some((keys, values))) = (&mask.pos, cache.buffers()) {
        let (b, h, _, d) = q.dims4()?;
        if rope.dims == d
            && k.dim(3)? == d
            && v.dim(3)? == d
            && b * h <= crate::cuda::STEP_COUNTERS
            && rope.cos.dtype() == q.dtype()
            && own_decode_attention(q, &keys, &values)?
        {
            let op = crate::cuda::DecodeStep {
                cos: rope.cos.clone(),
                sin: rope.sin.clone(),
                traditional: rope.traditional,
                pos: pos.pos.clone(),
                starts: pos.starts.clone(),
                done: pos.done.clone(),
                keys,
                values,
                scale: scale as f32,
                softcap: softcap.map(|c| c as f32),
            };
            let out = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
            return Ok(Some(out));
        }
    }
    let _ = (q, k, v, rope, mask, cache, scale, softcap);
    Ok(None)
}

/// Causal attention of `q` (B, H, L, D) over `k`, `v` (B, KV, T, D), the queries at key indices
/// `mask.offset ..` (optionally within a sliding window); grouped-query heads share their KV head
/// without copying it.
///
/// With `softcap`, scores become `softcap · tanh(scores / softcap)` before the mask (gemma2).
/// One query (decode) runs wick's decode-attention kernel (CPU and CUDA); several on CUDA in
/// f16 / bf16 run the flash-attention kernel (`crate::cuda::PrefillAttention`); the rest go
/// through matmul, mask and softmax.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: MaskSpec,
    softcap: Option<f64>,
) -> Result<Tensor> {
    if q.dim(2)? == 1 && !q.track_op() && k.stride()[3] == 1 && v.stride()[3] == 1 && own_decode_attention(q, k, v)? {
        let op = DecodeAttention {
            scale: scale as f32,
            softcap: softcap.map(|c| c as f32),
            starts: mask.left_padding,
            pos: mask.pos,
        };
        return Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?);
    }
    if mask.pos.is_some() {
        anyhow::bail!("a decode step captured into a CUDA graph needs wick's decode-attention kernel");
    }
    #[cfg(feature = "cuda")]
    if q.dim(2)? > 1 && crate::cuda::PrefillAttention::fits(q, k, v)? {
        let op = crate::cuda::PrefillAttention {
            scale: scale as f32,
            softcap: softcap.map(|c| c as f32),
            offset: mask.offset,
            window: mask.window,
            starts: mask.left_padding,
        };
        // the kernel writes (B, L, H, D): the callers' transpose back is then free
        return Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2)?);
    }
    let (b, h, l, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let t = k.dim(2)?;
    let n_rep = h / kv;
    let q = (q.reshape((b, kv, n_rep * l, d))? * scale)?;
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let scores = match softcap {
        Some(c) => ((scores / c)?.tanh()? * c)?,
        None => scores,
    };
    let scores = if l > 1 || mask.left_padding.is_some() {
        let mask = causal_mask(n_rep, l, t, &mask, q.device())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)? // differentiable (training)
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = probs.to_dtype(v.dtype())?;
    let out = probs.matmul(&v.contiguous()?)?;
    Ok(out.reshape((b, h, l, v.dim(3)?))?)
}

/// Additive mask (n_rep·L, T): query `i` (at key index offset + i) sees keys `j <= offset + i`,
/// and with a window only `j > offset + i - window`. With left padding it is (B, 1, n_rep·L, T)
/// and row `b` sees no key before `left_padding[b]`; a padding query sees only itself, so that
/// its softmax stays finite.
fn causal_mask(n_rep: usize, l: usize, t: usize, spec: &MaskSpec, device: &Device) -> Result<Tensor> {
    // Every layer of one forward pass asks for the same mask: build and upload it once.
    type Key = (usize, usize, usize, MaskSpec);
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Key, Tensor)>> = const { std::cell::RefCell::new(None) };
    }
    let key: Key = (n_rep, l, t, spec.clone());
    let hit = |(k, m): &(Key, Tensor)| *k == key && m.device().same_device(device);
    if let Some(m) = LAST.with_borrow(|last| last.as_ref().filter(|e| hit(e)).map(|(_, m)| m.clone())) {
        return Ok(m);
    }
    let m = build_causal_mask(n_rep, l, t, spec, device)?;
    LAST.with_borrow_mut(|last| *last = Some((key, m.clone())));
    Ok(m)
}

fn build_causal_mask(n_rep: usize, l: usize, t: usize, spec: &MaskSpec, device: &Device) -> Result<Tensor> {
    let pads: &[usize] = spec.left_padding.as_deref().unwrap_or(&[0]);
    let mut m = Vec::with_capacity(pads.len() * n_rep * l * t);
    for &pad in pads {
        for _ in 0..n_rep {
            for i in 0..l {
                let q = spec.offset + i;
                for j in 0..t {
                    let visible = j <= q && spec.window.is_none_or(|w| j + w > q) && (j >= pad || j == q);
                    m.push(if visible { 0.0 } else { f32::NEG_INFINITY });
                }
            }
        }
    }
    Ok(match spec.left_padding {
        Some(_) => Tensor::from_vec(m, (pads.len(), 1, n_rep * l, t), device)?,
        None => Tensor::from_vec(m, (n_rep * l, t), device)?,
    })
}

/// `(x Qᵀ, x Kᵀ, x Vᵀ)` with one fused kernel where the backend has one (CUDA decode with
/// bias-free quantized projections); `None`: run them one by one.
/// A deferred norm's input ([`Normed::Deferred`]) always takes it: [`RmsNorm::forward_pending`]
/// deferred it for these weights.
pub fn fused_qkv(x: &Normed, q: &Linear, k: &Linear, v: &Linear) -> Result<Option<[Tensor; 3]>> {
    let Some([qw, kw, vw]) = quantized_weights(&[q, k, v]).map(|w| [w[0], w[1], w[2]]) else { return Ok(None) };
    match x {
        Normed::Plain(x) => crate::quant::matmul::fused_qkv(x, qw, kw, vw),
        Normed::Deferred(d) => {
            Ok(Some(crate::quant::matmul::fused_qkv_deferred(&d.carrier, d.norm.eps, d.lead(), qw, kw, vw)?))
        }
    }
}

/// `silu(x Gᵀ) · (x Uᵀ)` with one fused kernel where the backend has one; `None`: run the
/// projections and the activation separately.
/// A deferred norm's input takes it as [`fused_qkv`]'s.
pub fn fused_swiglu(x: &Normed, gate: &Linear, up: &Linear) -> Result<Option<Tensor>> {
    let Some([g, u]) = quantized_weights(&[gate, up]).map(|w| [w[0], w[1]]) else { return Ok(None) };
    match x {
        Normed::Plain(x) => crate::quant::matmul::fused_swiglu(x, g, u),
        Normed::Deferred(d) => {
            Ok(Some(crate::quant::matmul::fused_swiglu_deferred(&d.carrier, d.norm.eps, d.lead(), g, u)?))
        }
    }
}

/// SwiGLU activation: `silu(gate) * up` (one kernel on CUDA in f16 / bf16 where
/// `crate::cuda::SwiGlu` fits, rounded once).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::SwiGlu::fits(gate, up) {
        return Ok(gate.apply_op2_no_bwd(up, &crate::cuda::SwiGlu)?);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

/// A plain module wrapper so candle's `Module` users can call our layers.
impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(candle_core::Error::wrap)
    }
}

/// Whether [`DecodeAttention`] runs this decode step: always on the CPU; on CUDA within the
/// kernel's limits (head size at most 256, whole query heads per KV head, one dtype). The fused
/// step of a CUDA graph ([`decode_step_attention`]) shares them.
fn own_decode_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    if q.device().is_cpu() {
        return Ok(true);
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let (h, kvh) = (q.dim(1)?, k.dim(1)?);
        let ok = h % kvh == 0
            && q.dim(3)? <= crate::cuda::ATTN_MAX_HEAD_DIM
            && v.dim(3)? <= crate::cuda::ATTN_MAX_HEAD_DIM
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype();
        return Ok(ok);
    }
    let _ = (k, v);
    Ok(false)
}

/// Attention of one query position over the whole cache on the CPU (the decode step): per head,
/// scores by dot products against the strided cache, softmax in f32, weighted sum of values.
struct DecodeAttention {
    scale: f32,
    softcap: Option<f32>,
    /// per batch row, the first key it may see (left padding)
    starts: Option<std::sync::Arc<[usize]>>,
    /// CUDA graphs: the device position the keys end at (`k`, `v` are the whole cache buffer)
    /// and the rows' first keys, read there instead of `starts`
    pos: Option<crate::cache::DevicePos>,
}

impl candle_core::CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CudaStorage,
        kl: &candle_core::Layout,
        vs: &candle_core::CudaStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (starts, pos) = (self.starts.as_deref(), self.pos.as_ref());
        let pos = pos.map(|p| (&p.pos, &p.starts));
        crate::cuda::decode_attention((qs, ql), (ks, kl), (vs, vl), self.scale, self.softcap, starts, pos)
    }

    fn cpu_fwd(
        &self,
        qs: &candle_core::CpuStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CpuStorage,
        kl: &candle_core::Layout,
        vs: &candle_core::CpuStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use crate::kernels::Elem;
        use candle_core::CpuStorage as C;
        let (b, h, _, d) = ql.shape().dims4()?;
        let (_, kvh, t, _) = kl.shape().dims4()?;
        let dv = vl.shape().dims4()?.3;
        let n_rep = h / kvh;
        let (qa, _) = ql.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("query not contiguous".into()))?;
        let (scale, softcap) = (self.scale, self.softcap);
        if self.pos.is_some() {
            candle_core::bail!("decode attention at a device position runs on CUDA only");
        }
        let starts: &[usize] = self.starts.as_deref().unwrap_or(&[]);
        #[allow(clippy::too_many_arguments)]
        fn go<T: Elem>(
            q: &[T],
            k: &[T],
            v: &[T],
            kl: &candle_core::Layout,
            vl: &candle_core::Layout,
            dims: (usize, usize, usize, usize, usize, usize, usize),
            (scale, softcap): (f32, Option<f32>),
            starts: &[usize],
        ) -> Vec<T> {
            use rayon::prelude::*;
            let (b, h, d, dv, t, n_rep, _kvh) = dims;
            let (ks, vs) = (kl.stride(), vl.stride());
            let (ko, vo) = (kl.start_offset(), vl.start_offset());
            let mut out = vec![T::from_f32(0.0); b * h * dv];
            // one (batch, head) pair per task (a head over 32+ positions outweighs a rayon
            // dispatch); tiny contexts stay on this thread
            let head = |bh: usize, o: &mut [T]| {
                let (bi, hi) = (bh / h, bh % h);
                let kv = hi / n_rep;
                let mut qf = vec![0f32; d];
                T::to_f32_slice(&q[bh * d..(bh + 1) * d], &mut qf);
                let kbase = ko + bi * ks[0] + kv * ks[1];
                let first = starts.get(bi).copied().unwrap_or(0).min(t.saturating_sub(1));
                let mut scores = vec![0f32; t];
                let mut max = f32::NEG_INFINITY;
                for (ti, sc) in scores.iter_mut().enumerate().skip(first) {
                    let row = &k[kbase + ti * ks[2]..kbase + ti * ks[2] + d];
                    *sc = T::dot(&qf, row) * scale;
                    if let Some(c) = softcap {
                        *sc = c * (*sc / c).tanh();
                    }
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut().skip(first) {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let mut acc = vec![0f32; dv];
                let vbase = vo + bi * vs[0] + kv * vs[1];
                for (ti, sc) in scores.iter().enumerate().skip(first) {
                    T::axpy(sc / sum, &v[vbase + ti * vs[2]..vbase + ti * vs[2] + dv], &mut acc);
                }
                for (x, a) in o.iter_mut().zip(&acc) {
                    *x = T::from_f32(*a);
                }
            };
            if t * b * h >= 256 {
                out.par_chunks_mut(dv).enumerate().for_each(|(bh, o)| head(bh, o));
            } else {
                out.chunks_mut(dv).enumerate().for_each(|(bh, o)| head(bh, o));
            }
            out
        }
        let dims = (b, h, d, dv, t, n_rep, kvh);
        let out = match (qs, ks, vs) {
            (C::F32(q), C::F32(k), C::F32(v)) => C::F32(go(&q[qa..], k, v, kl, vl, dims, (scale, softcap), starts)),
            (C::F16(q), C::F16(k), C::F16(v)) => C::F16(go(&q[qa..], k, v, kl, vl, dims, (scale, softcap), starts)),
            (C::BF16(q), C::BF16(k), C::BF16(v)) => C::BF16(go(&q[qa..], k, v, kl, vl, dims, (scale, softcap), starts)),
            _ => candle_core::bail!("decode attention: q, k and v must share a float dtype"),
        };
        Ok((out, candle_core::Shape::from((b, h, 1, dv))))
    }
}
