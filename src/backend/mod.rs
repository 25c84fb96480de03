//! What the ops run on: device and dtype selection, peak memory, the CPU's SIMD kernels and
//! drivers, and (with their features) CUDA's kernel loading and launches and Metal's pipelines.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod memory;
#[cfg(feature = "metal")]
pub mod metal;
pub mod stats;

/// A GPU backend's storage, as found inside a candle `Storage`.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub trait GpuStorage: Sized {
    /// The backend's name in errors.
    const BACKEND: &'static str;
    fn of(st: &candle_core::Storage) -> Option<&Self>;
}

#[cfg(feature = "cuda")]
impl GpuStorage for candle_core::CudaStorage {
    const BACKEND: &'static str = "CUDA";
    fn of(st: &candle_core::Storage) -> Option<&Self> {
        match st {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }
}

#[cfg(feature = "metal")]
impl GpuStorage for candle_core::MetalStorage {
    const BACKEND: &'static str = "Metal";
    fn of(st: &candle_core::Storage) -> Option<&Self> {
        match st {
            candle_core::Storage::Metal(m) => Some(m),
            _ => None,
        }
    }
}
