//! The gated delta rule (mlx_lm's `gated_delta.py`), the recurrence of Gated DeltaNet layers:
//! per value head a state S (Dv × Dk, f32) and for each position t
//!
//! ```text
//! S = g_t · S;   S += (β_t · (v_t − S k_t)) k_tᵀ;   y_t = S q_t
//! ```
//!
//! run position after position (mlx_lm has no chunked form either: its prefill is the same loop,
//! and its cached and uncached passes give the same bits). The keys and queries have `Hk` heads
//! shared by groups of `Hv / Hk` value heads. Today every backend runs it with candle's ops.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// `q`, `k` (B, S, Hk, Dk), `v` (B, S, Hv, Dv), `g`, `beta` (B, S, Hv) and the state (B, Hv, Dv,
/// Dk; zeros when None): the outputs y (B, S, Hv, Dv) in `v`'s dtype, and the new state (f32).
pub fn gated_delta_update(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, s, hk, dk) = q.dims4()?;
    let (_, _, hv, dv) = v.dims4()?;
    if hk == 0 || hv % hk != 0 {
        bail!("gated delta rule: {hv} value heads cannot share {hk} key heads");
    }
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        Ok(if hv == hk { t } else { t.unsqueeze(3)?.broadcast_as((b, s, hk, hv / hk, dk))?.reshape((b, s, hv, dk))? })
    };
    let (q, k) = (repeat(q)?, repeat(k)?);
    let (v32, g, beta) = (v.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?, beta.to_dtype(DType::F32)?);
    let mut state = match state {
        Some(t) => t.to_dtype(DType::F32)?,
        None => Tensor::zeros((b, hv, dv, dk), DType::F32, q.device())?,
    };
    let mut ys = Vec::with_capacity(s);
    for t in 0..s {
        let at = |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(1, t, 1)?.squeeze(1)?) };
        let (qt, kt, vt) = (at(&q)?.unsqueeze(2)?, at(&k)?.unsqueeze(2)?, at(&v32)?);
        let (gt, bt) = (at(&g)?, at(&beta)?);
        state = state.broadcast_mul(&gt.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
        let kv = state.broadcast_mul(&kt)?.sum(D::Minus1)?;
        let delta = (vt - kv)?.broadcast_mul(&bt.unsqueeze(D::Minus1)?)?;
        state = (state + kt.broadcast_mul(&delta.unsqueeze(D::Minus1)?)?)?;
        ys.push(state.broadcast_mul(&qt)?.sum(D::Minus1)?.to_dtype(v.dtype())?);
    }
    Ok((Tensor::stack(&ys, 1)?, state))
}
