//! CUDA backend of the affine quantized matmul: launches the kernels of `affine.cu`
//! (compiled by build.rs into a fatbin embedded in the binary, loaded by `crate::backend::cuda`).
//!
//! - up to 32 input rows (decode, decode batches) of 4-bit weights in f16 / bf16:
//!   `wick_qmt*`, the codes through the tensor cores against all rows at once (one launch,
//!   the packed weight read once); for one input row only where the layer has many rows (the
//!   head), as the scalar kernel is as fast on the others;
//! - other decode shapes (bits, f32, up to 32 rows): `wick_qmv_*`, one warp per output row,
//!   reading the packed weight once per slice of 8 rows;
//! - more rows (prefill): the weight is dequantized by `wick_dequant_*` into a dense temporary
//!   and multiplied with cuBLAS on the tensor cores (see docs/cuda.md for why and what it costs).

use crate::backend::cuda::Launch;
use crate::quant::QuantParams;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape, WithDType};

/// Decode kernels are instantiated for at most this many input rows; more rows run in slices.
pub const MAX_DECODE_ROWS: usize = 8;
/// Up to this many input rows (a decode batch) the decode kernels run, in slices of
/// [`MAX_DECODE_ROWS`], each reading the packed weights once; beyond it (prefill) the weights
/// are dequantized once and cuBLAS multiplies. Dequantizing writes and re-reads ~4.6 bytes per
/// weight against ~0.56 per slice, so slices win up to a few dozen rows.
pub const DECODE_PATH_ROWS: usize = 32;

/// `(first row, rows)` of each slice of at most [`MAX_DECODE_ROWS`] of `m` input rows.
fn row_slices(m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m).step_by(MAX_DECODE_ROWS).map(move |r0| (r0, (m - r0).min(MAX_DECODE_ROWS)))
}
const WARPS_PER_BLOCK: usize = 8;

pub(crate) fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    crate::backend::cuda::function(dev, crate::backend::cuda::Module::Affine, name)
}

pub(crate) fn dtype_name(d: DType) -> Result<&'static str> {
    crate::backend::cuda::dtype_suffix(d, "quantized matmul")
}

/// The contiguous CUDA view of a weight part: from offset 0 of its storage, or from a 16-byte
/// aligned offset (one expert of a stack, `gather_mm::expert`), so that the kernels' 16-byte
/// loads stay aligned.
fn weight_slice<'a, T: CudaDType>(st: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let aligned = (l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16);
    match l.contiguous_offsets() {
        Some((start, end)) if aligned => Ok(st.as_cuda_slice::<T>()?.slice(start..end)),
        _ => candle_core::bail!(
            "quantized matmul on CUDA: the weight's {what} must be contiguous from a 16-byte aligned offset"
        ),
    }
}

/// The three parts of a quantized weight on one CUDA device.
pub type WeightParts<'a> = super::WeightParts<'a, CudaStorage>;

/// A weight's packed codes, scales and biases on the device.
pub(crate) type Parts<'a, T> = (CudaView<'a, u32>, CudaView<'a, T>, CudaView<'a, T>);

impl WeightParts<'_> {
    /// Packed codes, scales and biases as the kernels take them (scales in the activation dtype).
    pub(crate) fn slices<T: CudaDType>(&self) -> Result<Parts<'_, T>> {
        Ok((
            weight_slice::<u32>(self.packed, self.packed_layout, "packed codes")?,
            weight_slice::<T>(self.scales, self.scales_layout, "scales")?,
            weight_slice::<T>(self.biases, self.biases_layout, "biases")?,
        ))
    }
}

/// The launch of a decode kernel over `n` output rows, `rows_per_warp` of them per warp.
pub(crate) fn rows_launch(n: usize, rows_per_warp: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(rows_per_warp * WARPS_PER_BLOCK) as u32, 1, 1),
        block_dim: ((WARPS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Output rows per warp of `wick_qmv*` (see affine.cu's `first_row`): two for one input row.
fn rows_per_warp(mm: usize) -> usize {
    if mm == 1 {
        2
    } else {
        1
    }
}

/// Output rows of one `wick_qmt*` tile (one thread block).
pub(crate) const QMT_TILE: usize = 16;
/// From this many tiles on, one input row also takes the tensor-core kernel.
const QMT_ONE_ROW_TILES: usize = 2048;
/// Below this many tiles, eight warps share a tile's k (else four): fewer tiles need more
/// warps each to keep the memory busy, more tiles run better with smaller blocks.
const QMT_WIDE_BELOW: usize = 512;

/// The tensor-core kernel's launch for `m` input rows against `tiles` tiles of weights with
/// these parameters in `dtype`, or None where it does not apply: its name suffix
/// (`{tn}_g{gs}_n{tiles of 8 inputs}_w{warps}`) and its launch configuration.
fn qmt_launch(dtype: DType, p: QuantParams, m: usize, tiles: usize) -> Option<(String, LaunchConfig)> {
    if !qmt_applies(dtype, p, m, tiles) {
        return None;
    }
    let tn = dtype_name(dtype).ok()?;
    let warps = if tiles < QMT_WIDE_BELOW { 8 } else { 4 };
    Some((format!("{tn}_g{}_n{}_w{warps}", p.group_size, m.div_ceil(8)), tile_launch(tiles, warps)))
}

/// One block of `warps` warps per tile of 16 output rows (the tensor-core kernels).
fn tile_launch(tiles: usize, warps: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (tiles as u32, 1, 1), block_dim: (warps * 32, 1, 1), shared_mem_bytes: 0 }
}

/// Whether the tensor-core kernels are built for weights with these parameters in `dtype`:
/// 4-bit codes, f16 / bf16, group size 32, 64 or 128.
fn tensor_core_weights(dtype: DType, p: QuantParams) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && p.bits == 4 && matches!(p.group_size, 32 | 64 | 128)
}

/// Whether `m` input rows against `tiles` tiles of a weight take the tensor-core kernel.
fn qmt_applies(dtype: DType, p: QuantParams, m: usize, tiles: usize) -> bool {
    tensor_core_weights(dtype, p) && (1..=DECODE_PATH_ROWS).contains(&m) && (m > 1 || tiles >= QMT_ONE_ROW_TILES)
}

/// Codes per segment of `wick_qm1*` (64 bytes of a row at 4 bits): k must be a multiple.
const QM1_SEGMENT: usize = 128;
/// The warps a one-row layer runs at least, when its tiles allow (measured on an H100: fewer
/// leave the memory idle, more split k too finely): 4 warps per tile from this many tiles × 4
/// on, else 8, else 16.
pub(crate) const QM1_WARPS: usize = 3000;
/// The same for the fused gate/up kernel, whose segments carry two weights: 4 warps per tile
/// from 512 tiles on. Measured on an H100 with programmatic launches, each shape's gate/up
/// alone in one graph of its layers: the Llama-1B shape's (512 tiles) 0.126 ms per 16 layers at
/// 4 warps against 0.159 at 8; the 8B's (896 tiles) 0.845 against 1.071 ms per 32 layers.
pub(crate) const QM1_SWIGLU_WARPS: usize = 2048;

/// Whether one input row takes the tensor-core one-row kernel (`wick_qm1*`).
fn qm1_applies(dtype: DType, p: QuantParams, m: usize, k: usize) -> bool {
    tensor_core_weights(dtype, p) && m == 1 && k.is_multiple_of(QM1_SEGMENT)
}

/// The one-row kernel's launch over `tiles` tiles of 16 rows, or None where it does not apply:
/// its name suffix (`{tn}_g{gs}_w{warps}`) and launch configuration.
/// `min_warps`: [`QM1_WARPS`], or [`QM1_SWIGLU_WARPS`] for the fused gate/up kernel.
pub(crate) fn qm1_launch(
    dtype: DType,
    p: QuantParams,
    m: usize,
    k: usize,
    tiles: usize,
    min_warps: usize,
) -> Option<(String, LaunchConfig)> {
    if !qm1_applies(dtype, p, m, k) {
        return None;
    }
    let tn = dtype_name(dtype).ok()?;
    let warps = [4u32, 8].into_iter().find(|&w| tiles * w as usize >= min_warps).unwrap_or(16);
    Some((format!("{tn}_g{}_w{warps}", p.group_size), tile_launch(tiles, warps)))
}

/// Which kernel multiplies `m` input rows in `dtype` by an `n` × `k` weight with parameters
/// `p`: `"qm1"` (one row, tensor cores), `"qmt"` (tensor cores), `"qmv"` (scalar decode
/// kernel) or `"dequant + cuBLAS"` (for reports).
pub fn kernel_name(dtype: DType, p: QuantParams, m: usize, n: usize, k: usize) -> &'static str {
    if qm1_applies(dtype, p, m, k) {
        "qm1"
    } else if qmt_applies(dtype, p, m, n.div_ceil(QMT_TILE)) {
        "qmt"
    } else if m <= DECODE_PATH_ROWS {
        "qmv"
    } else {
        "dequant + cuBLAS"
    }
}

/// The packed codes, scales and biases of each weight as the next kernel arguments.
pub(crate) fn push_parts<'a, T>(b: &mut Launch<'a>, parts: &'a [Parts<'a, T>]) {
    for (w, s, bi) in parts {
        b.arg(w).arg(s).arg(bi);
    }
}

fn qmv_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    x: &CudaStorage,
    x_layout: &Layout,
    w: &WeightParts,
    m: usize,
) -> Result<CudaSlice<T>> {
    let tn = dtype_name(T::DTYPE)?;
    let (packed, scales, biases) = w.slices::<T>()?;
    let x = x_view::<T>(x, x_layout)?;
    let out = unsafe { dev.alloc::<T>(m * w.n)? };
    let stream = dev.cuda_stream();
    let (m_i, n_i, k_i, gs_i) = (m as i32, w.n as i32, w.k as i32, w.p.group_size as i32);
    if let Some((name, cfg)) = qm1_launch(T::DTYPE, w.p, m, w.k, w.n.div_ceil(QMT_TILE), QM1_WARPS) {
        let f = function(dev, &format!("wick_qm1_{name}"))?;
        let mut b = Launch::new(&stream, &f);
        b.arg(&packed).arg(&scales).arg(&biases).arg(&x).arg(&out).arg(&n_i).arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        return Ok(out);
    }
    if let Some((name, cfg)) = qmt_launch(T::DTYPE, w.p, m, w.n.div_ceil(QMT_TILE)) {
        let f = function(dev, &format!("wick_qmt_{name}"))?;
        let mut b = Launch::new(&stream, &f);
        b.arg(&packed).arg(&scales).arg(&biases).arg(&x).arg(&out).arg(&m_i).arg(&n_i).arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        return Ok(out);
    }
    for (r0, rows) in row_slices(m) {
        let mm = rows.next_power_of_two();
        let f = function(dev, &format!("wick_qmv_{tn}_b{}_m{mm}", w.p.bits))?;
        let xs = x.slice(r0 * w.k..(r0 + rows) * w.k);
        let ys = out.slice(r0 * w.n..(r0 + rows) * w.n);
        let rows_i = rows as i32;
        let mut b = Launch::new(&stream, &f);
        b.arg(&packed).arg(&scales).arg(&biases).arg(&xs).arg(&ys).arg(&rows_i).arg(&n_i).arg(&k_i).arg(&gs_i);
        unsafe { b.launch(rows_launch(w.n, rows_per_warp(mm))) }.w()?;
    }
    Ok(out)
}

/// `y = x · dequant(W)ᵀ` with the decode kernel for any number of rows `m` of `x` (slices of
/// up to 8 rows); `x` has the scales' dtype.
pub fn qmv(x: &CudaStorage, x_layout: &Layout, w: &WeightParts) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let dims = x_layout.shape().dims();
    let m = x_layout.shape().elem_count() / w.k.max(1);
    let storage =
        crate::backend::cuda::by_dtype!(x.dtype(), "quantized matmul", dev, qmv_typed(&dev, x, x_layout, w, m));
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("at least one dim") = w.n;
    Ok((storage, Shape::from(out_dims)))
}

fn dequant_typed<T: CudaDType + DeviceRepr + WithDType>(dev: &CudaDevice, w: &WeightParts) -> Result<CudaSlice<T>> {
    let tn = dtype_name(T::DTYPE)?;
    let (packed, scales, biases) = w.slices::<T>()?;
    let out = unsafe { dev.alloc::<T>(w.n * w.k)? };
    // codes per thread: eight at 4 and 8 bits (`dequant8_impl`), else 32
    let per = if matches!(w.p.bits, 4 | 8) { 8 } else { 32 };
    let chunks = (w.n * w.k / per) as u32;
    let cfg = LaunchConfig { grid_dim: (chunks.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = function(dev, &format!("wick_dequant_{tn}_b{}", w.p.bits))?;
    let (n_i, k_i, gs_i) = (w.n as i32, w.k as i32, w.p.group_size as i32);
    let stream = dev.cuda_stream();
    let mut b = Launch::new(&stream, &f);
    b.arg(&packed).arg(&scales).arg(&biases).arg(&out).arg(&n_i).arg(&k_i).arg(&gs_i);
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// The dense matrix (n × k) in the scales' dtype, rounded as `mx.dequantize` rounds.
pub fn dequantize(dev: &CudaDevice, w: &WeightParts, dtype: DType) -> Result<CudaStorage> {
    Ok(crate::backend::cuda::by_dtype!(dtype, "dequantize", dev.clone(), dequant_typed(dev, w)))
}

/// Whether the fused decode kernels (`wick_qmv3_*`, `wick_qmv_swiglu_*`) exist for these bits.
pub fn has_fused(p: QuantParams) -> bool {
    matches!(p.bits, 4 | 8)
}

/// The input rows as a view; the caller passes a tensor whose storage starts at offset 0
/// (`matmul::kernel_input`), so that the kernels' 16-byte loads are aligned.
pub(crate) fn x_view<'a, T: CudaDType + DeviceRepr + WithDType>(
    x: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((0, end)) => Ok(x.as_cuda_slice::<T>()?.slice(0..end)),
        _ => candle_core::bail!("quantized matmul on CUDA needs a contiguous input starting at offset 0"),
    }
}

fn qmv3_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    x: &CudaStorage,
    l: &Layout,
    ws: [&WeightParts; 3],
    m: usize,
    deferred: Option<f32>,
) -> Result<CudaSlice<T>> {
    let tn = dtype_name(T::DTYPE)?;
    let xs = x_view::<T>(x, l)?;
    let total: usize = ws.iter().map(|w| w.n).sum();
    let out = unsafe { dev.alloc::<T>(m * total)? };
    let parts = [ws[0].slices::<T>()?, ws[1].slices::<T>()?, ws[2].slices::<T>()?];
    let (n0, n1) = (ws[0].n, ws[1].n);
    let ns = [ws[0].n as i32, ws[1].n as i32, ws[2].n as i32];
    let (k, k_i, gs_i) = (ws[0].k, ws[0].k as i32, ws[0].p.group_size as i32);
    let stream = dev.cuda_stream();
    // each projection's rows r0 .. r0 + rows of the flat output
    let outputs = |r0: usize, rows: usize| {
        let at = |base: usize, n: usize| out.slice(base + r0 * n..base + (r0 + rows) * n);
        [at(0, n0), at(m * n0, n1), at(m * (n0 + n1), ws[2].n)]
    };
    let tiles: usize = ws.iter().map(|w| w.n.div_ceil(QMT_TILE)).sum();
    if let Some((name, cfg)) = qm1_launch(T::DTYPE, ws[0].p, m, k, tiles, QM1_WARPS) {
        let ys = outputs(0, m);
        let carrier = deferred.map(|eps| deferred_input(&xs, k, eps)).transpose()?;
        let f = function(dev, &format!("wick_qm13{}_{name}", if deferred.is_some() { "n" } else { "" }))?;
        let mut b = Launch::new(&stream, &f);
        push_parts(&mut b, &parts);
        b.arg(&ys[0]).arg(&ys[1]).arg(&ys[2]).arg(&ns[0]).arg(&ns[1]).arg(&ns[2]);
        match &carrier {
            Some((u, sq, nsq, eps)) => b.arg(u).arg(sq).arg(nsq).arg(&k_i).arg(eps),
            None => b.arg(&xs).arg(&k_i),
        };
        unsafe { b.launch(cfg) }.w()?;
        return Ok(out);
    }
    if deferred.is_some() {
        candle_core::bail!("deferred norm: no one-row kernel for this q/k/v (checked by deferred_norm_fits)");
    }
    if let Some((name, cfg)) = qmt_launch(T::DTYPE, ws[0].p, m, tiles) {
        let f = function(dev, &format!("wick_qmt3_{name}"))?;
        let ys = outputs(0, m);
        let m_i = m as i32;
        let mut b = Launch::new(&stream, &f);
        push_parts(&mut b, &parts);
        b.arg(&ys[0]).arg(&ys[1]).arg(&ys[2]).arg(&ns[0]).arg(&ns[1]).arg(&ns[2]);
        b.arg(&xs).arg(&m_i).arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        return Ok(out);
    }
    for (r0, rows) in row_slices(m) {
        let ys = outputs(r0, rows);
        let xr = xs.slice(r0 * k..(r0 + rows) * k);
        let mm = rows.next_power_of_two();
        let f = function(dev, &format!("wick_qmv3_{tn}_b{}_m{mm}", ws[0].p.bits))?;
        let m_i = rows as i32;
        // pairs of rows never straddle two weights: fused_qkv passes even sizes only
        let cfg = rows_launch(total, rows_per_warp(mm));
        let mut b = Launch::new(&stream, &f);
        push_parts(&mut b, &parts);
        b.arg(&ys[0]).arg(&ys[1]).arg(&ys[2]).arg(&ns[0]).arg(&ns[1]).arg(&ns[2]);
        b.arg(&xr).arg(&m_i).arg(&k_i).arg(&gs_i);
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(out)
}

/// Three projections of the same input in one launch per 8 rows; the output is flat: all of
/// the first projection's rows (m × n0), then the second's, then the third's.
pub fn qmv3(x: &CudaStorage, l: &Layout, ws: [&WeightParts; 3]) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let m = l.shape().elem_count() / ws[0].k.max(1);
    let total: usize = ws.iter().map(|w| w.n).sum();
    let st = crate::backend::cuda::by_dtype!(x.dtype(), "fused matmul", dev, qmv3_typed(&dev, x, l, ws, m, None));
    Ok((st, Shape::from(m * total)))
}

/// [`qmv3`] of one row in the deferred-norm form ([`qm1_res`]'s output `d`), scaled by the
/// norm's rsqrt(mean of squares + `eps`).
pub fn qmv3_deferred(d: &CudaStorage, l: &Layout, ws: [&WeightParts; 3], eps: f32) -> Result<(CudaStorage, Shape)> {
    let dev = d.device().clone();
    let total: usize = ws.iter().map(|w| w.n).sum();
    let st = crate::backend::cuda::by_dtype!(d.dtype(), "fused matmul", dev, qmv3_typed(&dev, d, l, ws, 1, Some(eps)));
    Ok((st, Shape::from(total)))
}

fn swiglu_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    x: &CudaStorage,
    l: &Layout,
    g: &WeightParts,
    u: &WeightParts,
    m: usize,
    deferred: Option<f32>,
) -> Result<CudaSlice<T>> {
    let tn = dtype_name(T::DTYPE)?;
    let xs = x_view::<T>(x, l)?;
    let out = unsafe { dev.alloc::<T>(m * g.n)? };
    let (n, n_i, k_i, gs_i) = (g.n, g.n as i32, g.k as i32, g.p.group_size as i32);
    let parts = [g.slices::<T>()?, u.slices::<T>()?];
    let stream = dev.cuda_stream();
    if let Some((name, cfg)) = qm1_launch(T::DTYPE, g.p, m, g.k, n.div_ceil(QMT_TILE), QM1_SWIGLU_WARPS) {
        let carrier = deferred.map(|eps| deferred_input(&xs, g.k, eps)).transpose()?;
        let f = function(dev, &format!("wick_qm1_swiglu{}_{name}", if deferred.is_some() { "n" } else { "" }))?;
        let mut b = Launch::new(&stream, &f);
        push_parts(&mut b, &parts);
        match &carrier {
            Some((u, sq, nsq, eps)) => b.arg(u).arg(sq).arg(nsq).arg(&out).arg(&n_i).arg(&k_i).arg(eps),
            None => b.arg(&xs).arg(&out).arg(&n_i).arg(&k_i),
        };
        unsafe { b.launch(cfg) }.w()?;
        return Ok(out);
    }
    if deferred.is_some() {
        candle_core::bail!("deferred norm: no one-row kernel for this gate/up (checked by deferred_norm_fits)");
    }
    if let Some((name, cfg)) = qmt_launch(T::DTYPE, g.p, m, n.div_ceil(QMT_TILE)) {
        let f = function(dev, &format!("wick_qmt_swiglu_{name}"))?;
        let m_i = m as i32;
        let mut b = Launch::new(&stream, &f);
        push_parts(&mut b, &parts);
        b.arg(&xs).arg(&out).arg(&m_i).arg(&n_i).arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        return Ok(out);
    }
    for (r0, rows) in row_slices(m) {
        let mm = rows.next_power_of_two();
        let f = function(dev, &format!("wick_qmv_swiglu_{tn}_b{}_m{mm}", g.p.bits))?;
        let (xr, yr) = (xs.slice(r0 * g.k..(r0 + rows) * g.k), out.slice(r0 * n..(r0 + rows) * n));
        let m_i = rows as i32;
        // one output row per warp: for one input row it computes that row of both weights
        let cfg = rows_launch(g.n, 1);
        let mut b = Launch::new(&stream, &f);
        push_parts(&mut b, &parts);
        b.arg(&xr).arg(&yr).arg(&m_i).arg(&n_i).arg(&k_i).arg(&gs_i);
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(out)
}

/// `silu(x·Gᵀ) * (x·Uᵀ)` in one launch per 8 rows of `x`.
pub fn qmv_swiglu(x: &CudaStorage, l: &Layout, g: &WeightParts, u: &WeightParts) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let dims = l.shape().dims();
    let m = l.shape().elem_count() / g.k.max(1);
    let st = crate::backend::cuda::by_dtype!(x.dtype(), "fused matmul", dev, swiglu_typed(&dev, x, l, g, u, m, None));
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("at least one dim") = g.n;
    Ok((st, Shape::from(out_dims)))
}

/// [`qmv_swiglu`] of one row in the deferred-norm form ([`qm1_res`]'s output `d`), both
/// products scaled by the norm's rsqrt(mean of squares + `eps`) before the activation.
pub fn qmv_swiglu_deferred(
    d: &CudaStorage,
    l: &Layout,
    g: &WeightParts,
    u: &WeightParts,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = d.device().clone();
    let st =
        crate::backend::cuda::by_dtype!(d.dtype(), "fused matmul", dev, swiglu_typed(&dev, d, l, g, u, 1, Some(eps)));
    Ok((st, Shape::from(g.n)))
}

/// The largest norm dimension of the deferred norm (affine.cu `SQ_MAX` tiles of 16 rows).
const DEFERRED_NORM_MAX_DIM: usize = 8192;

/// Whether the deferred norm applies to a decode row (one row) of `dtype`: the producer's
/// weight `w` (o or down: its output is the norm's dimension) and the consumers' weights `next`
/// (q/k/v or gate/up, taking that dimension in) all run the one-row kernel, and the dimension
/// fits the partial sums.
pub fn deferred_norm_fits(dtype: DType, w: QuantParams, k: usize, d: usize, next: QuantParams) -> bool {
    qm1_applies(dtype, w, 1, k) && qm1_applies(dtype, next, 1, d) && d <= DEFERRED_NORM_MAX_DIM
}

/// A deferred-norm carrier of d values ([`qm1_res`]) as the consumer kernels take it: u (the
/// first d), the partial sums (from 2d on, f32 bit patterns), their count, and `eps`.
type Carrier<'a, T> = (CudaView<'a, T>, CudaView<'a, T>, i32, f32);

fn deferred_input<'a, T: DeviceRepr>(xs: &CudaView<'a, T>, d: usize, eps: f32) -> Result<Carrier<'a, T>> {
    if xs.len() != 3 * d {
        candle_core::bail!("deferred norm: a carrier of {} values for a dimension of {d} (3 x {d} expected)", xs.len());
    }
    Ok((xs.slice(0..d), xs.slice(2 * d..3 * d), d.div_ceil(QMT_TILE) as i32, eps))
}

fn res_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (x, xl): (&CudaStorage, &Layout),
    w: &WeightParts,
    (r, rl): (&CudaStorage, &Layout),
    (nw, nl): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let d = w.n;
    let Some((name, cfg)) = qm1_launch(T::DTYPE, w.p, 1, w.k, d.div_ceil(QMT_TILE), QM1_WARPS) else {
        candle_core::bail!("deferred norm: no one-row kernel for this weight (checked by deferred_norm_fits)")
    };
    if rl.shape().elem_count() != d || nl.shape().elem_count() != d || d > DEFERRED_NORM_MAX_DIM {
        candle_core::bail!(
            "deferred norm: the residual {:?} and the norm's weight {:?} must have the {d} values of the output",
            rl.shape(),
            nl.shape()
        );
    }
    let xs = x_view::<T>(x, xl)?;
    let view = |s, l, what: &str| crate::backend::cuda::contiguous_view::<T>(s, l, &format!("deferred norm: {what}"));
    let (r, nw) = (view(r, rl, "the residual")?, view(nw, nl, "the norm's weight")?);
    let (parts, (n_i, k_i)) = (w.slices::<T>()?, (d as i32, w.k as i32));
    let out = unsafe { dev.alloc::<T>(3 * d)? };
    let (u, h, sq) = (out.slice(0..d), out.slice(d..2 * d), out.slice(2 * d..));
    let f = function(dev, &format!("wick_qm1_res_{name}"))?;
    let stream = dev.cuda_stream();
    let mut b = Launch::new(&stream, &f);
    push_parts(&mut b, std::slice::from_ref(&parts));
    b.arg(&xs).arg(&r).arg(&nw).arg(&h).arg(&u).arg(&sq).arg(&n_i).arg(&k_i);
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// The first half of the deferred RMSNorm (affine.cu `qm1_res_impl`): one row `x` times `w`
/// (o or down), plus the residual `r`, as the next matmul takes it: a flat carrier of 3·d
/// values, u = h·(the norm's weight `nw`) (the first d), h = x·Wᵀ + r (the next d), then the
/// partial sums of h² per 16 rows (f32 bit patterns). [`qmv3_deferred`] and
/// [`qmv_swiglu_deferred`] finish the norm.
pub fn qm1_res(
    x: (&CudaStorage, &Layout),
    w: &WeightParts,
    r: (&CudaStorage, &Layout),
    nw: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let st = crate::backend::cuda::by_dtype!(x.0.dtype(), "deferred norm", dev, res_typed(&dev, x, w, r, nw));
    Ok((st, Shape::from(3 * w.n)))
}
