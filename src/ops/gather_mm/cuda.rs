//! CUDA side of the gathered quantized matmul on device routing: launches `wick_gqm1*` (4-bit,
//! f16 / bf16, the one-row tensor-core kernels) or `wick_gqmv*` (any bits and dtype, the scalar
//! decode kernel), which sit in src/ops/qmatmul/affine.cu beside the kernels they gather. Each
//! block reads its routed row's expert id on the device (see the comment there).

use crate::backend::cuda::Launch;
use crate::ops::qmatmul::cuda::{
    dtype_name, function, push_parts, qm1_launch, rows_launch, x_view, WeightParts, QM1_SWIGLU_WARPS, QM1_WARPS,
    QMT_TILE,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result, Shape, WithDType};

/// The routed rows: one expert id per output row (u32 on the device), and how many consecutive
/// routed rows share one input row (`top_k` for the first projections, 1 for the last).
pub struct Ids<'a> {
    pub ids: &'a CudaStorage,
    pub layout: &'a Layout,
    pub xdiv: usize,
}

/// Whether the fused gate/up form exists for these weights (else two gathered launches).
pub fn has_swiglu(dtype: candle_core::DType, p: crate::quant::QuantParams, k: usize) -> bool {
    qm1_launch(dtype, p, 1, k, 1, QM1_SWIGLU_WARPS).is_some() || crate::ops::qmatmul::cuda::has_fused(p)
}

fn gathered_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (x, xl): (&CudaStorage, &Layout),
    ws: &[&WeightParts],
    ids: &Ids,
) -> Result<CudaSlice<T>> {
    let w = ws[0];
    let (n, k, p) = (w.n, w.k, w.p);
    let rows = ids.layout.shape().elem_count();
    let xs = x_view::<T>(x, xl)?;
    if xs.len() * ids.xdiv.max(1) != rows * k {
        candle_core::bail!(
            "gathered matmul: {} input values for {rows} routed rows of {k} ({} per input row)",
            xs.len(),
            ids.xdiv
        );
    }
    let idv = crate::backend::cuda::contiguous_view::<u32>(ids.ids, ids.layout, "gathered matmul: expert ids")?;
    let parts = ws.iter().map(|w| w.slices::<T>()).collect::<Result<Vec<_>>>()?;
    let out = unsafe { dev.alloc::<T>(rows * n)? };
    let (ew, es) = ((n * k * p.bits / 32) as i64, (n * k / p.group_size) as i64);
    let (xdiv, n_i, k_i, gs_i) = (ids.xdiv as i32, n as i32, k as i32, p.group_size as i32);
    let swiglu = if ws.len() == 2 { "_swiglu" } else { "" };
    let min_warps = if ws.len() == 2 { QM1_SWIGLU_WARPS } else { QM1_WARPS };
    let tiles = n.div_ceil(QMT_TILE);
    let stream = dev.cuda_stream();
    if let Some((name, mut cfg)) = qm1_launch(T::DTYPE, p, 1, k, tiles * rows, min_warps) {
        cfg.grid_dim = (tiles as u32, rows as u32, 1);
        let f = function(dev, &format!("wick_gqm1{swiglu}_{name}"))?;
        let mut b = Launch::new(&stream, &f);
        push_parts(&mut b, &parts);
        b.arg(&idv).arg(&ew).arg(&es).arg(&xdiv).arg(&xs).arg(&out).arg(&n_i).arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        return Ok(out);
    }
    let f = function(dev, &format!("wick_gqmv{swiglu}_{}_b{}", dtype_name(T::DTYPE)?, p.bits))?;
    // the scalar kernel: two output rows per warp alone, one for the gate/up pair
    let mut cfg = rows_launch(n, if ws.len() == 2 { 1 } else { 2 });
    cfg.grid_dim.1 = rows as u32;
    let mut b = Launch::new(&stream, &f);
    push_parts(&mut b, &parts);
    b.arg(&idv).arg(&ew).arg(&es).arg(&xdiv).arg(&xs).arg(&out).arg(&n_i).arg(&k_i).arg(&gs_i);
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// Routed row r of the result is input row `r / xdiv` of `x` times expert `ids[r]`'s weight
/// (`w`: the stack, `n` × `k` per expert); with two weights (gate, up) `silu(x·Gᵀ) · (x·Uᵀ)`.
pub fn gathered(x: (&CudaStorage, &Layout), ws: &[&WeightParts], ids: &Ids) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let rows = ids.layout.shape().elem_count();
    let st = crate::backend::cuda::by_dtype!(x.0.dtype(), "gathered matmul", dev, gathered_typed(&dev, x, ws, ids));
    Ok((st, Shape::from((rows, ws[0].n))))
}
