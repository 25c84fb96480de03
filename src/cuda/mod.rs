//! wick's own CUDA kernels outside the quantized matmul (which lives in `quant/cuda`): loading
//! the fatbins build.rs compiles (once per device), and the decode-attention kernel.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
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
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Affine => include_bytes!(concat!(env!("OUT_DIR"), "/affine.fatbin")),
            Module::Attention => include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
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

/// Keys per block of the first pass and threads per block (attention.cu's CHUNK and THREADS).
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

const ATTN_CHUNK: usize = 64;
const ATTN_THREADS: u32 = 128;
/// The head dimension limit of the kernel.
pub const ATTN_MAX_HEAD_DIM: usize = 256;

/// Decode attention: `q` (B, H, 1, D) contiguous over `k` (B, KV, T, D), `v` (B, KV, T, DV)
/// views with unit last stride. `starts[b]`: the first key row `b` may see.
pub fn decode_attention(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    scale: f32,
    softcap: Option<f32>,
    starts: Option<&[usize]>,
) -> Result<(CudaStorage, Shape)> {
    let dev = q.0.device().clone();
    let out = by_dtype!(q.0.dtype(), "decode attention", dev, attention_typed(&dev, q, k, v, scale, softcap, starts));
    let (b, h, _, _) = q.1.shape().dims4()?;
    let dv = v.1.shape().dims4()?.3;
    Ok((out, Shape::from((b, h, 1, dv))))
}

fn attention_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    scale: f32,
    softcap: Option<f32>,
    starts: Option<&[usize]>,
) -> Result<CudaSlice<T>> {
    let (b, h, _, d) = ql.shape().dims4()?;
    let (_, kvh, t, _) = kl.shape().dims4()?;
    let dv = vl.shape().dims4()?.3;
    if h % kvh != 0 || d > ATTN_MAX_HEAD_DIM || dv > ATTN_MAX_HEAD_DIM || t == 0 {
        candle_core::bail!("decode attention on CUDA: {h} heads over {kvh} KV heads of size {d}/{dv} and {t} keys are outside the kernel's limits");
    }
    let (qa, qb) = ql.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("query not contiguous".into()))?;
    let q = qs.as_cuda_slice::<T>()?.slice(qa..qb);
    let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    let (kst, vst) = (kl.stride(), vl.stride());
    let splits = t.div_ceil(ATTN_CHUNK);
    let part_o = unsafe { dev.alloc::<f32>(b * h * splits * dv)? };
    let part_ml = unsafe { dev.alloc::<f32>(b * h * splits * 2)? };
    let out = unsafe { dev.alloc::<T>(b * h * dv)? };
    let starts_dev: Option<CudaSlice<i32>> = match starts {
        Some(s) => {
            let s: Vec<i32> = s.iter().map(|&x| x as i32).collect();
            let mut buf = unsafe { dev.alloc::<i32>(s.len())? };
            dev.memcpy_htod(&s, &mut buf)?;
            Some(buf)
        }
        None => None,
    };
    let tn = dtype_suffix(T::DTYPE, "decode attention")?;
    let partial = function(dev, Module::Attention, &format!("wick_attention_partial_{tn}"))?;
    let combine = function(dev, Module::Attention, &format!("wick_attention_combine_{tn}"))?;
    let null = 0u64;
    let (h_i, kvh_i, t_i, d_i, dv_i, splits_i) = (h as i32, kvh as i32, t as i32, d as i32, dv as i32, splits as i32);
    let ks_ = [kst[0] as i64, kst[1] as i64, kst[2] as i64];
    let vs_ = [vst[0] as i64, vst[1] as i64, vst[2] as i64];
    let cap = softcap.unwrap_or(0.0);
    let stream = dev.cuda_stream();
    let mut lb = stream.launch_builder(&partial);
    lb.arg(&q).arg(&k).arg(&v).arg(&part_o).arg(&part_ml);
    match &starts_dev {
        Some(s) => lb.arg(s),
        None => lb.arg(&null),
    };
    lb.arg(&h_i).arg(&kvh_i).arg(&t_i).arg(&d_i).arg(&dv_i);
    lb.arg(&ks_[0]).arg(&ks_[1]).arg(&ks_[2]).arg(&vs_[0]).arg(&vs_[1]).arg(&vs_[2]);
    // 16-byte loads of key rows: the head size and every stride in whole 16-byte units
    let esz = T::DTYPE.size_in_bytes();
    let vec = [d, kst[0], kst[1], kst[2], kl.start_offset()].iter().all(|&x| (x * esz) % 16 == 0) as i32;
    lb.arg(&scale).arg(&cap).arg(&vec);
    let cfg = LaunchConfig {
        grid_dim: ((b * h) as u32, splits as u32, 1),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    let mut lb = stream.launch_builder(&combine);
    lb.arg(&part_o).arg(&part_ml).arg(&out).arg(&splits_i).arg(&dv_i);
    let cfg = LaunchConfig { grid_dim: ((b * h) as u32, 1, 1), block_dim: (ATTN_THREADS, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}
