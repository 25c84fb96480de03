// The per-value arithmetic of the affine quantized matmul (MLX's format: each row of W is one
// little-endian bit stream of BITS-bit codes in u32 words; per group of `gs` values
// w = scale * q + bias), written once for the GPU kernels: the CUDA kernels include it
// (affine.cu) and the Metal kernels are compiled with it prepended
// (affine.metal). The CPU kernels (cpu.rs) compute the same way.
//
// The unit of work is a chunk of 32 consecutive values of one row: exactly BITS words, never
// straddling a group (group sizes are 32, 64 or 128), its codes at compile-time bit offsets.
// Per chunk the output accumulates  s * (x . q) + b * sum(x)  in f32.
#pragma once

#if defined(__METAL_VERSION__)
#define WICK_FN inline
#define WICK_THREAD thread
#define WICK_AS_F32(u) as_type<float>(u)
#define WICK_FMA(a, b, c) fma(a, b, c)
#else
#define WICK_FN __device__ __forceinline__
#define WICK_THREAD
#define WICK_AS_F32(u) __uint_as_float(u)
#define WICK_FMA(a, b, c) fmaf(a, b, c)
#endif

// Code j (0..32) of a chunk as a float: bits j*BITS .. (j+1)*BITS of its words. The integer
// becomes a float by OR-ing it into the mantissa of 2^23 and subtracting 2^23 (exact for codes
// below 2^23), cheaper than an int-to-float conversion.
template <int BITS>
WICK_FN float wick_code(const WICK_THREAD uint32_t* w, int j) {
    const uint32_t mask = (1u << BITS) - 1u;
    const int bit = j * BITS;
    const int wi = bit / 32, off = bit % 32;
    uint32_t v = w[wi] >> off;
    if (off + BITS > 32) v |= w[wi + 1] << (32 - off);
    return WICK_AS_F32((v & mask) | 0x4B000000u) - 8388608.0f;
}

// All 32 codes of a chunk.
template <int BITS>
WICK_FN void wick_unpack32(const WICK_THREAD uint32_t* w, WICK_THREAD float* q) {
#pragma unroll
    for (int j = 0; j < 32; ++j) q[j] = wick_code<BITS>(w, j);
}

// One chunk's contribution to an output: `dot` = x . q and `sum_x` = sum(x) over the chunk's
// 32 values, `s` and `b` its group's scale and bias.
WICK_FN float wick_chunk_acc(float acc, float s, float b, float dot, float sum_x) {
    return WICK_FMA(s, dot, WICK_FMA(b, sum_x, acc));
}
