//! Metal backend of the float-mode quantized matmul (`mxfp4`, `nvfp4`, `mxfp8`; the format is
//! `crate::quant::fp`): launches the kernels of `fp.metal` (compiled at run time by
//! `crate::backend::metal`), next to the CUDA backend of the same ops (`fp_cuda.rs`), with the
//! same public functions.
//!
//! - up to [`DECODE_ROWS`] input rows (decode): `wick_fpmv_{mode}_{dtype}_m{1,2,4,8}`, one SIMD
//!   group per output row, reading the packed weight once;
//! - mixture-of-experts decode: `wick_gfpmv_{mode}_{dtype}`, routed row `r` (threadgroup y)
//!   reads expert `ids[r]`'s matrix itself, the ids staying on the device;
//! - the dense matrix: `wick_fp_dequant_{mode}_{dtype}`, bit for bit with
//!   `crate::quant::fp::dequantize_tensor` (longer inputs multiply it densely).
//!
//! nvfp4's global scale is bound as a device buffer (with a flag: without one the scales stand
//! in its place, never read), so nothing is read back to the host. Each public function is a
//! candle custom op on the activations (or the packed codes); the weight's parts travel inside
//! the op and are borrowed from their storage at the launch.
//!
//! Type-checked for aarch64-apple-darwin; never run here (docs/metal.md).

use super::fp_gpu::{self, mode_name, row_slices};
use super::FpWeight;
use crate::backend::metal::{dtype_suffix, pipeline, Source};
use crate::backend::GpuStorage;
use crate::quant::fp;
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Shape, Tensor};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline};
use objc2_metal::MTLSize;

/// fp.metal, whole (it includes Metal's standard library itself).
const FP: Source = Source { name: "fp", text: || include_str!("fp.metal").to_string() };

/// Up to this many input rows the decode kernel runs; more rows dequantize and multiply densely.
pub const DECODE_ROWS: usize = 8;

/// Output rows (SIMD groups) per threadgroup of the decode kernels (FP_SIMDGROUPS).
const ROWS_PER_GROUP: usize = 8;

/// Threads per threadgroup of the dequantize kernel (eight values each).
const DEQUANT_THREADS: usize = 256;

/// `wick_fpmv`'s `WickFpDims`.
#[repr(C)]
#[derive(Clone, Copy)]
struct MvDims {
    m: i32,
    n: i32,
    k: i32,
    has_global: i32,
}

/// `wick_gfpmv`'s `WickFpGatherDims`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GatherDims {
    n: i32,
    k: i32,
    experts: i32,
    xdiv: i32,
    has_global: i32,
    ew: u32,
    es: u32,
}

/// `wick_fp_dequant`'s `WickFpDequantDims`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DequantDims {
    units: u32,
    per_mat: u32,
    has_global: i32,
}

/// A kernel argument: a buffer and the byte offset of the part's first element.
#[derive(Clone, Copy)]
struct Bound<'a> {
    buf: &'a Buffer,
    off: usize,
}

/// A weight's parts on the device, as kernel arguments.
struct Parts<'a> {
    packed: Bound<'a>,
    scales: Bound<'a>,
    global: Option<Bound<'a>>,
}

/// The contiguous elements of a weight part, from an offset of `align` bytes.
fn part<'a>(st: &'a candle_core::Storage, l: &Layout, what: &str, align: usize) -> candle_core::Result<Bound<'a>> {
    let s = MetalStorage::of(st).ok_or_else(|| {
        candle_core::Error::Msg(format!("fp quantized matmul on Metal: {what} is not on the Metal device"))
    })?;
    let size = s.dtype().size_in_bytes();
    match l.contiguous_offsets() {
        Some((a, _)) if (a * size).is_multiple_of(align) => Ok(Bound { buf: s.buffer(), off: a * size }),
        _ => candle_core::bail!(
            "fp quantized matmul on Metal: {what} must be contiguous from a {align}-byte aligned offset"
        ),
    }
}

/// `f` with the weight's scales and global scale borrowed from their storage (the guards held
/// for the launch); the packed codes are not touched (the dequantize op has them as its input).
fn with_scales<R>(
    w: &FpWeight,
    f: impl FnOnce(Bound<'_>, Option<Bound<'_>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (sst, sl) = w.scales.storage_and_layout();
    let g = w.global_scale.as_ref().map(|g| g.storage_and_layout());
    let global = match &g {
        Some((gst, gl)) => Some(part(gst, gl, "the weight's global scale", 4)?),
        None => None,
    };
    f(part(&sst, sl, "the weight's scales", 1)?, global)
}

/// `f` with all the weight's parts borrowed from their storage (the guards held for the launch).
fn with_parts<R>(
    w: &FpWeight,
    aligned: bool,
    f: impl FnOnce(&Parts) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (pst, pl) = w.packed.storage_and_layout();
    let packed = part(&pst, pl, "the weight's packed codes", if aligned { 16 } else { 4 })?;
    with_scales(w, |scales, global| f(&Parts { packed, scales, global }))
}

/// Binds the weight's parts at buffers 0-2: without a global scale the scales stand at 2 (the
/// kernels read it only with `has_global`, but every buffer they declare must be bound).
fn bind_weight(enc: &ComputeCommandEncoder, p: &Parts) {
    enc.set_input_buffer(0, Some(p.packed.buf), p.packed.off);
    enc.set_input_buffer(1, Some(p.scales.buf), p.scales.off);
    let g = p.global.unwrap_or(p.scales);
    enc.set_input_buffer(2, Some(g.buf), g.off);
}

fn size(width: usize, height: usize) -> MTLSize {
    MTLSize { width, height, depth: 1 }
}

/// The pipeline of kernel `name`, after checking that it runs `threads` threads per
/// threadgroup (Metal lowers the limit for kernels that need many registers; the launches here
/// assume it).
fn kernel(dev: &MetalDevice, name: &str, threads: usize) -> candle_core::Result<ComputePipeline> {
    let pipe = pipeline(dev, FP, name)?;
    let max = pipe.max_total_threads_per_threadgroup();
    if max < threads {
        candle_core::bail!(
            "Metal kernel {name} runs at most {max} threads per threadgroup, its launch needs {threads}"
        );
    }
    Ok(pipe)
}

/// Fails unless the input is contiguous from offset 0 of its buffer (the decode kernels' vector
/// loads; `kernel_input` makes it so).
fn x_at_start(l: &Layout, what: &str) -> candle_core::Result<()> {
    match l.contiguous_offsets() {
        Some((0, _)) => Ok(()),
        _ => candle_core::bail!("{what} on Metal needs a contiguous input starting at offset 0"),
    }
}

/// `x Wᵀ` on the device: the op on `x` (contiguous from offset 0, a kernel dtype), the weight
/// prepared.
struct FpMatMul {
    w: FpWeight,
}

impl candle_core::CustomOp1 for FpMatMul {
    fn name(&self) -> &'static str {
        "fp-quantized-matmul-metal"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("fp-quantized-matmul-metal runs on Metal only (the CPU has its own op)")
    }

    fn metal_fwd(&self, x: &MetalStorage, l: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        let w = &self.w;
        let (n, k) = (w.out_dim, w.in_dim);
        let m = l.shape().elem_count() / k.max(1);
        x_at_start(l, "fp quantized matmul")?;
        let dtype = x.dtype();
        let (tn, mn) = (dtype_suffix(dtype, "fp quantized matmul")?, mode_name(w.mode)?);
        let dev: &MetalDevice = x.device();
        let slices = row_slices(m)
            .map(|(r0, rows)| {
                let name = format!("wick_fpmv_{mn}_{tn}_m{}", rows.next_power_of_two());
                Ok((r0, rows, kernel(dev, &name, 32 * ROWS_PER_GROUP)?))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = dev.new_buffer_builder().with_size_for(m * n, dtype).with_label("wick_fpmv").build()?;
        let esize = dtype.size_in_bytes();
        with_parts(w, true, |p| {
            let guard = dev.command_encoder()?;
            let enc: &ComputeCommandEncoder = guard.as_ref();
            for (r0, rows, pipe) in &slices {
                enc.set_compute_pipeline_state(pipe);
                bind_weight(enc, p);
                enc.set_input_buffer(3, Some(x.buffer()), r0 * k * esize);
                enc.set_output_buffer(4, Some(&out), r0 * n * esize);
                let dims = MvDims { m: *rows as i32, n: n as i32, k: k as i32, has_global: p.global.is_some() as i32 };
                enc.set_bytes(5, &dims);
                enc.dispatch_thread_groups(size(n.div_ceil(ROWS_PER_GROUP), 1), size(32 * ROWS_PER_GROUP, 1));
            }
            Ok(())
        })?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("at least one dim") = n;
        Ok((MetalStorage::new(out, dev.clone(), m * n, dtype), Shape::from(dims)))
    }
}

/// The Metal backend for `fp_gpu`'s entry points.
struct Backend;

impl fp_gpu::FpDevice for Backend {
    const NAME: &'static str = "Metal";
    const MAX_ROUTED_ROWS: usize = u32::MAX as usize;
    fn is(device: &candle_core::Device) -> bool {
        device.is_metal()
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

/// `x Wᵀ` for x (…, in) with at most [`DECODE_ROWS`] rows, on Metal (more rows run in slices).
pub fn matmul(x: &Tensor, w: &FpWeight) -> Result<Tensor> {
    fp_gpu::matmul::<Backend>(x, w)
}

/// `mx.dequantize` on the device, as an op on the packed codes (contiguous): the scales and
/// global scale travel inside; the result is in `dtype` (f32 with a global scale).
struct FpDequantize {
    w: FpWeight,
    dtype: DType,
}

impl candle_core::CustomOp1 for FpDequantize {
    fn name(&self) -> &'static str {
        "fp-dequantize-metal"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("fp-dequantize-metal runs on Metal only (the CPU has quant::fp::dequantize_tensor)")
    }

    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        let w = &self.w;
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fp dequantize: packed codes not contiguous".into()))?;
        let total = (b - a) * fp::per_word(w.mode);
        let per_mat = w.out_dim * w.in_dim;
        let (units, per_mat32) = match (u32::try_from(total / 8), u32::try_from(per_mat)) {
            (Ok(u), Ok(p)) => (u, p),
            _ => candle_core::bail!("{} dequantize on Metal: {total} values are too many for one launch", w.mode),
        };
        let (tn, mn) = (dtype_suffix(self.dtype, "fp dequantize")?, mode_name(w.mode)?);
        let dev: &MetalDevice = s.device();
        let name = format!("wick_fp_dequant_{mn}_{tn}");
        let pipe = kernel(dev, &name, DEQUANT_THREADS)?;
        let out = dev.new_buffer_builder().with_size_for(total, self.dtype).with_label(&name).build()?;
        // (not `with_parts`: the packed codes are this op's input, their storage already held)
        with_scales(w, |scales, global| {
            let p = Parts { packed: Bound { buf: s.buffer(), off: a * 4 }, scales, global };
            let guard = dev.command_encoder()?;
            let enc: &ComputeCommandEncoder = guard.as_ref();
            enc.set_compute_pipeline_state(&pipe);
            bind_weight(enc, &p);
            enc.set_output_buffer(3, Some(&out), 0);
            let dims = DequantDims { units, per_mat: per_mat32, has_global: p.global.is_some() as i32 };
            enc.set_bytes(4, &dims);
            let groups = (units as usize).div_ceil(DEQUANT_THREADS).max(1);
            enc.dispatch_thread_groups(size(groups, 1), size(DEQUANT_THREADS, 1));
            Ok(())
        })?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("a matrix") *= fp::per_word(w.mode);
        Ok((MetalStorage::new(out, dev.clone(), total, self.dtype), Shape::from(dims)))
    }
}

/// `mx.dequantize` of the weight on its Metal device, in `dtype` (f32 with a global scale).
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

impl candle_core::CustomOp2 for FpGather {
    fn name(&self) -> &'static str {
        "gathered-fp-quantized-matmul-metal"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("gathered-fp-quantized-matmul-metal runs on Metal only (the CPU groups rows on the host)")
    }

    fn metal_fwd(
        &self,
        x: &MetalStorage,
        xl: &Layout,
        ids: &MetalStorage,
        il: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        let w = &self.w;
        let (n, k) = (w.out_dim, w.in_dim);
        let (ia, ib) = match il.contiguous_offsets() {
            Some(o) if ids.dtype() == DType::U32 => o,
            _ => candle_core::bail!("gathered fp matmul: expert ids must be contiguous u32"),
        };
        let rows = ib - ia;
        if xl.shape().elem_count() * self.xdiv != rows * k {
            candle_core::bail!(
                "gathered fp matmul: {} input values for {rows} routed rows of {k} ({} per input row)",
                xl.shape().elem_count(),
                self.xdiv
            );
        }
        x_at_start(xl, "gathered fp matmul")?;
        let (ew, es) = match (u32::try_from(n * k / fp::per_word(w.mode)), u32::try_from(n * k / fp::group(w.mode))) {
            (Ok(a), Ok(b)) => (a, b),
            _ => candle_core::bail!("gathered fp matmul on Metal: a {n} x {k} matrix is too large for the kernel"),
        };
        let dtype = x.dtype();
        let (tn, mn) = (dtype_suffix(dtype, "gathered fp matmul")?, mode_name(w.mode)?);
        let dev: &MetalDevice = x.device();
        let name = format!("wick_gfpmv_{mn}_{tn}");
        let pipe = kernel(dev, &name, 32 * ROWS_PER_GROUP)?;
        let out = dev.new_buffer_builder().with_size_for(rows * n, dtype).with_label(&name).build()?;
        with_parts(w, true, |p| {
            let guard = dev.command_encoder()?;
            let enc: &ComputeCommandEncoder = guard.as_ref();
            enc.set_compute_pipeline_state(&pipe);
            bind_weight(enc, p);
            enc.set_input_buffer(3, Some(ids.buffer()), ia * 4);
            enc.set_input_buffer(4, Some(x.buffer()), 0);
            enc.set_output_buffer(5, Some(&out), 0);
            let dims = GatherDims {
                n: n as i32,
                k: k as i32,
                experts: self.experts as i32,
                xdiv: self.xdiv as i32,
                has_global: p.global.is_some() as i32,
                ew,
                es,
            };
            enc.set_bytes(6, &dims);
            enc.dispatch_thread_groups(size(n.div_ceil(ROWS_PER_GROUP), rows), size(32 * ROWS_PER_GROUP, 1));
            Ok(())
        })?;
        Ok((MetalStorage::new(out, dev.clone(), rows * n, dtype), Shape::from((rows, n))))
    }
}

/// Routed row `r` of the result is row `r / xdiv` of `x` times matrix `ids[r]` of the stack `w`
/// (`ids` u32 on the device). A routed row whose id is outside the stack comes out NaN (the
/// ids are never read back to check them).
pub fn gather_rows(x: &Tensor, w: &FpWeight, ids: &Tensor, xdiv: usize) -> Result<Tensor> {
    fp_gpu::gather_rows::<Backend>(x, w, ids, xdiv)
}
