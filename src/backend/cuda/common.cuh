// What wick's CUDA kernels share: conversions between the activation dtypes (f32, f16,
// bf16) and f32, in which every kernel computes, the gated MLP's activation and the tensor
// cores' m16n8k16 multiply (MmaType).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// a + b in the activation type (candle's `badd`: f16 / bf16 rounded once).
__device__ __forceinline__ float add_t(float a, float b) { return a + b; }
__device__ __forceinline__ __half add_t(__half a, __half b) { return __hadd(a, b); }
__device__ __forceinline__ __nv_bfloat16 add_t(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }

// silu(g) · u, the gated MLP's activation, in f32 (the fused gate/up kernels and SwiGLU).
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + __expf(-g)) * u; }

// d += a · b, one m16n8k16 tensor-core multiply with inputs of type TY ("f16" or "bf16") and
// f32 accumulators (sm_80 and newer).
#define WICK_MMA_16816(TY, d, a, b0, b1)                                                                      \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                                         \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                              \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                            \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// The m16n8k16 multiply and the packing of two f32 values into one A/B register, per input type.
template <typename T> struct MmaType;
#define WICK_MMA_TYPE(T, T2, PACK, TY)                                                                         \
    template <> struct MmaType<T> {                                                                           \
        static __device__ __forceinline__ uint32_t pack(float lo, float hi) {                                 \
            T2 v = PACK(lo, hi);                                                                              \
            return *reinterpret_cast<uint32_t*>(&v);                                                          \
        }                                                                                                     \
        static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,        \
                                                   uint32_t b1) {                                             \
            WICK_MMA_16816(TY, d, a, b0, b1);                                                                 \
        }                                                                                                     \
    };
WICK_MMA_TYPE(__half, __half2, __floats2half2_rn, "f16")
WICK_MMA_TYPE(__nv_bfloat16, __nv_bfloat162, __floats2bfloat162_rn, "bf16")

// Programmatic dependent launch (src/backend/cuda/launch.rs; sm_90 and newer, no-ops elsewhere and
// when launched without it). Every wick kernel calls pdl_launch_dependents() first, so that
// the next kernel's blocks may be scheduled while it runs, and pdl_wait() before it reads
// anything an earlier kernel wrote or writes anything: the wait returns once the kernel ahead
// has finished and its writes are visible. Before the wait a kernel reads only weights (and
// the fused decode step's attention the cache rows of earlier steps: see attention.cu).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// 16 bytes of data an earlier kernel wrote (activations), loaded in order after pdl_wait(): the
// compiler may move an __ldg (ld.global.nc, "read-only for the whole kernel") above the wait's
// asm, which in a dependent launch reads the bytes before the kernel ahead has written them.
// A volatile asm stays after the wait's.
__device__ __forceinline__ uint4 load_after_wait(const void* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
// One element of type T (2 or 4 bytes) an earlier kernel wrote, after pdl_wait() as above.
template <typename T>
__device__ __forceinline__ T elem_after_wait(const T* p) {
    if constexpr (sizeof(T) == 2) {
        uint16_t v;
        asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
        return *reinterpret_cast<const T*>(&v);
    } else {
        uint32_t v;
        asm volatile("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
        return *reinterpret_cast<const T*>(&v);
    }
}
// 16 bytes of weights for the loads a kernel issues before pdl_wait(): an ordinary (coherent)
// load keeps its place before the wait, where ptxas moves an __ldg (ld.global.nc) below it,
// losing the overlap with the kernel ahead.
__device__ __forceinline__ uint4 load_weights(const void* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
// Both at a kernel's start, for kernels with nothing to read before the wait.
__device__ __forceinline__ void pdl_enter() {
    pdl_launch_dependents();
    pdl_wait();
}
