//! The quantized matmul of `mxfp4` weights (`crate::quant::mxfp4`): `y = x · dequant(W)ᵀ`. On
//! the CPU each weight row is decoded to f32 once per call and dotted with the input rows (the
//! decode and prefill drivers of `crate::backend::cpu`); on other devices the weight is
//! dequantized and multiplied densely (no kernel of its own yet).

use crate::backend::cpu::{matmul_f32, Elem, WeightRows};
use crate::quant::mxfp4;
use anyhow::{bail, Result};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// An `mxfp4` matrix (out × in): `packed` u32 (out × in/8), `scales` u8 (out × in/32).
#[derive(Debug, Clone)]
pub struct Mxfp4Weight {
    pub packed: Tensor,
    pub scales: Tensor,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Mxfp4Weight {
    /// The dense matrix (… × out × in for a stack) in `dtype`, on the weight's device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let dims = self.packed.dims().to_vec();
        let rows = dims[..dims.len() - 1].iter().product();
        let packed: Vec<u32> = self.packed.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1()?;
        let scales: Vec<u8> = self.scales.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1()?;
        let cols = self.in_dim;
        let mut shape = dims;
        *shape.last_mut().expect("a matrix") = cols;
        let out = mxfp4::dequantize(&packed, &scales, rows, cols);
        Ok(Tensor::from_vec(out, shape, self.packed.device())?.to_dtype(dtype)?)
    }

    /// `x Wᵀ` for `x` of shape (…, in).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(candle_core::D::Minus1)? != self.in_dim {
            bail!(
                "mxfp4 matmul: input has {} features, the weight expects {}",
                x.dim(candle_core::D::Minus1)?,
                self.in_dim
            );
        }
        if x.device().is_cpu() {
            return Ok(x.contiguous()?.apply_op1(Mxfp4MatMul { w: self.clone() })?);
        }
        crate::ops::dense_matmul::dense_matmul(x, &self.dequantize(x.dtype())?)
    }
}

/// The rows of an `mxfp4` matrix for the CPU drivers.
struct Mxfp4Rows<'a> {
    packed: &'a [u32],
    scales: &'a [u8],
    n: usize,
    k: usize,
}

impl WeightRows for Mxfp4Rows<'_> {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    type Prep = ();
    fn prepare(&self, _xs: &[f32], _m: usize) {}
    fn row_dots(&self, r: usize, xs: &[f32], m: usize, _prep: &(), scratch: &mut Vec<f32>, out: &mut [f32]) {
        let k = self.k;
        scratch.resize(k, 0.0);
        self.rows_f32(r, 1, scratch);
        for (i, o) in out.iter_mut().enumerate().take(m) {
            *o = f32::dot(&xs[i * k..(i + 1) * k], scratch);
        }
    }
    fn rows_f32(&self, r0: usize, cnt: usize, dst: &mut [f32]) {
        let (k, words, groups) = (self.k, self.k / 8, self.k / mxfp4::GROUP);
        for (j, row) in dst.chunks_mut(k).enumerate().take(cnt) {
            let r = r0 + j;
            mxfp4::decode_row(
                &self.packed[r * words..(r + 1) * words],
                &self.scales[r * groups..(r + 1) * groups],
                k,
                row,
            );
        }
    }
}

struct Mxfp4MatMul {
    w: Mxfp4Weight,
}

impl CustomOp1 for Mxfp4MatMul {
    fn name(&self) -> &'static str {
        "mxfp4-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let (k, n) = (self.w.in_dim, self.w.out_dim);
        let m = l.shape().elem_count() / k;
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("mxfp4 matmul needs a contiguous input".into()))?;
        let xs: Vec<f32> = match s {
            CpuStorage::F32(v) => v[start..end].to_vec(),
            CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            _ => candle_core::bail!("mxfp4 matmul: input must be f32, f16 or bf16"),
        };
        let (pst, pl) = self.w.packed.storage_and_layout();
        let (sst, sl) = self.w.scales.storage_and_layout();
        let slice = |st: &candle_core::Storage, l: &Layout| -> candle_core::Result<(usize, usize)> {
            match st {
                candle_core::Storage::Cpu(_) => l
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("mxfp4 weight is not contiguous".into())),
                _ => candle_core::bail!("mxfp4 weight is not on the CPU"),
            }
        };
        let ((pa, pb), (sa, sb)) = (slice(&pst, pl)?, slice(&sst, sl)?);
        let (candle_core::Storage::Cpu(p), candle_core::Storage::Cpu(sc)) = (&*pst, &*sst) else {
            candle_core::bail!("mxfp4 weight is not on the CPU")
        };
        let rows = Mxfp4Rows { packed: &p.as_slice::<u32>()?[pa..pb], scales: &sc.as_slice::<u8>()?[sa..sb], n, k };
        let y = matmul_f32(&rows, &xs, m);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = n;
        let storage = match s.dtype() {
            DType::F32 => CpuStorage::F32(y),
            DType::F16 => CpuStorage::F16(y.iter().map(|&v| half::f16::from_f32(v)).collect()),
            _ => CpuStorage::BF16(y.iter().map(|&v| half::bf16::from_f32(v)).collect()),
        };
        Ok((storage, Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy · W
        let w = self.w.dequantize(grad_res.dtype()).map_err(candle_core::Error::wrap)?;
        let dims = grad_res.dims().to_vec();
        let n = *dims.last().unwrap();
        let gx = grad_res.reshape((grad_res.elem_count() / n, n))?.matmul(&w)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.w.in_dim;
        Ok(Some(gx.reshape(out)?))
    }
}
