//! Shared layers every architecture is built from: `Linear` (dense or quantized),
//! `Embedding` (dense or quantized, also the tied lm head), `RmsNorm`, `Rope`.

use crate::load::Weights;
use crate::quant::{QuantSpec, QuantizedWeight};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};

/// What every layer constructor needs: the weights, the compute dtype and device, and which
/// layers the config's `quantization` block says are quantized.
pub struct Loader<'a> {
    pub weights: &'a Weights,
    pub dtype: DType,
    pub device: Device,
    pub quant: Option<&'a QuantSpec>,
}

impl Loader<'_> {
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(name, shape, self.dtype, &self.device)
    }
}

/// A linear layer `y = x Wᵀ + b`, dense or MLX-affine-quantized.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Quantized {
        weight: QuantizedWeight,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// Loads `{prefix}.weight` (and `.bias` when `bias`), quantized when the config says so.
    pub fn load(
        ld: &Loader,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let bias = if bias {
            Some(ld.tensor(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        if let Some(params) = ld.quant.and_then(|q| q.params_for(prefix)) {
            let weight = QuantizedWeight::load(ld, prefix, out_dim, in_dim, params)?;
            return Ok(Linear::Quantized { weight, bias });
        }
        let weight = ld.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        Ok(Linear::Dense { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Linear::Dense { weight, bias } => (dense_matmul(x, weight)?, bias),
            Linear::Quantized { weight, bias } => (weight.matmul(x)?, bias),
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x Wᵀ` for `x` of any rank (…, in) and `W` (out, in).
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().context("matmul input has no dimensions")?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, in_dim))?;
    let y = x2.matmul(&w.t()?)?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    Ok(y.reshape(out_dims)?)
}

/// Token embeddings, dense or quantized; `as_linear` serves as the tied lm head.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(QuantizedWeight),
}

impl Embedding {
    pub fn load(ld: &Loader, prefix: &str, vocab: usize, dim: usize) -> Result<Self> {
        if let Some(params) = ld.quant.and_then(|q| q.params_for(prefix)) {
            return Ok(Embedding::Quantized(QuantizedWeight::load(
                ld, prefix, vocab, dim, params,
            )?));
        }
        Ok(Embedding::Dense(
            ld.tensor(&format!("{prefix}.weight"), &[vocab, dim])?,
        ))
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let rows = match self {
            Embedding::Dense(w) => w.index_select(&flat, 0)?,
            Embedding::Quantized(q) => q.gather_rows(&flat)?,
        };
        let mut out = shape;
        out.push(rows.dim(1)?);
        Ok(rows.reshape(out)?)
    }

    /// `x Eᵀ`: the embedding matrix used as the output projection (tied lm head).
    pub fn as_linear(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(w) => dense_matmul(x, w),
            Embedding::Quantized(q) => q.matmul(x),
        }
    }
}

/// RMSNorm with a learned scale, computed in f32 internally.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(ld: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: ld.tensor(&format!("{name}.weight"), &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
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
    scale: f32,
}

impl Rope {
    /// Builds the RoPE an mlx_lm config asks for (`rope_theta`, `rope_scaling`).
    pub fn from_config(
        dims: usize,
        base: f64,
        traditional: bool,
        scaling: Option<&serde_json::Value>,
        max_position_embeddings: Option<usize>,
    ) -> Result<Self> {
        let half = dims / 2;
        let mut periods: Vec<f64> = (0..half)
            .map(|i| base.powf(2.0 * i as f64 / dims as f64))
            .collect();
        let mut scale = 1.0f64;
        let kind = scaling
            .and_then(|s| s.get("type").or_else(|| s.get("rope_type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let get =
            |k: &str| -> Option<f64> { scaling.and_then(|s| s.get(k)).and_then(|v| v.as_f64()) };
        match kind {
            "default" => {}
            "linear" => {
                let f = get("factor").context("rope_scaling of type linear needs `factor`")?;
                scale = 1.0 / f;
            }
            "llama3" => {
                let factor = get("factor").context("rope_scaling of type llama3 needs `factor`")?;
                let low = get("low_freq_factor").unwrap_or(1.0);
                let high = get("high_freq_factor").unwrap_or(4.0);
                let old_ctx = get("original_max_position_embeddings").unwrap_or(8192.0);
                let low_wl = old_ctx / low;
                let high_wl = old_ctx / high;
                for p in periods.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI * *p;
                    let f = if wavelen > low_wl { *p * factor } else { *p };
                    let medium = wavelen > high_wl && wavelen < low_wl;
                    *p = if medium {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        f / ((1.0 - smooth) / factor + smooth)
                    } else {
                        f
                    };
                }
            }
            other => anyhow::bail!(
                "rope_scaling type `{other}` is not supported yet (supported: default, linear, llama3)"
            ),
        }
        let _ = max_position_embeddings;
        Ok(Self {
            dims,
            traditional,
            inv_freq: periods.iter().map(|p| (1.0 / p) as f32).collect(),
            scale: scale as f32,
        })
    }

    /// cos/sin tables for positions `offset .. offset + len`, shape (len, dims/2), f32.
    fn tables(&self, offset: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            let pos = p as f32 * self.scale;
            for f in &self.inv_freq {
                let theta = pos * f;
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// Applies RoPE to `x` of shape (B, heads, L, head_dim) at positions starting at `offset`.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, len, head_dim) = x.dims4()?;
        let (cos, sin) = self.tables(offset, len, x.device())?;
        let dtype = x.dtype();
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let rot = if self.dims < head_dim {
            x.narrow(D::Minus1, 0, self.dims)?
        } else {
            x.clone()
        };
        let rot = rot.contiguous()?;
        let out = if self.traditional {
            candle_nn::rotary_emb::rope_i(&rot, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&rot, &cos, &sin)?
        };
        if self.dims < head_dim {
            let pass = x.narrow(D::Minus1, self.dims, head_dim - self.dims)?;
            Ok(Tensor::cat(&[&out, &pass], D::Minus1)?)
        } else {
            Ok(out)
        }
    }
}

/// SwiGLU activation: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

/// A plain module wrapper so candle's `Module` users can call our layers.
impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(candle_core::Error::wrap)
    }
}
