//! The quantized matmul op `y = x · dequant(W)ᵀ` as a candle `CustomOp1` on `x` (the weight is
//! frozen and travels inside the op). Backends sit side by side: `cpu_fwd` runs our CPU kernels
//! (`quant::cpu`); other devices dequantize and use the device's matmul until their own kernels
//! land. The backward pass gives the gradient with respect to `x` (for LoRA on quantized models).

use super::cpu::AffineRows;
use super::weight::QuantizedWeight;
use crate::kernels::{matmul_f32, Elem};
use anyhow::Result;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

struct QMatMul {
    w: QuantizedWeight,
}

/// The contiguous CPU data of a weight part, borrowed from its storage guard.
fn cpu_data<'a, T: candle_core::WithDType>(st: &'a candle_core::Storage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let cpu = match st {
        candle_core::Storage::Cpu(c) => c,
        _ => candle_core::bail!("quantized weight is not on the CPU"),
    };
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("quantized weight is not contiguous".into()))?;
    Ok(&cpu.as_slice::<T>()?[a..b])
}

fn to_f32<T: Elem>(x: &[T]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    T::to_f32_slice(x, &mut out);
    out
}

fn run<S: Elem>(w: &QuantizedWeight, packed: &[u32], scales: &[S], biases: &[S], xs: &[f32], m: usize) -> Vec<f32> {
    let rows = AffineRows { packed, scales, biases, n: w.out_dim, k: w.in_dim, p: w.params };
    matmul_f32(&rows, xs, m)
}

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "affine-quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.w.in_dim {
            candle_core::bail!("quantized matmul: input has {k} features, the weight expects {}", self.w.in_dim);
        }
        let m = l.shape().elem_count() / k.max(1);
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("quantized matmul needs a contiguous input".into()))?;
        let xs: Vec<f32> = match s {
            CpuStorage::F32(v) => v[start..end].to_vec(),
            CpuStorage::F16(v) => to_f32(&v[start..end]),
            CpuStorage::BF16(v) => to_f32(&v[start..end]),
            _ => candle_core::bail!("quantized matmul: input must be f32, f16 or bf16"),
        };
        let (pst, pl) = self.w.packed.storage_and_layout();
        let (sst, sl) = self.w.scales.storage_and_layout();
        let (bst, bl) = self.w.biases.storage_and_layout();
        let packed: &[u32] = cpu_data(&pst, pl)?;
        let y = match self.w.scales.dtype() {
            DType::F32 => run::<f32>(&self.w, packed, cpu_data(&sst, sl)?, cpu_data(&bst, bl)?, &xs, m),
            DType::F16 => run::<f16>(&self.w, packed, cpu_data(&sst, sl)?, cpu_data(&bst, bl)?, &xs, m),
            DType::BF16 => run::<bf16>(&self.w, packed, cpu_data(&sst, sl)?, cpu_data(&bst, bl)?, &xs, m),
            d => candle_core::bail!("quantized matmul: scales of dtype {d:?} are not supported"),
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = self.w.out_dim;
        let storage = match s.dtype() {
            DType::F32 => CpuStorage::F32(y),
            DType::F16 => CpuStorage::F16(y.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => CpuStorage::BF16(y.iter().map(|&v| bf16::from_f32(v)).collect()),
        };
        Ok((storage, Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy · W
        let w = self.w.dequantize().map_err(candle_core::Error::wrap)?.to_dtype(grad_res.dtype())?;
        let dims = grad_res.dims().to_vec();
        let n = *dims.last().unwrap();
        let rows = grad_res.elem_count() / n;
        let gx = grad_res.reshape((rows, n))?.matmul(&w)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.w.in_dim;
        Ok(Some(gx.reshape(out)?))
    }
}

/// `x Wᵀ` for a quantized `W`, `x` of shape (…, in).
pub fn quantized_matmul(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    if x.device().is_cpu() {
        let x = x.contiguous()?;
        return Ok(x.apply_op1(QMatMul { w: w.clone() })?);
    }
    let dense = w.dequantize()?.to_dtype(x.dtype())?;
    crate::nn::dense_matmul(x, &dense)
}
