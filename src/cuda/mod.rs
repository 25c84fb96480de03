//! wick's own CUDA kernels outside the quantized matmul (which lives in `quant/cuda`): loading
//! the fatbins build.rs compiles (once per device), the decode-attention kernel, and CUDA graphs
//! of the decode step ([`graph`]).

pub mod graph;
mod launch;

pub use launch::{programmatic_launches, KernelArg, Launch, StepGraph, REBUILT, UPDATED};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape, WithDType};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The kernel images, compiled by build.rs (SASS for `CUDA_COMPUTE_CAP` plus compute_80 PTX).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    /// src/quant/cuda/affine.cu
    Affine,
    /// src/cuda/attention.cu
    Attention,
    /// src/cuda/norm.cu
    Norm,
    /// src/cuda/sample.cu
    Sample,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Affine => include_bytes!(concat!(env!("OUT_DIR"), "/affine.fatbin")),
            Module::Attention => include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
            Module::Norm => include_bytes!(concat!(env!("OUT_DIR"), "/norm.fatbin")),
            Module::Sample => include_bytes!(concat!(env!("OUT_DIR"), "/sample.fatbin")),
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

/// Keys per block of the first pass and threads per block (attention.cu's CHUNK and THREADS).
const ATTN_CHUNK: usize = 64;
const ATTN_THREADS: u32 = 128;
/// The head dimension limit of the kernel.
pub const ATTN_MAX_HEAD_DIM: usize = 256;

/// Decode attention: `q` (B, H, 1, D) contiguous over `k` (B, KV, T, D), `v` (B, KV, T, DV)
/// views with unit last stride. `starts[b]`: the first key row `b` may see. `device_pos`: a u32
/// on the device, the position this step wrote (only keys up to it are seen; `T` is then the
/// cache's capacity: a replayed CUDA graph reads the count at run time), and the rows' starts on
/// the device (u32, one per row), used instead of `starts`.
pub fn decode_attention(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    scale: f32,
    softcap: Option<f32>,
    starts: Option<&[usize]>,
    device_pos: Option<(&candle_core::Tensor, &candle_core::Tensor)>,
) -> Result<(CudaStorage, Shape)> {
    let dev = q.0.device().clone();
    let guards = device_pos.map(|(p, s)| (p.storage_and_layout().0, s.storage_and_layout().0));
    let on_device = match &guards {
        Some((p, s)) => Some((
            cuda_of(p, "decode attention: the device position")?.as_cuda_slice::<u32>()?,
            cuda_of(s, "decode attention: the device row starts")?.as_cuda_slice::<u32>()?,
        )),
        None => None,
    };
    // host starts go up for this call; a replayed step's are on the device already
    let uploaded = match (starts, on_device) {
        (Some(s), None) => Some(upload_starts(&dev, s)?),
        _ => None,
    };
    let starts = on_device.map(|(_, s)| s).or(uploaded.as_ref());
    let pos = on_device.map(|(p, _)| p);
    let out = by_dtype!(
        q.0.dtype(),
        "decode attention",
        dev,
        attention_typed(&dev, q, k, v, scale, softcap, starts, pos, None)
    );
    let (b, h, _, _) = q.1.shape().dims4()?;
    let dv = v.1.shape().dims4()?.3;
    Ok((out, Shape::from((b, h, 1, dv))))
}

/// The rows' first keys (left padding) as device u32s, for the attention kernels.
fn upload_starts(dev: &CudaDevice, starts: &[usize]) -> Result<CudaSlice<u32>> {
    let s: Vec<u32> = starts.iter().map(|&x| x as u32).collect();
    let mut buf = unsafe { dev.alloc::<u32>(s.len())? };
    dev.memcpy_htod(&s, &mut buf)?;
    Ok(buf)
}

#[allow(clippy::too_many_arguments)]
fn attention_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    scale: f32,
    softcap: Option<f32>,
    starts: Option<&CudaSlice<u32>>,
    pos: Option<&CudaSlice<u32>>,
    step: Option<StepArgs<'_, T>>,
) -> Result<CudaSlice<T>> {
    let (b, h, _, d) = ql.shape().dims4()?;
    let (_, kvh, t, _) = kl.shape().dims4()?;
    let dv = vl.shape().dims4()?.3;
    if h % kvh != 0 || d > ATTN_MAX_HEAD_DIM || dv > ATTN_MAX_HEAD_DIM || t == 0 {
        candle_core::bail!("decode attention on CUDA: {h} heads over {kvh} KV heads of size {d}/{dv} and {t} keys are outside the kernel's limits");
    }
    let q = contiguous_view::<T>(qs, ql, "query")?;
    let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    let splits = t.div_ceil(ATTN_CHUNK);
    let part_o = unsafe { dev.alloc::<f32>(b * h * splits * dv)? };
    let part_ml = unsafe { dev.alloc::<f32>(b * h * splits * 2)? };
    let out = unsafe { dev.alloc::<T>(b * h * dv)? };
    if let Some(s) = starts.filter(|s| s.len() != b) {
        candle_core::bail!("decode attention: {} row starts for {b} rows", s.len());
    }
    let tn = dtype_suffix(T::DTYPE, "decode attention")?;
    let kind = if step.is_some() { "step" } else { "partial" };
    let partial = function(dev, Module::Attention, &format!("wick_attention_{kind}_{tn}"))?;
    let null = 0u64;
    let (h_i, kvh_i, t_i, d_i, dv_i, splits_i) = (h as i32, kvh as i32, t as i32, d as i32, dv as i32, splits as i32);
    let (ks_, vs_) = (outer_strides(kl), outer_strides(vl));
    let cap = softcap.unwrap_or(0.0);
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &partial);
    lb.arg(&q).arg(&k).arg(&v).arg(&part_o).arg(&part_ml);
    match starts {
        Some(s) => lb.arg(s),
        None => lb.arg(&null),
    };
    match pos {
        Some(p) => lb.arg(p),
        None => lb.arg(&null),
    };
    lb.arg(&h_i).arg(&kvh_i).arg(&t_i).arg(&d_i).arg(&dv_i);
    lb.arg(&ks_[0]).arg(&ks_[1]).arg(&ks_[2]).arg(&vs_[0]).arg(&vs_[1]).arg(&vs_[2]);
    // 16-byte loads of key rows (bit 0) and value rows (bit 1): the head size and every stride
    // in whole 16-byte units
    let rows16 =
        |n: usize, l: &Layout| (n * T::DTYPE.size_in_bytes()).is_multiple_of(16) && rows_on_16_bytes(l, T::DTYPE);
    let vec = rows16(d, kl) as i32 | ((rows16(dv, vl) as i32) << 1);
    lb.arg(&scale).arg(&cap).arg(&vec);
    if let Some(st) = &step {
        lb.arg(&st.k_new).arg(&st.v_new).arg(&st.cos).arg(&st.sin).arg(&out).arg(st.done).arg(&st.traditional);
    }
    let cfg = LaunchConfig {
        grid_dim: ((b * h) as u32, splits as u32, 1),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    if step.is_some() {
        return Ok(out); // the last block of each row combined it
    }
    let combine = function(dev, Module::Attention, &format!("wick_attention_combine_{tn}"))?;
    let mut lb = Launch::new(&stream, &combine);
    lb.arg(&part_o).arg(&part_ml).arg(&out).arg(&splits_i).arg(&dv_i);
    let cfg = LaunchConfig { grid_dim: ((b * h) as u32, 1, 1), block_dim: (ATTN_THREADS, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}

/// Writes a decode step's keys or values `src` (B, heads, 1, d) into `cache` (B, heads, T, d,
/// unit last stride) at the position held by the device u32 `pos` (see [`decode_attention`]).
pub fn kv_write(cache: (&mut CudaStorage, &Layout), src: (&CudaStorage, &Layout), pos: &CudaStorage) -> Result<()> {
    match cache.0.dtype() {
        DType::F32 => kv_write_typed::<f32>(cache, src, pos),
        DType::F16 => kv_write_typed::<half::f16>(cache, src, pos),
        DType::BF16 => kv_write_typed::<half::bf16>(cache, src, pos),
        d => candle_core::bail!("kv_write on CUDA: dtype {d:?} is not supported (f32, f16, bf16)"),
    }
}

fn kv_write_typed<T: CudaDType + DeviceRepr + WithDType>(
    (cs, cl): (&mut CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
    pos: &CudaStorage,
) -> Result<()> {
    let (b, heads, _, d) = cl.shape().dims4()?;
    if sl.shape().dims4()? != (b, heads, 1, d) || cl.stride()[3] != 1 {
        candle_core::bail!("kv_write: {:?} into the cache {:?} does not fit", sl.shape(), cl.shape());
    }
    let dev = cs.device().clone();
    let f = function(&dev, Module::Attention, &format!("wick_kv_write_{}", dtype_suffix(T::DTYPE, "kv_write")?))?;
    let [sb, sh, sr] = outer_strides(cl);
    let (heads_i, d_i) = (heads as i32, d as i32);
    let src = contiguous_view::<T>(ss, sl, "kv_write: source")?;
    let pos = pos.as_cuda_slice::<u32>()?;
    let dst = cs.as_cuda_slice_mut::<T>()?.slice_mut(cl.start_offset()..);
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&dst).arg(&src).arg(pos).arg(&heads_i).arg(&d_i).arg(&sb).arg(&sh).arg(&sr);
    let cfg = LaunchConfig {
        grid_dim: ((b * heads) as u32, 1, 1),
        block_dim: (d.min(256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(())
}

/// Counters a replayed decode step's attention keeps on the device, one per (batch row, query
/// head): [`DecodeStep::done`] holds this many (zeros; each launch leaves them at zero).
pub const STEP_COUNTERS: usize = 16384;

/// Launches of [`DecodeStep`]'s kernel in this process (tests check that it ran).
pub static STEP_ATTENTION_LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A replayed decode step's attention in one launch (`wick_attention_step_*`): RoPE of the
/// query and the key, the key and value written into the cache at the device position, the
/// split-keys pass and its combine (the last block of each row to finish). The op's inputs are
/// q (B, H, 1, D), k and v (B, KV, 1, D), before RoPE; the tables (B, D/2) hold row b's
/// position; the output is (B, H, 1, D). Same arithmetic as RoPE, [`kv_write`] and
/// [`decode_attention`] one after the other, so a replay decodes what the eager step does.
pub struct DecodeStep {
    pub cos: candle_core::Tensor,
    pub sin: candle_core::Tensor,
    pub traditional: bool,
    /// the position, the rows' first keys (u32, see [`decode_attention`]) and the counters
    /// (u32, [`STEP_COUNTERS`] zeros)
    pub pos: candle_core::Tensor,
    pub starts: candle_core::Tensor,
    pub done: candle_core::Tensor,
    pub keys: candle_core::Tensor,
    pub values: candle_core::Tensor,
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// What [`DecodeStep`]'s kernel takes besides the decode-attention pass's arguments.
struct StepArgs<'a, T> {
    k_new: CudaView<'a, T>,
    v_new: CudaView<'a, T>,
    cos: CudaView<'a, T>,
    sin: CudaView<'a, T>,
    done: &'a CudaSlice<u32>,
    traditional: i32,
}

/// The first three element strides of a 4-d (B, heads, T, D) cache layout, as the kernels take
/// them (the last is 1).
fn outer_strides(l: &Layout) -> [i64; 3] {
    let st = l.stride();
    [st[0] as i64, st[1] as i64, st[2] as i64]
}

/// Whether every row of a 4-d (B, heads, T, D) layout of `dtype` starts on a 16-byte boundary
/// (its start and its first three strides in whole 16-byte units): the attention kernels' 16-byte
/// row loads.
fn rows_on_16_bytes(l: &Layout, dtype: DType) -> bool {
    let st = l.stride();
    [st[0], st[1], st[2], l.start_offset()].iter().all(|&e| (e * dtype.size_in_bytes()).is_multiple_of(16))
}

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
fn cuda_of<'a>(s: &'a candle_core::Storage, what: &str) -> Result<&'a CudaStorage> {
    use crate::quant::matmul::GpuStorage;
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

cuda_only_op3!(
    DecodeStep,
    "decode-step-attention",
    "the fused decode step's attention runs on CUDA only",
    |op, (qs, ql), k, v| {
        let dev = qs.device().clone();
        let out = by_dtype!(qs.dtype(), "decode step attention", dev, step_typed(&dev, op, (qs, ql), k, v));
        Ok((out, ql.shape().clone()))
    }
);

fn step_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &DecodeStep,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let (b, h, l, d) = ql.shape().dims4()?;
    let (_, kvh, _, _) = kl.shape().dims4()?;
    let ((cos_s, cos_l), (sin_s, sin_l)) = (op.cos.storage_and_layout(), op.sin.storage_and_layout());
    let (pos_s, _) = op.pos.storage_and_layout();
    let ((starts_s, starts_l), (done_s, done_l)) = (op.starts.storage_and_layout(), op.done.storage_and_layout());
    let ((kc_s, kc_l), (vc_s, vc_l)) = (op.keys.storage_and_layout(), op.values.storage_and_layout());
    let (cos_s, sin_s) = (cuda_of(&cos_s, "decode step: cos")?, cuda_of(&sin_s, "decode step: sin")?);
    let pos = cuda_of(&pos_s, "decode step: the position")?.as_cuda_slice::<u32>()?;
    let starts = cuda_of(&starts_s, "decode step: the row starts")?.as_cuda_slice::<u32>()?;
    let done = cuda_of(&done_s, "decode step: the counters")?.as_cuda_slice::<u32>()?;
    let (kc_s, vc_s) = (cuda_of(&kc_s, "the key cache")?, cuda_of(&vc_s, "the value cache")?);
    let half = d / 2;
    let cache = kc_l.shape().dims4()?;
    if l != 1
        || d % 2 != 0
        || cos_l.shape().elem_count() != b * half
        || sin_l.shape().elem_count() != b * half
        || kl.shape().dims4()? != (b, kvh, 1, d)
        || vl.shape().dims4()? != (b, kvh, 1, d)
        || (cache.0, cache.1, cache.3) != (b, kvh, d)
        || vc_l.shape().dims4()? != cache
        || kc_l.stride()[3] != 1
        || vc_l.stride()[3] != 1
        || starts_l.shape().elem_count() != b
        || done_l.shape().elem_count() < b * h
        || done_l.start_offset() != 0
    {
        candle_core::bail!(
            "decode step attention: shapes q {:?}, k {:?}, cache {:?}, {} counters do not fit",
            ql.shape(),
            kl.shape(),
            kc_l.shape(),
            done_l.shape().elem_count()
        );
    }
    let slice = |s, l, what: &str| contiguous_view::<T>(s, l, &format!("decode step: {what}"));
    let step = StepArgs {
        k_new: slice(ks, kl, "k")?,
        v_new: slice(vs, vl, "v")?,
        cos: slice(cos_s, cos_l, "cos")?,
        sin: slice(sin_s, sin_l, "sin")?,
        done,
        traditional: op.traditional as i32,
    };
    // the kernel writes the step's key and value into the caches in place
    let (k, v) = ((kc_s, kc_l), (vc_s, vc_l));
    let out = attention_typed(dev, (qs, ql), k, v, op.scale, op.softcap, Some(starts), Some(pos), Some(step))?;
    STEP_ATTENTION_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(out)
}

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

/// The residual add and the RMSNorm after it in one launch (src/cuda/norm.cu): inputs x and r
/// (the same shape, last dimension d) and the norm's weight (d); the output stacks
/// `rms_norm(x + r) * w` (index 0, so that it starts at offset 0, as the matmul kernels take it)
/// and `x + r` (index 1) along a new first dimension. Both equal candle's separate `badd` and
/// `rmsnorm` bit for bit.
pub struct AddRmsNorm {
    pub eps: f32,
}

/// The largest last dimension [`AddRmsNorm`] takes (1,024 threads, 8 columns each).
pub const ADD_RMS_NORM_MAX_DIM: usize = 8192;

cuda_only_op3!(
    AddRmsNorm,
    "add-rms-norm",
    "the fused residual add and RMSNorm runs on CUDA only",
    |op, (xs, xl), r, w| {
        let dev = xs.device().clone();
        let out = by_dtype!(xs.dtype(), "add + RMSNorm", dev, add_rms_norm_typed(&dev, op.eps, (xs, xl), r, w));
        let mut dims = vec![2];
        dims.extend_from_slice(xl.shape().dims());
        Ok((out, Shape::from(dims)))
    }
);

fn add_rms_norm_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    eps: f32,
    (xs, xl): (&CudaStorage, &Layout),
    (rs, rl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let d = xl.shape().dims().last().copied().unwrap_or(0);
    let rows = xl.shape().elem_count() / d.max(1);
    if rl.shape() != xl.shape() || wl.shape().dims() != [d] || d == 0 || d > ADD_RMS_NORM_MAX_DIM {
        candle_core::bail!(
            "add + RMSNorm: x {:?}, r {:?} and weight {:?} do not fit (last dimension 1..={ADD_RMS_NORM_MAX_DIM})",
            xl.shape(),
            rl.shape(),
            wl.shape()
        );
    }
    let view = |s, l, what: &str| contiguous_view::<T>(s, l, &format!("add + RMSNorm: {what}"));
    let (x, r, w) = (view(xs, xl, "x")?, view(rs, rl, "r")?, view(ws, wl, "the weight")?);
    let out = unsafe { dev.alloc::<T>(2 * rows * d)? };
    let tn = dtype_suffix(T::DTYPE, "add + RMSNorm")?;
    // candle's rmsnorm block sizes, so that the sums come out in the same order
    let (name, threads) = if d < 1024 {
        (format!("wick_add_rms_norm_small_{tn}"), 32)
    } else {
        (format!("wick_add_rms_norm_{tn}"), 1024)
    };
    let f = function(dev, Module::Norm, &name)?;
    let d_i = d as i32;
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    let (n, h) = (out.slice(0..rows * d), out.slice(rows * d..));
    lb.arg(&x).arg(&r).arg(&w).arg(&n).arg(&h).arg(&d_i).arg(&eps);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}

/// Attention of several query positions (a prefill chunk) in one launch of
/// `wick_attention_prefill_*` (attention.cu: flash attention on the tensor cores), with the
/// causal mask of [`crate::nn::scaled_dot_product_attention`]: query row `r` sits at key index
/// `offset + r` and sees keys up to it, within `window` and not before its row's `starts`
/// entry. Inputs `q` (B, H, L, D), `k`, `v` (B, KV, T, D) as [`PrefillAttention::fits`] takes
/// them; the output is (B, L, H, D) (the caller's transpose of (B, H, L, D)).
pub struct PrefillAttention {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub offset: usize,
    pub window: Option<usize>,
    pub starts: Option<Arc<[usize]>>,
}

/// Query rows per block and threads per block of prefill attention (attention.cu's PF_ROWS, 4 warps).
const PREFILL_ROWS: usize = 64;
const PREFILL_THREADS: u32 = 128;
/// The head sizes `wick_attention_prefill_*` is built for.
pub const PREFILL_HEAD_DIMS: [usize; 3] = [64, 96, 128];

impl PrefillAttention {
    /// Whether the kernel takes these inputs: on CUDA, f16 or bf16 alike, no gradient to track,
    /// query and key heads of one size in [`PREFILL_HEAD_DIMS`], whole query heads per KV head,
    /// keys and values with unit last stride and rows on 16-byte boundaries.
    pub fn fits(q: &candle_core::Tensor, k: &candle_core::Tensor, v: &candle_core::Tensor) -> Result<bool> {
        let dtype = q.dtype();
        if !q.device().is_cuda()
            || !matches!(dtype, DType::F16 | DType::BF16)
            || k.dtype() != dtype
            || v.dtype() != dtype
            || q.track_op()
            || k.track_op()
            || v.track_op()
        {
            return Ok(false);
        }
        let ((_, h, _, d), (_, kvh, t, dk), dv) = (q.dims4()?, k.dims4()?, v.dim(3)?);
        let aligned = |x: &candle_core::Tensor| x.stride()[3] == 1 && rows_on_16_bytes(x.layout(), dtype);
        Ok(PREFILL_HEAD_DIMS.contains(&d)
            && dk == d
            && dv == d
            && t > 0
            && kvh > 0
            && h % kvh == 0
            && aligned(k)
            && aligned(v))
    }
}

cuda_only_op3!(
    PrefillAttention,
    "prefill-attention",
    "the prefill attention kernel runs on CUDA only",
    |op, (qs, ql), k, v| {
        let dev = qs.device().clone();
        let out = by_dtype!(qs.dtype(), "prefill attention", dev, prefill_typed(&dev, op, (qs, ql), k, v));
        let (b, h, l, d) = ql.shape().dims4()?;
        Ok((out, Shape::from((b, l, h, d))))
    }
);

fn prefill_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &PrefillAttention,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let (b, h, l, d) = ql.shape().dims4()?;
    let (_, kvh, t, _) = kl.shape().dims4()?;
    if T::DTYPE == DType::F32 || !PREFILL_HEAD_DIMS.contains(&d) {
        candle_core::bail!(
            "prefill attention on CUDA: {:?} heads of size {d} are outside the kernel's limits",
            T::DTYPE
        );
    }
    let q = contiguous_view::<T>(qs, ql, "query")?;
    let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    if let Some(s) = op.starts.as_deref().filter(|s| s.len() != b) {
        candle_core::bail!("prefill attention: {} row starts for {b} rows", s.len());
    }
    let starts = op.starts.as_deref().map(|s| upload_starts(dev, s)).transpose()?;
    let out = unsafe { dev.alloc::<T>(b * l * h * d)? };
    let f = function(
        dev,
        Module::Attention,
        &format!("wick_attention_prefill_{}_d{d}", dtype_suffix(T::DTYPE, "prefill attention")?),
    )?;
    let (ks_, vs_) = (outer_strides(kl), outer_strides(vl));
    let ints = [h as i32, kvh as i32, l as i32, t as i32, op.offset as i32, op.window.unwrap_or(0) as i32];
    let (scale, cap, null) = (op.scale, op.softcap.unwrap_or(0.0), 0u64);
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&q).arg(&k).arg(&v).arg(&out);
    match &starts {
        Some(s) => lb.arg(s),
        None => lb.arg(&null),
    };
    for i in &ints {
        lb.arg(i);
    }
    for s in ks_.iter().chain(&vs_) {
        lb.arg(s);
    }
    lb.arg(&scale).arg(&cap);
    let cfg = LaunchConfig {
        grid_dim: (l.div_ceil(PREFILL_ROWS) as u32, (b * h) as u32, 1),
        block_dim: (PREFILL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}

/// `silu(g) · u` in one launch of `wick_swiglu_*` (norm.cu): f32 inside and rounded once, as the
/// fused gate/up matmuls of decode round it; for inputs [`SwiGlu::fits`] takes.
pub struct SwiGlu;

impl SwiGlu {
    /// Whether the kernel takes `g` and `u`: on CUDA, f16 or bf16 alike, one shape, contiguous
    /// from 16-byte boundaries, a multiple of 8 elements, no gradient to track.
    pub fn fits(g: &candle_core::Tensor, u: &candle_core::Tensor) -> bool {
        let aligned = |x: &candle_core::Tensor| {
            x.is_contiguous() && (x.layout().start_offset() * x.dtype().size_in_bytes()).is_multiple_of(16)
        };
        g.device().is_cuda()
            && matches!(g.dtype(), DType::F16 | DType::BF16)
            && u.dtype() == g.dtype()
            && g.shape() == u.shape()
            && g.elem_count().is_multiple_of(8)
            && !g.track_op()
            && !u.track_op()
            && aligned(g)
            && aligned(u)
    }
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the fused SwiGLU runs on CUDA only")
    }

    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = gs.device().clone();
        let out = by_dtype!(gs.dtype(), "SwiGLU", dev, swiglu_typed(&dev, (gs, gl), (us, ul)));
        Ok((out, gl.shape().clone()))
    }
}

fn swiglu_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (gs, gl): (&CudaStorage, &Layout),
    (us, ul): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let n = gl.shape().elem_count();
    if T::DTYPE == DType::F32 || !n.is_multiple_of(8) || ul.shape() != gl.shape() {
        candle_core::bail!(
            "SwiGLU on CUDA: {:?} gate {:?} and up {:?} do not fit the kernel",
            T::DTYPE,
            gl.shape(),
            ul.shape()
        );
    }
    let g = contiguous_view::<T>(gs, gl, "SwiGLU: the gate")?;
    let u = contiguous_view::<T>(us, ul, "SwiGLU: the up projection")?;
    let out = unsafe { dev.alloc::<T>(n)? };
    let f = function(dev, Module::Norm, &format!("wick_swiglu_{}", dtype_suffix(T::DTYPE, "SwiGLU")?))?;
    let n_u = n as u64;
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&g).arg(&u).arg(&out).arg(&n_u);
    let cfg =
        LaunchConfig { grid_dim: ((n / 8).div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}

/// Page-locked host memory the GPU writes through its mapping: the tokens of greedy decode
/// steps ([`argmax_rows`]), `slots` slots of `rows` tokens, read by the host once the step that
/// wrote a slot has finished (an event), while later steps run.
pub struct HostRing {
    /// owns the memory; `host_ptr` and `device_ptr` are its two addresses
    _host: candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>,
    host_ptr: *const u32,
    device_ptr: u64,
    rows: usize,
    slots: usize,
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

/// Greedy decoding's pick (src/cuda/sample.cu): the argmax of each row of `logits` (rows, ..,
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
    let f = function(&dev, Module::Sample, &format!("wick_argmax_{}", dtype_suffix(T::DTYPE, "greedy argmax")?))?;
    let slots = a.ring.slots as u32;
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&x).arg(&a.vocab).arg(a.token).arg(&a.ring.device_ptr).arg(&slots).arg(a.pos);
    let cfg = LaunchConfig { grid_dim: (a.rows as u32, 1, 1), block_dim: (ARGMAX_THREADS, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(())
}

/// Threads per block of the argmax (sample.cu's ARGMAX_THREADS).
const ARGMAX_THREADS: u32 = 1024;
