//! The dense matmul `x Wᵀ`: wick's CPU kernels (matrix-vector for decode, f32 tiles + gemm for
//! half-precision prefill), the device's matmul elsewhere.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

/// `x Wᵀ` for `x` of any rank (…, in) and `W` (out, in). On the CPU our own kernels run
/// (`crate::backend::cpu`: matrix-vector for decode, f32 tiles + gemm for half-precision prefill); elsewhere,
/// and for f32 prefill, the device's matmul.
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().context("matmul input has no dimensions")?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, in_dim))?;
    let own_kernel = x.device().is_cpu()
        && w.is_contiguous()
        && (x.dtype() == w.dtype() || x.dtype() == DType::F32)
        && (rows <= crate::backend::cpu::GEMV_MAX_ROWS || w.dtype() != DType::F32);
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
        use crate::backend::cpu::{matmul_f32, DenseRows, Elem};
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
