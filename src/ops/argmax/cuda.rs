//! Greedy decoding's argmax on CUDA (argmax.cu).

use crate::backend::cuda::{cuda_of, dtype_suffix, function, HostRing, Launch, Module};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{DType, Result, WithDType};

/// Greedy decoding's pick (argmax.cu): the argmax of each row of `logits` (rows, ..,
/// vocab; f32, f16 or bf16, compared as their exact f32 values), contiguous, written to `token`
/// (u32, one per row: the next step's input) and to the `ring`'s slot of the position the
/// device u32 `pos` holds.
pub fn argmax_rows(
    logits: &candle_core::Tensor,
    token: &candle_core::Tensor,
    ring: &HostRing,
    pos: &candle_core::Tensor,
) -> Result<()> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let rows = logits.elem_count() / vocab.max(1);
    if !matches!(logits.dtype(), DType::F32 | DType::F16 | DType::BF16)
        || !logits.is_contiguous()
        || token.dtype() != DType::U32
        || token.elem_count() != rows
        || pos.dtype() != DType::U32
        || rows != ring.rows
    {
        candle_core::bail!(
            "greedy argmax: logits {:?} {:?}, tokens {:?} {:?}, position {:?} and a ring of {} rows do not fit",
            logits.dims(),
            logits.dtype(),
            token.dims(),
            token.dtype(),
            pos.dtype(),
            ring.rows
        );
    }
    // the kernel reads rows 16 bytes at a time from the start of the storage's slice
    let logits = if (logits.layout().start_offset() * logits.dtype().size_in_bytes()).is_multiple_of(16) {
        logits.clone()
    } else {
        logits.copy()?
    };
    let (ls, ll) = logits.storage_and_layout();
    let (ts, tl) = token.storage_and_layout();
    let (ps, pl) = pos.storage_and_layout();
    let ls = cuda_of(&ls, "greedy argmax: the logits")?;
    let t = cuda_of(&ts, "greedy argmax: the tokens")?.as_cuda_slice::<u32>()?.slice(tl.start_offset()..);
    let p = cuda_of(&ps, "greedy argmax: the position")?.as_cuda_slice::<u32>()?.slice(pl.start_offset()..);
    let args = ArgmaxArgs { rows, vocab: vocab as u32, token: &t, ring, pos: &p };
    match logits.dtype() {
        DType::F32 => argmax_typed::<f32>(ls, ll.start_offset(), args),
        DType::F16 => argmax_typed::<half::f16>(ls, ll.start_offset(), args),
        _ => argmax_typed::<half::bf16>(ls, ll.start_offset(), args),
    }
}

/// What [`argmax_typed`] takes besides the logits.
struct ArgmaxArgs<'a> {
    rows: usize,
    vocab: u32,
    token: &'a candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>,
    ring: &'a HostRing,
    pos: &'a candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>,
}

fn argmax_typed<T: CudaDType + DeviceRepr + WithDType>(ls: &CudaStorage, offset: usize, a: ArgmaxArgs) -> Result<()> {
    let dev = ls.device().clone();
    let x = ls.as_cuda_slice::<T>()?.slice(offset..);
    let f = function(&dev, Module::Argmax, &format!("wick_argmax_{}", dtype_suffix(T::DTYPE, "greedy argmax")?))?;
    let slots = a.ring.slots as u32;
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&x).arg(&a.vocab).arg(a.token).arg(&a.ring.device_ptr).arg(&slots).arg(a.pos);
    let cfg = LaunchConfig { grid_dim: (a.rows as u32, 1, 1), block_dim: (ARGMAX_THREADS, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(())
}

/// Threads per block of the argmax (argmax.cu's ARGMAX_THREADS).
const ARGMAX_THREADS: u32 = 1024;
