// SwiGLU, silu(g) · u in f32 rounded once (as the fused gate/up matmuls of decode round it), for
// the prefill's separate gate and up products. Launched from src/ops/swiglu/cuda.rs; compiled by
// build.rs.

#include "../../backend/cuda/common.cuh"

// y = silu(g) · u over n elements (a multiple of 8, all three 16-byte aligned), 8 per thread.
template <typename T>
__device__ void swiglu_impl(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, size_t n) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= n) return;
    const uint4 gv = *reinterpret_cast<const uint4*>(g + i), uv = *reinterpret_cast<const uint4*>(u + i);
    const T* ge = reinterpret_cast<const T*>(&gv);
    const T* ue = reinterpret_cast<const T*>(&uv);
    T out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = from_f32<T>(silu_mul(to_f32(ge[j]), to_f32(ue[j])));
    *reinterpret_cast<uint4*>(y + i) = *reinterpret_cast<const uint4*>(out);
}
#define SWIGLU(T, TN)                                                                                     \
    extern "C" __global__ void wick_swiglu_##TN(const T* g, const T* u, T* y, size_t n) {                \
        pdl_enter(); swiglu_impl<T>(g, u, y, n);                                                                       \
    }
SWIGLU(__half, f16)
SWIGLU(__nv_bfloat16, bf16)
