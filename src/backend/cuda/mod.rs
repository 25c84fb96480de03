//! CUDA infrastructure for wick's kernels: loading the fatbins build.rs compiles (once per
//! device; the kernels themselves are the ops' own, under `crate::ops`), launches (programmatic
//! dependent launch on Hopper, [`StepGraph`]: a captured step rebuilt without memory nodes),
//! host uploads into device tensors, and the page-locked ring greedy steps leave tokens in.

mod launch;

pub use launch::{programmatic_launches, KernelArg, Launch, StepGraph};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The kernel images, compiled by build.rs (SASS for `CUDA_COMPUTE_CAP` plus compute_80 PTX).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    /// src/ops/qmatmul/affine.cu
    Affine,
    /// src/ops/qmatmul/fp.cu
    Fp,
    /// src/ops/attention/attention.cu
    Attention,
    /// src/ops/norm/norm.cu
    Norm,
    /// src/ops/swiglu/swiglu.cu
    Swiglu,
    /// src/ops/argmax/argmax.cu
    Argmax,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Affine => include_bytes!(concat!(env!("OUT_DIR"), "/affine.fatbin")),
            Module::Fp => include_bytes!(concat!(env!("OUT_DIR"), "/fp.fatbin")),
            Module::Attention => include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
            Module::Norm => include_bytes!(concat!(env!("OUT_DIR"), "/norm.fatbin")),
            Module::Swiglu => include_bytes!(concat!(env!("OUT_DIR"), "/swiglu.fatbin")),
            Module::Argmax => include_bytes!(concat!(env!("OUT_DIR"), "/argmax.fatbin")),
        }
    }
}

struct Loaded {
    context: usize,
    module: Module,
    handle: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
}

static LOADED: Mutex<Vec<Loaded>> = Mutex::new(Vec::new());

/// Lets `dev`'s default memory pool (where stream-ordered allocations come from) keep its free
/// memory across synchronizations instead of handing it back to the driver at each.
pub fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    let mut pool = std::ptr::null_mut();
    let mut keep = u64::MAX;
    // SAFETY: `pool` is written by the driver; the attribute takes a u64 (cuuint64_t).
    let r = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().and_then(|()| {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
            .result()?;
            // a block freed on another stream is never reused by making this stream wait for
            // that one: such a wait inside a CUDA graph capture would invalidate the capture
            // (several devices, or test threads, each with its own stream share the pool)
            let mut no: i32 = 0;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
                (&mut no as *mut i32).cast(),
            )
            .result()
        })
    };
    r.w()
}

/// Kernel `name` of `module` on `dev`'s context, loading the module on first use.
pub fn function(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let context = Arc::as_ptr(ctx) as usize;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let i = match loaded.iter().position(|l| l.context == context && l.module == module) {
        Some(i) => i,
        None => {
            let ptx = candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_binary(module.image().to_vec());
            let handle = ctx.load_module(ptx).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "loading wick's CUDA kernels ({module:?}): {e} (they need a GPU of compute capability 8.0 or newer and a driver for CUDA 13)"
                ))
            })?;
            loaded.push(Loaded { context, module, handle, funcs: HashMap::new() });
            loaded.len() - 1
        }
    };
    let l = &mut loaded[i];
    if let Some(f) = l.funcs.get(name) {
        return Ok(f.clone());
    }
    let f = l.handle.load_function(name).w()?;
    launch::register(&f);
    l.funcs.insert(name.to_string(), f.clone());
    Ok(f)
}

/// The kernel-name suffix of an activation dtype.
pub fn dtype_suffix(d: DType, what: &str) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => candle_core::bail!("{what} on CUDA: dtype {d:?} is not supported (f32, f16, bf16)"),
    })
}

/// `$f::<T>(args)` for the element type `T` of `$dtype` (f32, f16 or bf16), its slice wrapped
/// as storage on `$dev`; other dtypes are an error naming `$what`.
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, $dev:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => candle_core::cuda_backend::CudaStorage::wrap_cuda_slice($f::<f32>($($arg),*)?, $dev),
            candle_core::DType::F16 => candle_core::cuda_backend::CudaStorage::wrap_cuda_slice($f::<half::f16>($($arg),*)?, $dev),
            candle_core::DType::BF16 => candle_core::cuda_backend::CudaStorage::wrap_cuda_slice($f::<half::bf16>($($arg),*)?, $dev),
            d => candle_core::bail!("{} on CUDA: dtype {d:?} is not supported (f32, f16, bf16)", $what),
        }
    };
}
pub(crate) use by_dtype;

/// The elements of a contiguous tensor as a view of its storage; `what` names it in the error.
pub(crate) fn contiguous_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let (a, e) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} not contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..e))
}

/// The CUDA storage inside a storage guard of a tensor an op reads besides its inputs.
pub(crate) fn cuda_of<'a>(s: &'a candle_core::Storage, what: &str) -> Result<&'a CudaStorage> {
    use crate::backend::GpuStorage;
    CudaStorage::of(s).ok_or_else(|| candle_core::Error::Msg(format!("{what} is not on the CUDA device")))
}

/// `CustomOp3` for an op of wick's that runs on CUDA only (the CPU has the separate ops): its
/// name, the CPU's error message, and the CUDA forward as a function of the op and the three
/// inputs (storage, layout).
macro_rules! cuda_only_op3 {
    ($ty:ty, $name:expr, $cpu_msg:expr, $fwd:expr) => {
        impl candle_core::CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                candle_core::bail!($cpu_msg)
            }

            fn cuda_fwd(
                &self,
                a: &candle_core::CudaStorage,
                al: &candle_core::Layout,
                b: &candle_core::CudaStorage,
                bl: &candle_core::Layout,
                c: &candle_core::CudaStorage,
                cl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                let f: fn(
                    &$ty,
                    (&candle_core::CudaStorage, &candle_core::Layout),
                    (&candle_core::CudaStorage, &candle_core::Layout),
                    (&candle_core::CudaStorage, &candle_core::Layout),
                ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> = $fwd;
                f(self, (a, al), (b, bl), (c, cl))
            }
        }
    };
}
pub(crate) use cuda_only_op3;

/// Host values copied into a tensor's device memory in place (converted to its dtype on the
/// host, as a cast on the device rounds: to nearest even).
struct Upload<'a>(&'a [f32]);

impl candle_core::InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "upload"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("upload: the tensor is not on a CUDA device")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        let (a, b) =
            l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("upload: tensor not contiguous".into()))?;
        if b - a != self.0.len() {
            candle_core::bail!("upload: {} values into a tensor of {} elements", self.0.len(), b - a);
        }
        let stream = s.device().cuda_stream();
        fn put<T: CudaDType + DeviceRepr>(
            stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
            s: &mut CudaStorage,
            (a, b): (usize, usize),
            v: &[T],
        ) -> Result<()> {
            let mut dst = s.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
            stream.memcpy_htod(v, &mut dst).w()
        }
        let v = self.0;
        match s.dtype() {
            DType::F32 => put(&stream, s, (a, b), v),
            DType::F16 => put(&stream, s, (a, b), &v.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>()),
            DType::BF16 => put(&stream, s, (a, b), &v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>()),
            DType::U32 => put(&stream, s, (a, b), &v.iter().map(|&x| x as u32).collect::<Vec<_>>()),
            d => candle_core::bail!("upload: dtype {d:?} is not supported"),
        }
    }
}

/// Overwrites the CUDA tensor `t` (contiguous, `values.len()` elements, f32/f16/bf16 or u32:
/// exact for integers below 2^24) with `values`.
pub fn upload_f32(t: &candle_core::Tensor, values: &[f32]) -> Result<()> {
    t.inplace_op1(&Upload(values))
}

/// Page-locked host memory the GPU writes through its mapping: the tokens of greedy decode
/// steps ([`argmax_rows`]), `slots` slots of `rows` tokens, read by the host once the step that
/// wrote a slot has finished (an event), while later steps run.
pub struct HostRing {
    /// owns the memory; `host_ptr` and `device_ptr` are its two addresses
    _host: candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>,
    host_ptr: *const u32,
    pub(crate) device_ptr: u64,
    pub(crate) rows: usize,
    pub(crate) slots: usize,
}

// The memory is only written by kernels and read after their completion.
unsafe impl Send for HostRing {}
unsafe impl Sync for HostRing {}

impl HostRing {
    pub fn new(dev: &CudaDevice, rows: usize, slots: usize) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let ctx = dev.cuda_stream().context().clone();
        let host = unsafe { ctx.alloc_pinned_with_flags::<u32>(rows * slots, sys::CU_MEMHOSTALLOC_DEVICEMAP) }.w()?;
        let ptr = host.as_ptr().w()?;
        let mut device_ptr = 0u64;
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr as *mut std::ffi::c_void, 0) };
        if r != sys::cudaError_enum::CUDA_SUCCESS {
            candle_core::bail!("mapping page-locked host memory for greedy tokens: {r:?}");
        }
        Ok(Self { _host: host, host_ptr: ptr, device_ptr, rows, slots })
    }

    /// Tokens per slot (the batch rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The tokens of the step that wrote position `pos`; only once that step has finished.
    pub fn read(&self, pos: usize) -> Vec<u32> {
        let at = (pos % self.slots) * self.rows;
        // written by the device through the mapping: read each value from memory
        (at..at + self.rows).map(|i| unsafe { std::ptr::read_volatile(self.host_ptr.add(i)) }).collect()
    }
}
