//! What the GPU backends of the float-mode matmul (`fp_cuda.rs`, `fp_metal.rs`) share: the
//! kernels' name for a mode, the activation dtype they compute in, which rows they take, the
//! checks of a weight's parts, and the weight prepared for their loads.

use super::FpWeight;
use crate::quant::{fp, Mode};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// The decode kernels are instantiated for 1, 2, 4 and 8 rows; more rows run in slices of 8.
pub(crate) const KERNEL_ROWS: usize = 8;

/// The kernel-name part of a float mode.
pub(crate) fn mode_name(mode: Mode) -> candle_core::Result<&'static str> {
    Ok(match mode {
        Mode::Mxfp4 => "mxfp4",
        Mode::Nvfp4 => "nvfp4",
        Mode::Mxfp8 => "mxfp8",
        Mode::Affine => candle_core::bail!("fp quantized matmul: the affine mode is not a float mode"),
    })
}

/// The dtype the kernels compute in for activations of `dtype`: itself for f32 / f16 / bf16,
/// else f32 (converted there and back).
pub(crate) fn kernel_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => dtype,
        _ => DType::F32,
    }
}

/// Whether the decode kernels take rows of `k` values: whole chunks of 32 (nvfp4 allows rows of
/// an odd number of 16-value groups, which dequantize and multiply densely instead).
pub(crate) fn chunked(k: usize) -> bool {
    k.is_multiple_of(32)
}

/// The number of matrices in the weight's stack (1 for one matrix), after checking that its
/// parts have the sizes and dtypes the kernels assume (rows of whole groups).
pub(crate) fn matrices(w: &FpWeight) -> Result<usize> {
    let mode = w.mode;
    mode_name(mode)?;
    let (n, k) = (w.out_dim, w.in_dim);
    if !k.is_multiple_of(fp::group(mode)) {
        bail!("{mode} weight: the input size {k} is not a multiple of the group size {}", fp::group(mode));
    }
    if k > i32::MAX as usize || n > i32::MAX as usize {
        bail!("{mode} matmul on the GPU: a {n} x {k} matrix is too large for the kernels");
    }
    if w.packed.dtype() != DType::U32 || w.scales.dtype() != DType::U8 {
        bail!(
            "{mode} weight: packed codes must be u32 and scales u8, not {:?} and {:?}",
            w.packed.dtype(),
            w.scales.dtype()
        );
    }
    let (words, groups) = (n * k / fp::per_word(mode), n * k / fp::group(mode));
    let mats = w.packed.elem_count().checked_div(words).unwrap_or(0);
    if w.packed.elem_count() != mats * words || w.scales.elem_count() != mats * groups {
        bail!(
            "{mode} weight: packed {:?} and scales {:?} do not hold {n} x {k} matrices",
            w.packed.dims(),
            w.scales.dims()
        );
    }
    if let Some(g) = &w.global_scale {
        if g.elem_count() != mats {
            bail!("{mode} weight: {} global scales for {mats} matrices", g.elem_count());
        }
    }
    Ok(mats)
}

/// The weight as the kernels take it: packed codes contiguous from a 16-byte aligned offset of
/// their storage (`aligned`; the decode kernels' 16-byte loads) or from any offset, scales
/// contiguous, the global scale f32 and contiguous; a part that is not is copied.
pub(crate) fn prepared(w: &FpWeight, aligned: bool) -> Result<FpWeight> {
    let packed = {
        let l = w.packed.layout();
        let ok = l.is_contiguous() && (!aligned || (l.start_offset() * 4).is_multiple_of(16));
        if ok {
            w.packed.clone()
        } else {
            w.packed.force_contiguous()?
        }
    };
    let scales = if w.scales.is_contiguous() { w.scales.clone() } else { w.scales.force_contiguous()? };
    let global_scale = match &w.global_scale {
        Some(g) => {
            let g = g.to_dtype(DType::F32)?;
            Some(if g.is_contiguous() { g } else { g.force_contiguous()? })
        }
        None => None,
    };
    Ok(FpWeight { packed, scales, global_scale, ..w.clone() })
}

/// `(first row, rows)` of each slice of at most [`KERNEL_ROWS`] of `m` input rows.
pub(crate) fn row_slices(m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m).step_by(KERNEL_ROWS).map(move |r0| (r0, (m - r0).min(KERNEL_ROWS)))
}

/// The dims of `x` with the last replaced by `n`.
pub(crate) fn out_dims(x: &Tensor, n: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    if let Some(l) = dims.last_mut() {
        *l = n;
    }
    dims
}

/// What a GPU backend gives the shared entry points below: its name, its device, and its kernels
/// as ops on inputs the entry points have checked and prepared.
pub(crate) trait FpDevice {
    const NAME: &'static str;
    /// The most routed rows one gathered launch takes.
    const MAX_ROUTED_ROWS: usize;
    fn is(device: &candle_core::Device) -> bool;
    /// `x Wᵀ` by the decode kernels (`x` a kernel input, `w` prepared).
    fn matmul_op(x: &Tensor, w: FpWeight) -> Result<Tensor>;
    /// The dense matrix in the kernel dtype `dtype` (`w` prepared).
    fn dequantize_op(w: &FpWeight, dtype: DType) -> Result<Tensor>;
    /// The gathered matmul of the routed rows (`x` a kernel input, `ids` u32 on the device).
    fn gather_op(x: &Tensor, ids: &Tensor, w: FpWeight, experts: usize, xdiv: usize) -> Result<Tensor>;
}

/// `x Wᵀ` for x (…, in) with at most [`DECODE_ROWS`] rows, on the device.
pub(crate) fn matmul<B: FpDevice>(x: &Tensor, w: &FpWeight) -> Result<Tensor> {
    let mode = w.mode;
    if !B::is(x.device()) {
        bail!("{mode} matmul on {}: the input is not on a {} device", B::NAME, B::NAME);
    }
    let k = x.dim(D::Minus1)?;
    if k != w.in_dim {
        bail!("{mode} matmul: input has {k} features, the weight expects {}", w.in_dim);
    }
    let mats = matrices(w)?;
    if mats != 1 {
        bail!("{mode} matmul: the weight is a stack of {mats} matrices, not one");
    }
    if x.elem_count() == 0 || w.out_dim == 0 {
        return Ok(Tensor::zeros(out_dims(x, w.out_dim), x.dtype(), x.device())?);
    }
    if !chunked(k) {
        return crate::ops::dense_matmul::dense_matmul(x, &dequantize::<B>(w, x.dtype())?.to_dtype(x.dtype())?);
    }
    let xin = super::kernel_input(x, kernel_dtype(x.dtype()))?;
    let y = B::matmul_op(&xin, prepared(w, true)?)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// `mx.dequantize` of the weight on its CUDA device, in `dtype` (f32 with a global scale).
pub(crate) fn dequantize<B: FpDevice>(w: &FpWeight, dtype: DType) -> Result<Tensor> {
    let mode = w.mode;
    if !B::is(w.packed.device()) {
        bail!("{mode} dequantize on {}: the weight is not on a {} device", B::NAME, B::NAME);
    }
    let mats = matrices(w)?;
    let out_dtype = if w.global_scale.is_some() { DType::F32 } else { dtype };
    let mut dims = w.packed.dims().to_vec();
    match dims.last_mut() {
        Some(l) => *l *= fp::per_word(mode),
        None => bail!("{mode} dequantize: packed codes must have at least one dimension"),
    }
    if mats == 0 || w.packed.elem_count() == 0 {
        return Ok(Tensor::zeros(dims, out_dtype, w.packed.device())?);
    }
    let w = prepared(w, false)?;
    let kdt = if w.global_scale.is_some() { DType::F32 } else { kernel_dtype(dtype) };
    let out = B::dequantize_op(&w, kdt)?;
    Ok(if out.dtype() == out_dtype { out } else { out.to_dtype(out_dtype)? })
}

/// Routed row `r` of the result is row `r / xdiv` of `x` times matrix `ids[r]` of the stack `w`
/// (`ids` u32 on the device). A routed row whose id is outside the stack comes out NaN (the
/// ids are never read back to check them).
pub(crate) fn gather_rows<B: FpDevice>(x: &Tensor, w: &FpWeight, ids: &Tensor, xdiv: usize) -> Result<Tensor> {
    let mode = w.mode;
    if !B::is(x.device()) {
        bail!("gathered {mode} matmul on {}: the input is not on a {} device", B::NAME, B::NAME);
    }
    let experts = matrices(w)?;
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_device(x.device())?.contiguous()?;
    let rows = ids.dim(0)?;
    let (tokens, k) = x.dims2()?;
    if k != w.in_dim {
        bail!("gathered {mode} matmul: input has {k} features, the experts expect {}", w.in_dim);
    }
    if xdiv == 0 || tokens * xdiv != rows {
        bail!("gathered {mode} matmul: {tokens} input rows for {rows} routed rows ({xdiv} per input row)");
    }
    if rows > B::MAX_ROUTED_ROWS || experts > i32::MAX as usize || xdiv > i32::MAX as usize {
        bail!(
            "gathered {mode} matmul on {}: {rows} routed rows of {experts} experts are too many for one launch",
            B::NAME
        );
    }
    if rows == 0 || w.out_dim == 0 {
        return Ok(Tensor::zeros((rows, w.out_dim), x.dtype(), x.device())?);
    }
    if !chunked(k) {
        // the chosen matrices of the dense stack, one batched matmul
        let dense = dequantize::<B>(w, x.dtype())?.to_dtype(x.dtype())?.reshape((experts, w.out_dim, k))?;
        let xr = x.unsqueeze(1)?.broadcast_as((tokens, xdiv, k))?.reshape((rows, 1, k))?;
        let ws = dense.index_select(&ids, 0)?.transpose(1, 2)?;
        return Ok(xr.matmul(&ws)?.squeeze(1)?);
    }
    let xin = super::kernel_input(x, kernel_dtype(x.dtype()))?;
    Ok(B::gather_op(&xin, &ids, prepared(w, true)?, experts, xdiv)?.to_dtype(x.dtype())?)
}
