//! The fused decode ops of the CUDA backend (no CPU or backward: inference only): q/k/v of one
//! input, gate/up with SiLU, and the deferred RMSNorm carried between one-row matmuls.

use super::cuda;
use super::*;

/// q/k/v of one input; `deferred`: the input is a deferred-norm carrier and this the
/// norm's eps (see [`deferred_norm`]).
struct Qmv3(pub [QuantizedWeight; 3], pub Option<f32>);

impl CustomOp1 for Qmv3 {
    fn name(&self) -> &'static str {
        "affine-quantized-matmul-x3"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("affine-quantized-matmul-x3 runs on CUDA only")
    }
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let [a, b, c] = &self.0;
        with_parts(a, |pa| {
            with_parts(b, |pb| {
                with_parts(c, |pc| match self.1 {
                    Some(eps) => cuda::qmv3_deferred(s, l, [pa, pb, pc], eps),
                    None => cuda::qmv3(s, l, [pa, pb, pc]),
                })
            })
        })
    }
}

/// gate/up of one input; `deferred` as [`Qmv3`]'s.
struct QmvSwiGlu(pub QuantizedWeight, pub QuantizedWeight, pub Option<f32>);

impl CustomOp1 for QmvSwiGlu {
    fn name(&self) -> &'static str {
        "affine-quantized-swiglu"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("affine-quantized-swiglu runs on CUDA only")
    }
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        with_parts(&self.0, |g| {
            with_parts(&self.1, |u| match self.2 {
                Some(eps) => cuda::qmv_swiglu_deferred(s, l, g, u, eps),
                None => cuda::qmv_swiglu(s, l, g, u),
            })
        })
    }
}

/// One row times `W` plus the residual, as a deferred-norm carrier ([`cuda::qm1_res`]):
/// inputs x, the residual and the norm's weight.
struct QmvRes(pub QuantizedWeight);

crate::backend::cuda::cuda_only_op3!(
    QmvRes,
    "affine-quantized-matmul-residual-norm",
    "affine-quantized-matmul-residual-norm runs on CUDA only",
    |op, x, r, nw| with_parts(&op.0, |w| cuda::qm1_res(x, w, r, nw))
);

/// Whether weights taking one input are of one family (same input size, bits, group size
/// and scale dtype) and fit a fused kernel's shapes: three (q/k/v) of even output sizes, as
/// the kernels pair rows within each projection, or two (gate/up) of the same output size.
fn fused_weights(ws: &[&QuantizedWeight]) -> bool {
    let w0 = ws[0];
    let same =
        ws.iter().all(|w| w.in_dim == w0.in_dim && w.params == w0.params && w.scales.dtype() == w0.scales.dtype());
    let shapes = match ws {
        [_, _, _] => ws.iter().all(|w| w.out_dim % 2 == 0),
        [g, u] => g.out_dim == u.out_dim,
        _ => false,
    };
    same && shapes
}

/// The input of a fused decode kernel when one applies: `x` on CUDA with at most 8 rows,
/// and weights that [`fused_weights`] takes with bits the fused kernels are built for.
/// `None`: use the separate matmuls.
fn fused_input(x: &Tensor, ws: &[&QuantizedWeight]) -> Result<Option<Tensor>> {
    let w0 = ws[0];
    if !x.device().is_cuda() || !fused_weights(ws) || !cuda::has_fused(w0.params) {
        return Ok(None);
    }
    if x.elem_count() / w0.in_dim.max(1) > cuda::DECODE_PATH_ROWS {
        return Ok(None);
    }
    Ok(Some(kernel_input(x, w0.scales.dtype())?))
}

/// `(x Qᵀ, x Kᵀ, x Vᵀ)` in one launch on CUDA for decode; `None` where no fused kernel applies.
pub fn fused_qkv(
    x: &Tensor,
    q: &QuantizedWeight,
    k: &QuantizedWeight,
    v: &QuantizedWeight,
) -> Result<Option<[Tensor; 3]>> {
    let Some(xin) = fused_input(x, &[q, k, v])? else { return Ok(None) };
    let flat = xin.apply_op1_no_bwd(&Qmv3([q.clone(), k.clone(), v.clone()], None))?;
    Ok(Some(split_qkv(&flat, &x.dims()[..x.rank() - 1], [q, k, v], x.dtype())?))
}

/// A q/k/v kernel's flat output (all rows' q, then k, then v) as q, k and v, each shaped
/// `lead` (the input's leading dimensions) × its outputs, in `dtype`.
fn split_qkv(flat: &Tensor, lead: &[usize], qkv: [&QuantizedWeight; 3], dtype: DType) -> Result<[Tensor; 3]> {
    let m: usize = lead.iter().product();
    let mut at = 0;
    let mut part = |n: usize| -> Result<Tensor> {
        let t = flat.narrow(0, at, m * n)?.reshape([lead, &[n]].concat())?.to_dtype(dtype)?;
        at += m * n;
        Ok(t)
    };
    let [q, k, v] = qkv;
    Ok([part(q.out_dim)?, part(k.out_dim)?, part(v.out_dim)?])
}

/// `silu(x Gᵀ) · (x Uᵀ)` in one launch on CUDA for decode; `None` where no fused kernel applies.
pub fn fused_swiglu(x: &Tensor, gate: &QuantizedWeight, up: &QuantizedWeight) -> Result<Option<Tensor>> {
    let Some(xin) = fused_input(x, &[gate, up])? else { return Ok(None) };
    let y = xin.apply_op1_no_bwd(&QmvSwiGlu(gate.clone(), up.clone(), None))?;
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// The first half of the decode step's deferred RMSNorm on CUDA: `x Wᵀ + r` (`x` one row,
/// `w` the o or down projection, `r` the residual) and what the next matmul needs to
/// finish `rms_norm(x Wᵀ + r) · norm_weight` itself (see affine.cu `qm1_res_impl`): a flat
/// carrier of 3·d values, u = h · norm_weight, then h, then the partial sums of h².
/// `next`: the weights that will take the carrier ([`fused_qkv_deferred`]: three;
/// [`fused_swiglu_deferred`]: two). `None` where the kernels do not apply (then run the
/// matmul and the norm as before).
pub fn deferred_norm(
    x: &Tensor,
    w: &QuantizedWeight,
    r: &Tensor,
    norm_weight: &Tensor,
    next: &[&QuantizedWeight],
) -> Result<Option<Tensor>> {
    let (dtype, d) = (w.scales.dtype(), w.out_dim);
    let Some(n0) = next.first() else { return Ok(None) };
    let inference = ![x, r, norm_weight].iter().any(|t| t.track_op());
    let fits = x.device().is_cuda()
        && inference
        && x.elem_count() == w.in_dim
        && r.elem_count() == d
        && norm_weight.dims() == [d]
        && [x.dtype(), r.dtype(), norm_weight.dtype()].iter().all(|&t| t == dtype)
        && fused_weights(next)
        && n0.in_dim == d
        && n0.scales.dtype() == dtype
        && cuda::deferred_norm_fits(dtype, w.params, w.in_dim, d, n0.params);
    if !fits {
        return Ok(None);
    }
    let (x, r, nw) = (kernel_input(x, dtype)?, r.contiguous()?, norm_weight.contiguous()?);
    Ok(Some(x.apply_op3_no_bwd(&r, &nw, &QmvRes(w.clone()))?))
}

/// q/k/v of a deferred-norm carrier ([`deferred_norm`], whose `next` they were), the norm's
/// `eps` applied, each shaped `lead` (the norm input's leading dimensions) × its outputs.
pub fn fused_qkv_deferred(
    carrier: &Tensor,
    eps: f32,
    lead: &[usize],
    q: &QuantizedWeight,
    k: &QuantizedWeight,
    v: &QuantizedWeight,
) -> Result<[Tensor; 3]> {
    let flat = carrier.apply_op1_no_bwd(&Qmv3([q.clone(), k.clone(), v.clone()], Some(eps)))?;
    split_qkv(&flat, lead, [q, k, v], carrier.dtype())
}

/// `silu(n Gᵀ) · (n Uᵀ)` of a deferred-norm carrier (n its norm), shaped `lead` × outputs.
pub fn fused_swiglu_deferred(
    carrier: &Tensor,
    eps: f32,
    lead: &[usize],
    gate: &QuantizedWeight,
    up: &QuantizedWeight,
) -> Result<Tensor> {
    let y = carrier.apply_op1_no_bwd(&QmvSwiGlu(gate.clone(), up.clone(), Some(eps)))?;
    Ok(y.reshape([lead, &[gate.out_dim]].concat())?)
}
