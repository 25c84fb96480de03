// The residual add and the RMSNorm that follows it, in one launch: h = x + r, n = rms_norm(h) * w.
// Both results are exactly what the two separate kernels give (candle's `badd` and `rmsnorm`):
// the add in the activation type, the sum of squares in f32 in the same order (a thread's
// strided columns, a warp butterfly, then one across the block's warps), the same block sizes,
// and n = T(rsqrt(mean + eps) * h * w) rounded once. The point is the launch saved and the
// loads: x, r and w are read once, all at the start, instead of in two kernels' dependent
// rounds. Launched from
// src/ops/norm/cuda.rs; compiled by build.rs.

#include "../../backend/cuda/common.cuh"


// One block per row of d columns: n (rows x d) and h (rows x d) from x, r (rows x d) and w (d);
// at most MAX_PER columns per thread.
template <typename T, int MAX_PER>
__device__ void add_rms_norm_impl(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ w,
                                  T* __restrict__ n, T* __restrict__ h, int d, float eps) {
    const size_t row = blockIdx.x;
    const int tid = threadIdx.x, bs = blockDim.x;
    const T* xr = x + row * d;
    const T* rr = r + row * d;
    float wv[MAX_PER];
    T hv[MAX_PER];
#pragma unroll
    for (int i = 0; i < MAX_PER; ++i) {
        const int c = tid + i * bs;
        if (c < d) {
            hv[i] = add_t(xr[c], rr[c]);
            wv[i] = to_f32(w[c]);
        }
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_PER; ++i) {
        const int c = tid + i * bs;
        if (c < d) {
            h[row * d + c] = hv[i];
            const float v = to_f32(hv[i]);
            s += v * v;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, 32);
    if (bs > 32) {
        __shared__ float part[32];
        if (tid % 32 == 0) part[tid / 32] = s;
        __syncthreads();
        s = part[tid % 32];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, 32);
    }
    const float scale = rsqrtf(s / d + eps);
#pragma unroll
    for (int i = 0; i < MAX_PER; ++i) {
        const int c = tid + i * bs;
        if (c < d) n[row * d + c] = from_f32<T>(scale * to_f32(hv[i]) * wv[i]);
    }
}

// candle's block sizes: 1,024 threads per row from 1,024 columns on (up to 8 columns each),
// one warp below (up to 32 columns each)
#define ADD_RMS_NORM(T, TN)                                                                               \
    extern "C" __global__ void __launch_bounds__(1024) wick_add_rms_norm_##TN(                           \
        const T* x, const T* r, const T* w, T* n, T* h, int d, float eps) {                               \
        pdl_enter(); add_rms_norm_impl<T, 8>(x, r, w, n, h, d, eps);                                                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32) wick_add_rms_norm_small_##TN(                       \
        const T* x, const T* r, const T* w, T* n, T* h, int d, float eps) {                               \
        pdl_enter(); add_rms_norm_impl<T, 32>(x, r, w, n, h, d, eps);                                                 \
    }
ADD_RMS_NORM(float, f32)
ADD_RMS_NORM(__half, f16)
ADD_RMS_NORM(__nv_bfloat16, bf16)
