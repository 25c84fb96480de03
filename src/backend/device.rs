//! Device and dtype selection, chosen once per command.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Picks the device named by `--device` (`cpu`, `cuda`, `cuda:N`, `metal`), or the best available.
pub fn select_device(name: Option<&str>) -> Result<Device> {
    match name {
        None | Some("auto") => {
            #[cfg(feature = "cuda")]
            if let Ok(d) = Device::new_cuda(0) {
                return Ok(single_stream(d));
            }
            #[cfg(feature = "metal")]
            if let Ok(d) = Device::new_metal(0) {
                return Ok(d);
            }
            Ok(Device::Cpu)
        }
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = parse_ordinal(s)?;
            if !cfg!(feature = "cuda") {
                bail!("--device {s}: this wick was built without CUDA support (rebuild with `--features cuda`)");
            }
            let d = Device::new_cuda(ordinal)
                .map_err(|e| anyhow::anyhow!("--device {s}: cannot open CUDA device {ordinal}: {e}"))?;
            Ok(single_stream(d))
        }
        Some(s) if s == "metal" || s.starts_with("metal:") => {
            let ordinal = parse_ordinal(s)?;
            if !cfg!(feature = "metal") {
                bail!("--device {s}: this wick was built without Metal support (rebuild with `--features metal` on a Mac)");
            }
            Device::new_metal(ordinal)
                .map_err(|e| anyhow::anyhow!("--device {s}: cannot open Metal device {ordinal}: {e}"))
        }
        Some(s) => bail!("--device {s}: expected one of cpu, cuda, cuda:N, metal, auto"),
    }
}

/// wick runs all work of a device on its one stream, where stream order alone keeps a buffer
/// alive until the kernels using it have run; cudarc's per-tensor event tracking (for
/// multi-stream use) only adds host work to every op, so it is turned off for the tensors this
/// device makes. `WICK_CUDA_EVENT_TRACKING=1` keeps it (for comparisons).
///
/// Buffers come from the device's default memory pool (stream-ordered allocation), which by
/// default hands its free memory back to the driver at every synchronization (each token read,
/// each generation's end): the next prompt then maps its temporaries anew. The pool keeps what
/// it has instead, as mlx's and PyTorch's caching allocators do (`WICK_CUDA_POOL_RELEASE=1`
/// restores the release, for comparisons).
fn single_stream(d: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        if std::env::var_os("WICK_CUDA_EVENT_TRACKING").is_none_or(|v| v != "1") {
            // SAFETY: one stream per device (above).
            unsafe { c.disable_event_tracking() };
        }
        if std::env::var_os("WICK_CUDA_POOL_RELEASE").is_none_or(|v| v != "1") {
            // best effort: without it the pool only releases and maps memory more often
            let _ = crate::backend::cuda::keep_pool_memory(c);
        }
    }
    d
}

fn parse_ordinal(s: &str) -> Result<usize> {
    match s.split_once(':') {
        None => Ok(0),
        Some((_, n)) => {
            n.parse().map_err(|_| anyhow::anyhow!("--device {s}: the device index after ':' must be a number"))
        }
    }
}

/// Parses a dtype name as mlx_lm spells them (`float16`, `bfloat16`, `float32`) or short (`f16`, ...).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "float16" | "f16" | "fp16" | "half" => DType::F16,
        "bfloat16" | "bf16" => DType::BF16,
        "float32" | "f32" | "fp32" | "float" => DType::F32,
        other => bail!("dtype '{other}': expected one of float16, bfloat16, float32"),
    })
}

/// mlx_lm's name for a float dtype, as written in config.json's `torch_dtype`.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        DType::U32 => "uint32",
        DType::U8 => "uint8",
        DType::I64 => "int64",
        DType::F64 => "float64",
        _ => "unknown",
    }
}

/// One-time process setup for the CPU backend: candle asks for the thread count on every
/// matmul and, unless `RAYON_NUM_THREADS` is set, re-reads /proc/cpuinfo each time; pin it once.
pub fn init_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            // Called before any other thread reads the environment (first model load).
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}
