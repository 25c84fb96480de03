//! The Mamba-2 mixer (mlx_lm's `ssm.py` and the mixers of `granitemoehybrid.py` /
//! `nemotron_h.py`): `in_proj` gives the gate, x|B|C and the step sizes; x|B|C go through a
//! causal depthwise convolution (its last `kernel - 1` inputs kept in the cache) and SiLU; the
//! selective state space recurrence runs per head (state: head_dim × state size, f32):
//!
//! ```text
//! dt = clip(softplus(dt + dt_bias), lo, hi);  A = −exp(A_log)
//! S = exp(dt·A) · S + dt · x_t ⊗ B_t;         y_t = S · C_t + D · x_t
//! ```
//!
//! then an RMSNorm of `silu(gate) · y` and `out_proj`. mlx_lm computes a prefill in chunked
//! (SSD) form; the recurrence here is the same sum position by position (in f32 the two differ
//! by a few 1e-6).

use super::attention::SelfAttention;
use crate::cache::KvCache;
use crate::nn::{CausalConv1d, Linear, Loader, Normed, RmsNorm, RopeTables};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// The mixer's sizes.
#[derive(Debug, Clone, Copy)]
pub struct Mamba2Dims {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    pub kernel: usize,
}

pub struct Mamba2 {
    in_proj: Linear,
    conv1d: CausalConv1d,
    dt_bias: Tensor,
    /// −exp(A_log) (the exponential in A_log's dtype, as mlx_lm), f32
    a: Tensor,
    d: Tensor,
    norm: RmsNorm,
    out_proj: Linear,
    dims: Mamba2Dims,
    /// (lo, hi) of the step sizes
    time_step_limit: (f64, f64),
    /// the gated norm per group of heads (Nemotron-H), else over the whole inner size (Granite)
    pub norm_per_group: bool,
}

impl Mamba2 {
    /// `{p}.in_proj`, `{p}.conv1d`, `{p}.dt_bias`, `{p}.A_log`, `{p}.D`, `{p}.norm` (over the
    /// whole inner size, eps `eps`) and `{p}.out_proj`.
    pub fn load(
        ld: &Loader,
        p: &str,
        dim: usize,
        dims: Mamba2Dims,
        (proj_bias, conv_bias): (bool, bool),
        eps: f64,
        time_step_limit: (f64, f64),
    ) -> Result<Self> {
        let Mamba2Dims { heads, head_dim, groups, state, kernel } = dims;
        if groups == 0 || heads % groups != 0 {
            bail!("config.json: the Mamba heads ({heads}) must be a multiple of its groups ({groups})");
        }
        let inner = heads * head_dim;
        let conv_dim = inner + 2 * groups * state;
        Ok(Self {
            in_proj: Linear::load(ld, &format!("{p}.in_proj"), dim, inner + conv_dim + heads, proj_bias)?,
            conv1d: CausalConv1d::load(ld, &format!("{p}.conv1d"), conv_dim, kernel, conv_bias)?,
            dt_bias: ld.tensor(&format!("{p}.dt_bias"), &[heads])?.to_dtype(DType::F32)?,
            a: ld.tensor(&format!("{p}.A_log"), &[heads])?.exp()?.to_dtype(DType::F32)?.neg()?,
            d: ld.tensor(&format!("{p}.D"), &[heads])?,
            norm: RmsNorm::load(ld, &format!("{p}.norm"), inner, eps)?,
            out_proj: Linear::load(ld, &format!("{p}.out_proj"), inner, dim, proj_bias)?,
            dims,
            time_step_limit,
            norm_per_group: false,
        })
    }
}

/// `log(1 + eˣ)`, as `max(x, 0) + log1p(e^{−|x|})`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?))?)
}

/// The selective state space recurrence: `x` (B, S, H, P), `b`, `c` (B, S, G, N), `dt` (B, S, H,
/// f32, after softplus and clipping), `a` (H, f32, negative), the state (B, H, P, N; zeros when
/// None): y (B, S, H, P) in f32, and the new state.
pub fn ssm_update(
    x: &Tensor,
    b: &Tensor,
    c: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (bs, s, h, p) = x.dims4()?;
    let (_, _, g, n) = b.dims4()?;
    let per_group = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        Ok(if g == h { t } else { t.unsqueeze(3)?.broadcast_as((bs, s, g, h / g, n))?.reshape((bs, s, h, n))? })
    };
    let (b, c, x) = (per_group(b)?, per_group(c)?, x.to_dtype(DType::F32)?);
    let mut state = match state {
        Some(t) => t.to_dtype(DType::F32)?,
        None => Tensor::zeros((bs, h, p, n), DType::F32, x.device())?,
    };
    let decay = dt.broadcast_mul(a)?.exp()?; // (B, S, H)
    let dtx = x.broadcast_mul(&dt.unsqueeze(D::Minus1)?)?; // (B, S, H, P)
    let mut ys = Vec::with_capacity(s);
    for t in 0..s {
        let at = |v: &Tensor| -> Result<Tensor> { Ok(v.narrow(1, t, 1)?.squeeze(1)?) };
        let (bt, ct) = (at(&b)?.unsqueeze(2)?, at(&c)?.unsqueeze(2)?); // (B, H, 1, N)
        let da = at(&decay)?.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?; // (B, H, 1, 1)
        let xt = at(&dtx)?.unsqueeze(D::Minus1)?; // (B, H, P, 1)
        state = (state.broadcast_mul(&da)? + xt.broadcast_mul(&bt)?)?;
        ys.push(state.broadcast_mul(&ct)?.sum(D::Minus1)?);
    }
    Ok((Tensor::stack(&ys, 1)?, state))
}

impl SelfAttention for Mamba2 {
    fn forward(&self, x: &Normed, _rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let x = x.tensor()?;
        let (bs, s, _) = x.dims3()?;
        let Mamba2Dims { heads, head_dim, groups, state, .. } = self.dims;
        let inner = heads * head_dim;
        let conv_dim = inner + 2 * groups * state;
        let proj = self.in_proj.forward(&x)?;
        let gate = proj.narrow(2, 0, inner)?;
        let xbc = cache.zero_padding(&proj.narrow(2, inner, conv_dim)?)?;
        let dt = proj.narrow(2, inner + conv_dim, heads)?;
        let (conv, conv_state) = self.conv1d.forward(&xbc, cache.array(0))?;
        cache.set_array(0, conv_state)?;
        let xbc = candle_nn::ops::silu(&conv)?;
        let xs = xbc.narrow(2, 0, inner)?.reshape((bs, s, heads, head_dim))?;
        let b = xbc.narrow(2, inner, groups * state)?.reshape((bs, s, groups, state))?;
        let c = xbc.narrow(2, inner + groups * state, groups * state)?.reshape((bs, s, groups, state))?;
        let (lo, hi) = self.time_step_limit;
        let dt = softplus(&dt.to_dtype(DType::F32)?.broadcast_add(&self.dt_bias)?)?.clamp(lo, hi)?;
        let (y, new_state) = ssm_update(&xs, &b, &c, &dt, &self.a, cache.array(1))?;
        cache.set_array(1, new_state)?;
        cache.advance_by(s);
        let y = (y.to_dtype(x.dtype())? + xs.broadcast_mul(&self.d.reshape((heads, 1))?)?)?;
        let y = (candle_nn::ops::silu(&gate)? * y.reshape((bs, s, inner))?)?;
        if self.norm_per_group {
            return self.norm.forward_grouped(&y, groups);
        }
        self.norm.forward(&y)
    }

    fn o_proj(&self) -> &Linear {
        &self.out_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        vec![&self.in_proj]
    }

    /// Its states are replaced, not written in place, at every step.
    fn graphable(&self) -> bool {
        false
    }
}
