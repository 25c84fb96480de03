//! CUDA backend of the float-mode quantized matmul (`mxfp4`, `nvfp4`, `mxfp8`; the format is
//! `crate::quant::fp`): launches the kernels of `fp.cu` (compiled by build.rs into a fatbin
//! embedded in the binary, loaded by `crate::backend::cuda`).
//!
//! - up to [`DECODE_ROWS`] input rows (decode): `wick_fpmv_{mode}_{dtype}_m{1,2,4,8}`, one warp
//!   per output row (two for one input row), reading the packed weight once;
//! - mixture-of-experts decode: `wick_gfpmv_{mode}_{dtype}`, routed row `r` (blockIdx.y) reads
//!   expert `ids[r]`'s matrix itself, the ids staying on the device;
//! - the dense matrix: `wick_fp_dequant_{mode}_{dtype}`, bit for bit with
//!   `crate::quant::fp::dequantize_tensor` (the prefill path multiplies it with cuBLAS).
//!
//! nvfp4's global scale is passed as a device pointer (null without one), so nothing is read
//! back to the host. Each public function is a candle custom op on the activations (or the
//! packed codes); the weight's parts travel inside the op and are borrowed from their storage
//! at the launch.

use super::fp_gpu::{self, chunked, kernel_dtype, matrices, mode_name, prepared, row_slices};
use super::FpWeight;
use crate::backend::cuda::Launch;
use crate::ops::qmatmul::cuda::{rows_launch, x_view};
use crate::quant::fp;
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Shape, Tensor, WithDType};

/// Up to this many input rows the decode kernel runs; more rows dequantize and use cuBLAS.
pub const DECODE_ROWS: usize = 8;

fn function(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    crate::backend::cuda::function(dev, crate::backend::cuda::Module::Fp, name)
}

/// A weight's parts on the device, as kernel arguments.
struct Parts<'a> {
    packed: CudaView<'a, u32>,
    scales: CudaView<'a, u8>,
    global: Option<CudaView<'a, f32>>,
}

/// The contiguous elements of a weight part as a view of its storage.
fn part_view<'a, T: CudaDType>(
    st: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
    aligned: bool,
) -> candle_core::Result<CudaView<'a, T>> {
    let s = crate::backend::cuda::cuda_of(st, what)?;
    match l.contiguous_offsets() {
        Some((a, b)) if !aligned || (a * std::mem::size_of::<T>()).is_multiple_of(16) => {
            Ok(s.as_cuda_slice::<T>()?.slice(a..b))
        }
        _ => candle_core::bail!("fp quantized matmul on CUDA: {what} must be contiguous from a 16-byte aligned offset"),
    }
}

/// `f` with the weight's scales and global scale borrowed from their storage (the guards held
/// for the launch); the packed codes are not touched (the dequantize op has them as its input).
fn with_scales<R>(
    w: &FpWeight,
    f: impl FnOnce(CudaView<'_, u8>, Option<CudaView<'_, f32>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (sst, sl) = w.scales.storage_and_layout();
    let g = w.global_scale.as_ref().map(|g| g.storage_and_layout());
    let global = match &g {
        Some((gst, gl)) => Some(part_view::<f32>(gst, gl, "the weight's global scale", false)?),
        None => None,
    };
    f(part_view::<u8>(&sst, sl, "the weight's scales", false)?, global)
}

/// `f` with all the weight's parts borrowed from their storage (the guards held for the launch).
fn with_parts<R>(
    w: &FpWeight,
    aligned: bool,
    f: impl FnOnce(&Parts) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (pst, pl) = w.packed.storage_and_layout();
    let packed = part_view::<u32>(&pst, pl, "the weight's packed codes", aligned)?;
    with_scales(w, |scales, global| f(&Parts { packed, scales, global }))
}

/// The global scale argument: the pointer, or null.
fn push_global<'a>(b: &mut Launch<'a>, global: &'a Option<CudaView<'a, f32>>, null: &'a u64) {
    match global {
        Some(g) => b.arg(g),
        None => b.arg(null),
    };
}

fn matmul_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (x, xl): (&CudaStorage, &Layout),
    w: &FpWeight,
    p: &Parts,
    m: usize,
) -> candle_core::Result<CudaSlice<T>> {
    let (tn, mn) = (crate::backend::cuda::dtype_suffix(T::DTYPE, "fp quantized matmul")?, mode_name(w.mode)?);
    let (n, k) = (w.out_dim, w.in_dim);
    let xs = x_view::<T>(x, xl)?;
    let out = unsafe { dev.alloc::<T>(m * n)? };
    let stream = dev.cuda_stream();
    let (n_i, k_i, null) = (n as i32, k as i32, 0u64);
    for (r0, rows) in row_slices(m) {
        let mm = rows.next_power_of_two();
        let f = function(dev, &format!("wick_fpmv_{mn}_{tn}_m{mm}"))?;
        let xsl = xs.slice(r0 * k..(r0 + rows) * k);
        let ys = out.slice(r0 * n..(r0 + rows) * n);
        let rows_i = rows as i32;
        let mut b = Launch::new(&stream, &f);
        b.arg(&p.packed).arg(&p.scales);
        push_global(&mut b, &p.global, &null);
        b.arg(&xsl).arg(&ys).arg(&rows_i).arg(&n_i).arg(&k_i);
        unsafe { b.launch(rows_launch(n, if mm == 1 { 2 } else { 1 })) }.w()?;
    }
    Ok(out)
}

/// `x Wᵀ` on the device: the op on `x` (contiguous from offset 0, a kernel dtype), the weight
/// prepared.
struct FpMatMul {
    w: FpWeight,
}

impl candle_core::CustomOp1 for FpMatMul {
    fn name(&self) -> &'static str {
        "fp-quantized-matmul-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("fp-quantized-matmul-cuda runs on CUDA only (the CPU has its own op)")
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, k) = (self.w.out_dim, self.w.in_dim);
        let m = l.shape().elem_count() / k.max(1);
        let dev = x.device().clone();
        let st = with_parts(&self.w, true, |p| {
            Ok(crate::backend::cuda::by_dtype!(
                x.dtype(),
                "fp quantized matmul",
                dev.clone(),
                matmul_typed(&dev, (x, l), &self.w, p, m)
            ))
        })?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("at least one dim") = n;
        Ok((st, Shape::from(dims)))
    }
}

/// The CUDA backend for `fp_gpu`'s entry points.
struct Backend;

impl fp_gpu::FpDevice for Backend {
    const NAME: &'static str = "CUDA";
    const MAX_ROUTED_ROWS: usize = 65535;
    fn is(device: &candle_core::Device) -> bool {
        device.is_cuda()
    }
    fn matmul_op(x: &Tensor, w: FpWeight) -> Result<Tensor> {
        Ok(x.apply_op1_no_bwd(&FpMatMul { w })?)
    }
    fn dequantize_op(w: &FpWeight, dtype: DType) -> Result<Tensor> {
        Ok(w.packed.apply_op1_no_bwd(&FpDequantize { w: w.clone(), dtype })?)
    }
    fn gather_op(x: &Tensor, ids: &Tensor, w: FpWeight, experts: usize, xdiv: usize) -> Result<Tensor> {
        Ok(x.apply_op2_no_bwd(ids, &FpGather { w, experts, xdiv })?)
    }
}

/// `x Wᵀ` for x (…, in) with at most [`DECODE_ROWS`] rows, on CUDA.
pub fn matmul(x: &Tensor, w: &FpWeight) -> Result<Tensor> {
    fp_gpu::matmul::<Backend>(x, w)
}

/// `mx.dequantize` on the device, as an op on the packed codes (contiguous): the scales and
/// global scale travel inside; the result is in `dtype` (f32 with a global scale).
struct FpDequantize {
    w: FpWeight,
    dtype: DType,
}

fn dequant_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    w: &FpWeight,
    p: &Parts,
    total: usize,
) -> candle_core::Result<CudaSlice<T>> {
    let (tn, mn) = (crate::backend::cuda::dtype_suffix(T::DTYPE, "fp dequantize")?, mode_name(w.mode)?);
    let out = unsafe { dev.alloc::<T>(total)? };
    let units = total / 8;
    let blocks = u32::try_from(units.div_ceil(256))
        .map_err(|_| candle_core::Error::Msg(format!("{} dequantize: {total} values are too many", w.mode)))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = function(dev, &format!("wick_fp_dequant_{mn}_{tn}"))?;
    let (units_i, per_mat, null) = (units as i64, (w.out_dim * w.in_dim) as i64, 0u64);
    let stream = dev.cuda_stream();
    let mut b = Launch::new(&stream, &f);
    b.arg(&p.packed).arg(&p.scales);
    push_global(&mut b, &p.global, &null);
    b.arg(&out).arg(&units_i).arg(&per_mat);
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

impl candle_core::CustomOp1 for FpDequantize {
    fn name(&self) -> &'static str {
        "fp-dequantize-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("fp-dequantize-cuda runs on CUDA only (the CPU has quant::fp::dequantize_tensor)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fp dequantize: packed codes not contiguous".into()))?;
        let packed = s.as_cuda_slice::<u32>()?.slice(a..b);
        let total = (b - a) * fp::per_word(self.w.mode);
        let dev = s.device().clone();
        // (not `with_parts`: the packed codes are this op's input, their storage already held)
        let st = with_scales(&self.w, |scales, global| {
            let p = Parts { packed, scales, global };
            Ok(crate::backend::cuda::by_dtype!(
                self.dtype,
                "fp dequantize",
                dev.clone(),
                dequant_typed(&dev, &self.w, &p, total)
            ))
        })?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("a matrix") *= fp::per_word(self.w.mode);
        Ok((st, Shape::from(dims)))
    }
}

/// `mx.dequantize` of the weight on its CUDA device, in `dtype` (f32 with a global scale).
pub fn dequantize(w: &FpWeight, dtype: DType) -> Result<Tensor> {
    fp_gpu::dequantize::<Backend>(w, dtype)
}

/// The gathered matmul on the device, an op on (x, ids): routed row `r` of the result is
/// input row `r / xdiv` times matrix `ids[r]` of the (prepared) stack.
struct FpGather {
    w: FpWeight,
    experts: usize,
    xdiv: usize,
}

fn gather_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (x, xl): (&CudaStorage, &Layout),
    ids: CudaView<'_, u32>,
    op: &FpGather,
    p: &Parts,
) -> candle_core::Result<CudaSlice<T>> {
    let w = &op.w;
    let (tn, mn) = (crate::backend::cuda::dtype_suffix(T::DTYPE, "gathered fp matmul")?, mode_name(w.mode)?);
    let (n, k, rows) = (w.out_dim, w.in_dim, ids.len());
    let xs = x_view::<T>(x, xl)?;
    let out = unsafe { dev.alloc::<T>(rows * n)? };
    let f = function(dev, &format!("wick_gfpmv_{mn}_{tn}"))?;
    let (ew, es) = ((n * k / fp::per_word(w.mode)) as i64, (n * k / fp::group(w.mode)) as i64);
    let (experts, xdiv, n_i, k_i, null) = (op.experts as i32, op.xdiv as i32, n as i32, k as i32, 0u64);
    let mut cfg = rows_launch(n, 2);
    cfg.grid_dim.1 = rows as u32;
    let stream = dev.cuda_stream();
    let mut b = Launch::new(&stream, &f);
    b.arg(&p.packed).arg(&p.scales);
    push_global(&mut b, &p.global, &null);
    b.arg(&ids).arg(&ew).arg(&es).arg(&experts).arg(&xdiv).arg(&xs).arg(&out).arg(&n_i).arg(&k_i);
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

impl candle_core::CustomOp2 for FpGather {
    fn name(&self) -> &'static str {
        "gathered-fp-quantized-matmul-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("gathered-fp-quantized-matmul-cuda runs on CUDA only (the CPU groups rows on the host)")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ids = crate::backend::cuda::contiguous_view::<u32>(ids, il, "gathered fp matmul: expert ids")?;
        let rows = ids.len();
        if xl.shape().elem_count() * self.xdiv != rows * self.w.in_dim {
            candle_core::bail!(
                "gathered fp matmul: {} input values for {rows} routed rows of {} ({} per input row)",
                xl.shape().elem_count(),
                self.w.in_dim,
                self.xdiv
            );
        }
        let dev = x.device().clone();
        let st = with_parts(&self.w, true, |p| {
            Ok(crate::backend::cuda::by_dtype!(
                x.dtype(),
                "gathered fp matmul",
                dev.clone(),
                gather_typed(&dev, (x, xl), ids, self, p)
            ))
        })?;
        Ok((st, Shape::from((rows, self.w.out_dim))))
    }
}

/// Routed row `r` of the result is row `r / xdiv` of `x` times matrix `ids[r]` of the stack `w`
/// (`ids` u32 on the device). A routed row whose id is outside the stack comes out NaN (the
/// ids are never read back to check them).
pub fn gather_rows(x: &Tensor, w: &FpWeight, ids: &Tensor, xdiv: usize) -> Result<Tensor> {
    fp_gpu::gather_rows::<Backend>(x, w, ids, xdiv)
}

/// Whether the one-row fused kernels take these weights: single matrices of one mode and input
/// size, in whole 32-value chunks, without global scales (mlx writes those for experts only).
fn fusable(x: &Tensor, ws: &[&FpWeight]) -> Result<bool> {
    let w0 = ws[0];
    let same = ws.iter().all(|w| w.mode == w0.mode && w.in_dim == w0.in_dim && w.global_scale.is_none());
    if !x.device().is_cuda() || !same || !chunked(w0.in_dim) || x.elem_count() != w0.in_dim {
        return Ok(false);
    }
    for w in ws {
        if matrices(w)? != 1 || w.out_dim == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// q, k and v of one input row in one launch (`wick_fpmv3_*`); the flat output holds q's rows,
/// then k's, then v's.
struct FpQkv([FpWeight; 3]);

fn qkv_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (x, xl): (&CudaStorage, &Layout),
    ws: &[FpWeight; 3],
    ps: [&Parts; 3],
) -> candle_core::Result<CudaSlice<T>> {
    let (tn, mn) = (crate::backend::cuda::dtype_suffix(T::DTYPE, "fp quantized matmul")?, mode_name(ws[0].mode)?);
    let ns: Vec<i32> = ws.iter().map(|w| w.out_dim as i32).collect();
    let k = ws[0].in_dim as i32;
    let xs = x_view::<T>(x, xl)?;
    let total: usize = ws.iter().map(|w| w.out_dim).sum();
    let pairs: usize = ws.iter().map(|w| w.out_dim.div_ceil(2)).sum();
    let out = unsafe { dev.alloc::<T>(total)? };
    let f = function(dev, &format!("wick_fpmv3_{mn}_{tn}"))?;
    let stream = dev.cuda_stream();
    let null = 0u64;
    let mut b = Launch::new(&stream, &f);
    for (p, n) in ps.iter().zip(&ns) {
        b.arg(&p.packed).arg(&p.scales);
        push_global(&mut b, &p.global, &null);
        b.arg(n);
    }
    b.arg(&xs).arg(&out).arg(&k);
    unsafe { b.launch(rows_launch(pairs, 1)) }.w()?;
    Ok(out)
}

impl candle_core::CustomOp1 for FpQkv {
    fn name(&self) -> &'static str {
        "fp-quantized-matmul-x3-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("fp-quantized-matmul-x3-cuda runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let [a, b, c] = &self.0;
        let dev = x.device().clone();
        let st = with_parts(a, true, |pa| {
            with_parts(b, true, |pb| {
                with_parts(c, true, |pc| {
                    Ok(crate::backend::cuda::by_dtype!(
                        x.dtype(),
                        "fp quantized matmul",
                        dev.clone(),
                        qkv_typed(&dev, (x, l), &self.0, [pa, pb, pc])
                    ))
                })
            })
        })?;
        let total: usize = self.0.iter().map(|w| w.out_dim).sum();
        Ok((st, Shape::from(vec![total])))
    }
}

/// `(x Qᵀ, x Kᵀ, x Vᵀ)` of one input row in one launch; `None` where the kernel does not apply
/// (then the separate matmuls run).
pub fn fused_qkv(x: &Tensor, q: &FpWeight, k: &FpWeight, v: &FpWeight) -> Result<Option<[Tensor; 3]>> {
    if !fusable(x, &[q, k, v])? {
        return Ok(None);
    }
    let xin = super::kernel_input(x, kernel_dtype(x.dtype()))?;
    let ws = [prepared(q, true)?, prepared(k, true)?, prepared(v, true)?];
    let flat = xin.apply_op1_no_bwd(&FpQkv(ws))?;
    let lead = &x.dims()[..x.rank() - 1];
    let mut at = 0;
    let mut part = |n: usize| -> Result<Tensor> {
        let t = flat.narrow(0, at, n)?.reshape([lead, &[n]].concat())?.to_dtype(x.dtype())?;
        at += n;
        Ok(t)
    };
    Ok(Some([part(q.out_dim)?, part(k.out_dim)?, part(v.out_dim)?]))
}

/// `silu(x Gᵀ) · (x Uᵀ)` of one input row in one launch (`wick_fpswiglu_*`).
struct FpSwiGlu(FpWeight, FpWeight);

fn swiglu_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (x, xl): (&CudaStorage, &Layout),
    gw: &FpWeight,
    g: &Parts,
    u: &Parts,
) -> candle_core::Result<CudaSlice<T>> {
    let (tn, mn) = (crate::backend::cuda::dtype_suffix(T::DTYPE, "fp quantized matmul")?, mode_name(gw.mode)?);
    let (n, k) = (gw.out_dim, gw.in_dim);
    let xs = x_view::<T>(x, xl)?;
    let out = unsafe { dev.alloc::<T>(n)? };
    let f = function(dev, &format!("wick_fpswiglu_{mn}_{tn}"))?;
    let stream = dev.cuda_stream();
    let (n_i, k_i) = (n as i32, k as i32);
    let mut b = Launch::new(&stream, &f);
    b.arg(&g.packed).arg(&g.scales).arg(&u.packed).arg(&u.scales).arg(&xs).arg(&out).arg(&n_i).arg(&k_i);
    unsafe { b.launch(rows_launch(n, 1)) }.w()?;
    Ok(out)
}

impl candle_core::CustomOp1 for FpSwiGlu {
    fn name(&self) -> &'static str {
        "fp-quantized-swiglu-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("fp-quantized-swiglu-cuda runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let st = with_parts(&self.0, true, |g| {
            with_parts(&self.1, true, |u| {
                Ok(crate::backend::cuda::by_dtype!(
                    x.dtype(),
                    "fp quantized swiglu",
                    dev.clone(),
                    swiglu_typed(&dev, (x, l), &self.0, g, u)
                ))
            })
        })?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("at least one dim") = self.0.out_dim;
        Ok((st, Shape::from(dims)))
    }
}

/// `silu(x Gᵀ) · (x Uᵀ)` of one input row in one launch; `None` where the kernel does not apply.
pub fn fused_swiglu(x: &Tensor, gate: &FpWeight, up: &FpWeight) -> Result<Option<Tensor>> {
    if !fusable(x, &[gate, up])? || gate.out_dim != up.out_dim {
        return Ok(None);
    }
    let xin = super::kernel_input(x, kernel_dtype(x.dtype()))?;
    let y = xin.apply_op1_no_bwd(&FpSwiGlu(prepared(gate, true)?, prepared(up, true)?))?;
    Ok(Some(y.to_dtype(x.dtype())?))
}
