//! Metal backend of the affine quantized matmul: launches the kernels of `affine.metal`
//! (compiled at run time by `crate::backend::metal`), next to the CPU (`ops::qmatmul::cpu`) and CUDA
//! (`ops::qmatmul::cuda`) backends of the same op.
//!
//! - up to [`MAX_DECODE_ROWS`] input rows (decode): `wick_qmv_*`, one SIMD group per output row;
//! - more rows (prefill): `wick_qmm_*`, 32 × 32 output tiles in threadgroup memory;
//! - `mx.dequantize`: `wick_dequant_*` (embedding rows, fuse, the backward pass).
//!
//! Type-checked for aarch64-apple-darwin; never run here (docs/metal.md).

use crate::backend::metal::{dtype_suffix, pipeline, Source};
use crate::quant::QuantParams;

/// affine.metal with affine_chunk.h (the arithmetic shared with the CUDA kernels) in front.
const AFFINE: Source = Source {
    name: "affine",
    text: || {
        let shared = include_str!("affine_chunk.h").replace("#pragma once", "");
        format!("#include <metal_stdlib>\nusing namespace metal;\n{shared}\n{}", include_str!("affine.metal"))
    },
};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder};
use objc2_metal::MTLSize;

/// `wick_qmv` serves at most this many input rows (QMV_MAX_ROWS in affine.metal).
pub const MAX_DECODE_ROWS: usize = 8;
/// Output rows per threadgroup of `wick_qmv` (QMV_SIMDGROUPS).
const QMV_ROWS_PER_GROUP: usize = 8;
/// `wick_qmm`'s output tile (TILE).
const TILE: usize = 32;

/// The kernels' `WickDims`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Dims {
    m: i32,
    n: i32,
    k: i32,
    gs: i32,
}

/// The three parts of a quantized weight on one Metal device.
pub type WeightParts<'a> = super::WeightParts<'a, MetalStorage>;

/// A buffer and the byte offset of a contiguous tensor's first element.
fn contiguous<'a>(s: &'a MetalStorage, l: &Layout, what: &str) -> Result<(&'a Buffer, usize)> {
    if !l.is_contiguous() {
        candle_core::bail!("quantized matmul on Metal: {what} must be contiguous");
    }
    Ok((s.buffer(), l.start_offset() * s.dtype().size_in_bytes()))
}

fn check(p: QuantParams, k: usize) -> Result<()> {
    if !matches!(p.bits, 2 | 3 | 4 | 5 | 6 | 8) || !matches!(p.group_size, 32 | 64 | 128) || !k.is_multiple_of(32) {
        candle_core::bail!(
            "quantized matmul on Metal: bits {} / group size {} / {k} inputs are not supported (bits 2-6 or 8, groups 32/64/128, inputs a multiple of 32)",
            p.bits,
            p.group_size
        );
    }
    Ok(())
}

/// Binds the weight's parts at buffers 0-2.
fn bind_weight(enc: &ComputeCommandEncoder, w: &WeightParts) -> Result<()> {
    for (i, (s, l, what)) in [
        (w.packed, w.packed_layout, "the packed codes"),
        (w.scales, w.scales_layout, "the scales"),
        (w.biases, w.biases_layout, "the biases"),
    ]
    .into_iter()
    .enumerate()
    {
        let (buf, off) = contiguous(s, l, what)?;
        enc.set_input_buffer(i, Some(buf), off);
    }
    Ok(())
}

fn size(width: usize, height: usize) -> MTLSize {
    MTLSize { width, height, depth: 1 }
}

/// `y = x · Wᵀ` for `x` (…, k) in the scales' dtype: the decode kernel for up to
/// [`MAX_DECODE_ROWS`] rows, the tiled kernel beyond.
pub fn qmm(x: &MetalStorage, l: &Layout, w: &WeightParts) -> Result<(MetalStorage, Shape)> {
    check(w.p, w.k)?;
    let dtype = x.dtype();
    let m = l.shape().elem_count() / w.k.max(1);
    let dev: &MetalDevice = x.device();
    let decode = m <= MAX_DECODE_ROWS;
    let name = format!(
        "wick_{}_{}_b{}",
        if decode { "qmv" } else { "qmm" },
        dtype_suffix(dtype, "quantized matmul")?,
        w.p.bits
    );
    let pipe = pipeline(dev, AFFINE, &name)?;
    let out = dev.new_buffer_builder().with_size_for(m * w.n, dtype).with_label(&name).build()?;
    let dims = Dims { m: m as i32, n: w.n as i32, k: w.k as i32, gs: w.p.group_size as i32 };
    {
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_compute_pipeline_state(&pipe);
        bind_weight(enc, w)?;
        let (xb, xoff) = contiguous(x, l, "the input")?;
        enc.set_input_buffer(3, Some(xb), xoff);
        enc.set_output_buffer(4, Some(&out), 0);
        enc.set_bytes(5, &dims);
        if decode {
            enc.dispatch_thread_groups(size(w.n.div_ceil(QMV_ROWS_PER_GROUP), 1), size(32 * QMV_ROWS_PER_GROUP, 1));
        } else {
            enc.dispatch_thread_groups(size(w.n.div_ceil(TILE), m.div_ceil(TILE)), size(16, 16));
        }
    }
    let mut dims_out = l.shape().dims().to_vec();
    *dims_out.last_mut().expect("an input with a feature axis") = w.n;
    Ok((MetalStorage::new(out, dev.clone(), m * w.n, dtype), Shape::from(dims_out)))
}

/// The dense matrix (n × k) in `dtype` (the scales'), rounded as `mx.dequantize` rounds.
pub fn dequantize(dev: &MetalDevice, w: &WeightParts, dtype: DType) -> Result<MetalStorage> {
    check(w.p, w.k)?;
    let name = format!("wick_dequant_{}_b{}", dtype_suffix(dtype, "dequantize")?, w.p.bits);
    let pipe = pipeline(dev, AFFINE, &name)?;
    let count = w.n * w.k;
    let out = dev.new_buffer_builder().with_size_for(count, dtype).with_label(&name).build()?;
    let dims = Dims { m: 0, n: w.n as i32, k: w.k as i32, gs: w.p.group_size as i32 };
    let threads = w.n * (w.k / 32);
    {
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_compute_pipeline_state(&pipe);
        bind_weight(enc, w)?;
        enc.set_output_buffer(3, Some(&out), 0);
        enc.set_bytes(4, &dims);
        enc.dispatch_thread_groups(size(threads.div_ceil(256).max(1), 1), size(256, 1));
    }
    Ok(MetalStorage::new(out, dev.clone(), count, dtype))
}
