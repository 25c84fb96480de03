// What the one-warp-per-row decode kernels of the quantized matmuls share (affine.cu, fp.cu):
// loading a 32-value chunk of the activations, and which output rows a warp owns.
#pragma once

// 32 consecutive activations as floats (16-byte loads after the wait: an earlier kernel wrote
// them; the chunk start is 64-byte aligned relative to the row, and the launchers pass rows
// from a 16-byte aligned base).
template <typename T>
__device__ __forceinline__ void load_x32(const T* __restrict__ p, float (&x)[32]) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < 32 / PER; ++i) {
        const uint4 v = load_after_wait(reinterpret_cast<const uint4*>(p) + i);
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int j = 0; j < PER; ++j) x[i * PER + j] = to_f32(e[j]);
    }
}

__device__ __forceinline__ int warp_row() { return blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; }

// The first output row of this warp: two rows per warp for one input row (they share the input
// chunk), else one.
template <int MM>
__device__ __forceinline__ int first_row() { return warp_row() * (MM == 1 ? 2 : 1); }
