// CUDA kernels of the quantized matmul in MLX's float modes (`mxfp4`, `nvfp4`, `mxfp8`; the
// format, bit for bit, is src/quant/fp.rs): codes along the input axis packed little end first
// into u32 words (8 E2M1 nibbles or 4 E4M3 bytes a word), one u8 scale per group (mxfp4: 32
// values, E8M0; nvfp4: 16 values, E4M3, times g / 2688 with a global scale g; mxfp8: 32 E4M3
// values, E8M0), no biases. Compiled by build.rs (nvcc, `cuda` feature) and loaded once per
// device; the launch code is src/ops/qmatmul/fp_cuda.rs.
//
// As in affine.cu the unit of work is a chunk of 32 consecutive values of one row: 4 words
// (one 16-byte load) at 4 bits, 8 words at 8 bits, one mx group or two nvfp4 groups. Codes
// become floats through bit operations and the hardware's exact f16 -> f32 conversion (no
// table lookups): the decoded values are the codes' values times a constant power of two,
// `UNIT` (exact), which each group's dot product takes back before its scale. Everything
// accumulates in f32, as the CPU kernels.
//
// - `wick_fpmv_{mode}_{t}_m{M}`: y (m x n) = x (m x k) . W^T for m <= M input rows (decode):
//   one warp per output row (two rows per warp for one input row, sharing the input chunk);
//   lanes stride over the row's chunks, several chunks in flight per lane; warp-shuffle sums.
// - `wick_gfpmv_{mode}_{t}`: the same for one input row, gathered (mixture-of-experts decode):
//   routed row r = blockIdx.y is input row r / xdiv times expert ids[r]'s matrix, the ids read
//   on the device (no host read: the step can be captured in a CUDA graph).
// - `wick_fp_dequant_{mode}_{t}`: the dense matrix as `mx.dequantize` gives it, bit for bit
//   with src/quant/fp.rs `dequantize` (f32 output with a global scale), for the prefill path
//   (cuBLAS afterwards) and embedding lookups.
//
// The global scale is read from a device pointer (null: none), never from the host.

#include "../../backend/cuda/common.cuh"
#include <cuda_fp8.h>
#include "decode_rows.cuh"

typedef __half f16;
typedef __nv_bfloat16 bf16;

enum { MXFP4 = 0, NVFP4 = 1, MXFP8 = 2 };

// The chunk geometry of a mode: u32 words per 32 values, values per scale, scales per chunk.
template <int MODE>
struct Fmt {
    static constexpr int WORDS = MODE == MXFP8 ? 8 : 4;
    static constexpr int GROUP = MODE == NVFP4 ? 16 : 32;
    static constexpr int GROUPS = 32 / GROUP;
};

// E4M3 to f16 in hardware (cvt.rn.f16x2.e4m3x2, sm_89 and newer), else by bit operations.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define WICK_FP8_CVT 1
#endif

// What the decoded codes of a mode must be multiplied by to give their values: E2M1 codes
// decode as value * 2^-14, E4M3 as value (hardware) or value * 2^-8 (bit operations).
template <int MODE>
__device__ __forceinline__ constexpr float unit() {
    if (MODE != MXFP8) return 16384.f;
#ifdef WICK_FP8_CVT
    return 1.f;
#else
    return 256.f;
#endif
}

// w << N, or w >> -N for a negative N (compile-time).
template <int N>
__device__ __forceinline__ uint32_t shift(uint32_t w) {
    if constexpr (N >= 0)
        return w << N;
    else
        return w >> -N;
}

// Two f16 values (low, high half of `h`) as f32, exactly (subnormals included).
__device__ __forceinline__ float2 half2_bits_to_f32(uint32_t h) {
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// E2M1 codes J and J + 4 of word w (16 bits apart), each as its value * 2^-14: the code's sign
// goes to bit 15 of an f16 and its three magnitude bits (exponent, mantissa) to bits 9..11,
// the f16 exponent's lowest two bits and the mantissa's top bit. f16 reads exponent e > 0 as
// 2^(e-15) (1 + m/2) = 2^-14 * 2^(e-1) (1 + m/2), the E2M1 value times 2^-14, and the
// subnormal code 1 (0.5) as 2^-15 = 2^-14 * 0.5: every code, signed zero included.
template <int J>
__device__ __forceinline__ void e2m1_pair(uint32_t w, float* v) {
    const uint32_t h = (shift<12 - 4 * J>(w) & 0x80008000u) | (shift<9 - 4 * J>(w) & 0x0E000E00u);
    const float2 f = half2_bits_to_f32(h);
    v[J] = f.x;
    v[J + 4] = f.y;
}

// The 8 E2M1 codes of a word, each its value * 2^-14.
__device__ __forceinline__ void e2m1_word(uint32_t w, float* v) {
    e2m1_pair<0>(w, v);
    e2m1_pair<1>(w, v);
    e2m1_pair<2>(w, v);
    e2m1_pair<3>(w, v);
}

// The 4 E4M3 codes of a word, each its value times 1 / unit<MXFP8>().
__device__ __forceinline__ void e4m3_word(uint32_t w, float* v) {
#ifdef WICK_FP8_CVT
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w & 0xffffu), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w >> 16), __NV_E4M3);
    const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
    v[0] = a.x;
    v[1] = a.y;
    v[2] = b.x;
    v[3] = b.y;
#else
    // bytes (0, 2) and (1, 3) as f16 pairs: sign to bit 15, exponent and mantissa to bits
    // 7..13, which f16 reads as the E4M3 value * 2^-8 (subnormals as subnormals); NaN codes
    // read as 480 (mlx never writes them)
    const float2 a = half2_bits_to_f32(((w << 8) & 0x80008000u) | ((w << 7) & 0x3F803F80u));
    const float2 b = half2_bits_to_f32((w & 0x80008000u) | ((w >> 1) & 0x3F803F80u));
    v[0] = a.x;
    v[1] = b.x;
    v[2] = a.y;
    v[3] = b.y;
#endif
}

// The value of an E4M3 byte exactly as src/quant/fp.rs `e4m3` gives it (bias 7, subnormals
// m * 2^-9, 0x7f / 0xff NaN with the code's sign).
__device__ __forceinline__ float e4m3_value(uint32_t c) {
    const uint32_t em = c & 0x7fu;
    float mag;
    if (em == 0x7fu)
        mag = __uint_as_float(0x7fc00000u);
    else if (em >= 8u)
        mag = __uint_as_float((em << 20) + (120u << 23));  // exponent e - 7 + 127, mantissa m
    else
        mag = (float)em * 0x1p-9f;
    return __uint_as_float(__float_as_uint(mag) | ((c & 0x80u) << 24));
}

// An E8M0 scale, 2^(s - 127), as mlx decodes it (through bf16: s == 0 gives 2^-127).
__device__ __forceinline__ float e8m0_value(uint32_t s) {
    return __uint_as_float(s == 0u ? 0x00400000u : s << 23);
}

// The multiplier of scale byte s in a mode (without the global scale).
template <int MODE>
__device__ __forceinline__ float scale_value(uint32_t s) {
    if constexpr (MODE == NVFP4)
        return e4m3_value(s);
    else
        return e8m0_value(s);
}

// nvfp4's global scale factor g / 2688 of matrix e, or 1 without a global scale.
__device__ __forceinline__ float global_factor(const float* global, size_t e) {
    return global == nullptr ? 1.f : __fdiv_rn(global[e], 2688.f);
}

// All 32 codes of a chunk, as values / unit<MODE>().
template <int MODE>
__device__ __forceinline__ void decode32(const uint32_t (&w)[Fmt<MODE>::WORDS], float (&q)[32]) {
#pragma unroll
    for (int i = 0; i < Fmt<MODE>::WORDS; ++i) {
        if constexpr (MODE == MXFP8)
            e4m3_word(w[i], q + 4 * i);
        else
            e2m1_word(w[i], q + 8 * i);
    }
}

// The words of one chunk (16-byte loads: a chunk starts at word c * WORDS of a row of
// k / 32 * WORDS words, and the launcher checks the base alignment).
template <int WORDS>
__device__ __forceinline__ void load_chunk(const uint32_t* __restrict__ p, uint32_t (&w)[WORDS]) {
#pragma unroll
    for (int i = 0; i < WORDS / 4; ++i) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
        w[4 * i] = v.x;
        w[4 * i + 1] = v.y;
        w[4 * i + 2] = v.z;
        w[4 * i + 3] = v.w;
    }
}

// The scales of chunk c of a row (`sr`: the row's scale bytes), each times the global factor.
template <int MODE>
__device__ __forceinline__ void load_scales(const uint8_t* __restrict__ sr, int c, float factor,
                                            float (&s)[Fmt<MODE>::GROUPS]) {
#pragma unroll
    for (int g = 0; g < Fmt<MODE>::GROUPS; ++g) s[g] = scale_value<MODE>(__ldg(sr + c * Fmt<MODE>::GROUPS + g)) * factor;
}

// One chunk's contribution to an output: per group, the dot product of its inputs and codes,
// back in value units, times the group's scale.
template <int MODE>
__device__ __forceinline__ float chunk_acc(float acc, const float (&x)[32], const float (&q)[32],
                                           const float (&s)[Fmt<MODE>::GROUPS]) {
    constexpr int GV = Fmt<MODE>::GROUP;
#pragma unroll
    for (int g = 0; g < Fmt<MODE>::GROUPS; ++g) {
        float d = 0.f;
#pragma unroll
        for (int j = 0; j < GV; ++j) d = fmaf(x[g * GV + j], q[g * GV + j], d);
        acc = fmaf(d * unit<MODE>(), s[g], acc);
    }
    return acc;
}

// One output row of y (m x n) = x (m x k) . W^T for m <= MM input rows, by one warp: lanes
// stride over the row's chunks (each warp-wide load reads 32 consecutive chunks: 512
// contiguous bytes at 4 bits), U chunks per lane loaded before any arithmetic to keep enough
// bytes in flight. On return every lane holds the sums.
template <typename T, int MODE, int MM>
__device__ __forceinline__ void fpmv_row(const uint32_t* __restrict__ w, const uint8_t* __restrict__ sc,
                                         float factor, const T* __restrict__ x, int row, int m_rows, int k,
                                         float (&acc)[MM]) {
    using F = Fmt<MODE>;
    const int lane = threadIdx.x % 32;
    const int chunks = k / 32;
    const uint32_t* wr = w + (size_t)row * chunks * F::WORDS;
    const uint8_t* sr = sc + (size_t)row * chunks * F::GROUPS;
    constexpr int U = F::WORDS <= 4 ? 4 : 2;
#pragma unroll
    for (int m = 0; m < MM; ++m) acc[m] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint32_t words[U][F::WORDS];
        float s[U][F::GROUPS];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                load_chunk<F::WORDS>(wr + (size_t)c * F::WORDS, words[u]);
                load_scales<MODE>(sr, c, factor, s[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                float q[32];
                decode32<MODE>(words[u], q);
#pragma unroll
                for (int m = 0; m < MM; ++m) {
                    if (m < m_rows) {
                        float xv[32];
                        load_x32<T>(x + (size_t)m * k + (size_t)c * 32, xv);
                        acc[m] = chunk_acc<MODE>(acc[m], xv, q, s[u]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MM; ++m) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
    }
}

// Two rows against one input row (decode): the input chunk is loaded and converted once for
// both rows.
template <typename T, int MODE>
__device__ __forceinline__ void fpmv_two_rows(const uint32_t* __restrict__ w0, const uint8_t* __restrict__ s0,
                                              const uint32_t* __restrict__ w1, const uint8_t* __restrict__ s1,
                                              float factor, const T* __restrict__ x, int k, float& acc0,
                                              float& acc1) {
    using F = Fmt<MODE>;
    const int lane = threadIdx.x % 32;
    const int chunks = k / 32;
    constexpr int U = F::WORDS <= 4 ? 2 : 1;
    acc0 = 0.f;
    acc1 = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint32_t wa[U][F::WORDS], wb[U][F::WORDS];
        float sa[U][F::GROUPS], sb[U][F::GROUPS];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                load_chunk<F::WORDS>(w0 + (size_t)c * F::WORDS, wa[u]);
                load_chunk<F::WORDS>(w1 + (size_t)c * F::WORDS, wb[u]);
                load_scales<MODE>(s0, c, factor, sa[u]);
                load_scales<MODE>(s1, c, factor, sb[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                float xv[32];
                load_x32<T>(x + (size_t)c * 32, xv);
                float q[32];
                decode32<MODE>(wa[u], q);
                acc0 = chunk_acc<MODE>(acc0, xv, q, sa[u]);
                decode32<MODE>(wb[u], q);
                acc1 = chunk_acc<MODE>(acc1, xv, q, sb[u]);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, o);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, o);
    }
}

// Rows `row` and `row + 1` of y = x . W^T for one input row (an odd last row is computed twice
// and written once).
template <typename T, int MODE>
__device__ __forceinline__ void fpmv_pair(const uint32_t* __restrict__ w, const uint8_t* __restrict__ sc,
                                          float factor, const T* __restrict__ x, T* __restrict__ y, int row, int n,
                                          int k) {
    using F = Fmt<MODE>;
    const int row1 = min(row + 1, n - 1);
    const size_t wst = (size_t)k / 32 * F::WORDS, sst = (size_t)k / F::GROUP;
    float a0, a1;
    fpmv_two_rows<T, MODE>(w + row * wst, sc + row * sst, w + row1 * wst, sc + row1 * sst, factor, x, k, a0, a1);
    if (threadIdx.x % 32 == 0) {
        y[row] = from_f32<T>(a0);
        if (row + 1 < n) y[row + 1] = from_f32<T>(a1);
    }
}

// y = x . W^T (W: n rows of k, packed codes `w`, scale bytes `sc`, global factor `factor`).
// For one input row a warp computes rows `row` and `row + 1` (an odd last row is computed
// twice and written once), else `row` for all m inputs.
template <typename T, int MODE, int MM>
__device__ __forceinline__ void fpmv_impl(const uint32_t* __restrict__ w, const uint8_t* __restrict__ sc,
                                          float factor, const T* __restrict__ x, T* __restrict__ y, int m_rows,
                                          int n, int k) {
    using F = Fmt<MODE>;
    const int row = first_row<MM>();
    if (row >= n) return;
    if constexpr (MM == 1) {
        fpmv_pair<T, MODE>(w, sc, factor, x, y, row, n, k);
    } else {
        float acc[MM];
        fpmv_row<T, MODE, MM>(w, sc, factor, x, row, m_rows, k, acc);
        if (threadIdx.x % 32 == 0) {
#pragma unroll
            for (int m = 0; m < MM; ++m)
                if (m < m_rows) y[(size_t)m * n + row] = from_f32<T>(acc[m]);
        }
    }
}

// q, k and v of one input row in one launch (decode): the warps' row pairs run over q's rows,
// then k's, then v's; y is q's n0 outputs, then k's n1, then v's n2.
template <typename T, int MODE>
__device__ __forceinline__ void fpmv3_impl(const uint32_t* w0, const uint8_t* s0, const float* g0, int n0,
                                           const uint32_t* w1, const uint8_t* s1, const float* g1, int n1,
                                           const uint32_t* w2, const uint8_t* s2, const float* g2, int n2,
                                           const T* __restrict__ x, T* __restrict__ y, int k) {
    int pair = warp_row();
    const int p0 = (n0 + 1) / 2, p1 = (n1 + 1) / 2, p2 = (n2 + 1) / 2;
    if (pair < p0) {
        fpmv_pair<T, MODE>(w0, s0, global_factor(g0, 0), x, y, 2 * pair, n0, k);
        return;
    }
    pair -= p0;
    if (pair < p1) {
        fpmv_pair<T, MODE>(w1, s1, global_factor(g1, 0), x, y + n0, 2 * pair, n1, k);
        return;
    }
    pair -= p1;
    if (pair < p2) fpmv_pair<T, MODE>(w2, s2, global_factor(g2, 0), x, y + n0 + n1, 2 * pair, n2, k);
}

// The gated MLP's first half for one input row in one launch: y = silu(x . G^T) * (x . U^T), in
// f32 before rounding; one warp per output row, the input chunk shared by the gate and up rows.
template <typename T, int MODE>
__device__ __forceinline__ void fpswiglu_impl(const uint32_t* __restrict__ gw, const uint8_t* __restrict__ gs,
                                              const uint32_t* __restrict__ uw, const uint8_t* __restrict__ us,
                                              const T* __restrict__ x, T* __restrict__ y, int n, int k) {
    using F = Fmt<MODE>;
    const int row = warp_row();
    if (row >= n) return;
    const size_t wst = (size_t)k / 32 * F::WORDS, sst = (size_t)k / F::GROUP;
    float g, u;
    fpmv_two_rows<T, MODE>(gw + row * wst, gs + row * sst, uw + row * wst, us + row * sst, 1.f, x, k, g, u);
    if (threadIdx.x % 32 == 0) y[row] = from_f32<T>(silu_mul(g, u));
}

// The gathered form: routed row r = blockIdx.y is input row r / xdiv times matrix ids[r] of
// the stack (expert e's codes at w + e * ew words, its scales at sc + e * es bytes, its global
// scale at global[e]); blockIdx.x covers the n output rows as in `fpmv_impl` with one input
// row. The id comes from the router's kernels, so it is read after the wait. An id outside
// the stack (`experts`) is not read through: its routed row becomes NaN.
template <typename T, int MODE>
__device__ __forceinline__ void gfpmv_impl(const uint32_t* __restrict__ w, const uint8_t* __restrict__ sc,
                                           const float* __restrict__ global, const uint32_t* __restrict__ ids,
                                           long long ew, long long es, int experts, int xdiv,
                                           const T* __restrict__ x, T* __restrict__ y, int n, int k) {
    pdl_launch_dependents();
    pdl_wait();
    const size_t r = blockIdx.y;
    const uint32_t e = elem_after_wait(ids + r);
    T* yr = y + r * n;
    if (e >= (uint32_t)experts) {
        const int row = first_row<1>();
        if (threadIdx.x % 32 == 0 && row < n) {
            const T nan = from_f32<T>(__uint_as_float(0x7fc00000u));
            yr[row] = nan;
            if (row + 1 < n) yr[row + 1] = nan;
        }
        return;
    }
    fpmv_impl<T, MODE, 1>(w + e * ew, sc + e * es, global_factor(global, e), x + r / xdiv * k, yr, 1, n, k);
}

// The dense matrix in T, eight values per thread (one word at 4 bits, two at 8: a warp's loads
// and stores are each one contiguous run), rounded as src/quant/fp.rs `dequantize` rounds:
// nvfp4 with a global scale g in f32, code * (scale * (g / 2688)) (the launcher passes T = f32
// then); nvfp4 without, round_T(code * scale); the mx modes round_T(code * round_T(scale)).
// `units`: the matrix's (or stack's) values / 8; `per_mat`: values per matrix (for the global
// scale of each matrix of a stack).
template <typename T, int MODE>
__device__ __forceinline__ void fp_dequant_impl(const uint32_t* __restrict__ w, const uint8_t* __restrict__ sc,
                                                const float* __restrict__ global, T* __restrict__ out,
                                                long long units, long long per_mat) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // values idx * 8 ..
    if (idx >= units) return;
    float v[8];
    if constexpr (MODE == MXFP8) {
        const uint32_t a = w[2 * idx], b = w[2 * idx + 1];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[j] = e4m3_value((a >> (8 * j)) & 0xffu);
            v[4 + j] = e4m3_value((b >> (8 * j)) & 0xffu);
        }
    } else {
        e2m1_word(w[idx], v);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= 16384.f;  // exact: the E2M1 values
    }
    // rows are whole groups: the group index runs on across rows and matrices
    const float s = scale_value<MODE>(sc[idx * 8 / Fmt<MODE>::GROUP]);
    T vals[8];
    if (MODE == NVFP4 && global != nullptr) {
        const float f = __fmul_rn(s, __fdiv_rn(global[idx * 8 / per_mat], 2688.f));
#pragma unroll
        for (int j = 0; j < 8; ++j) vals[j] = from_f32<T>(__fmul_rn(v[j], f));
    } else if (MODE == NVFP4) {
#pragma unroll
        for (int j = 0; j < 8; ++j) vals[j] = from_f32<T>(__fmul_rn(v[j], s));
    } else {
        const float f = to_f32(from_f32<T>(s));
#pragma unroll
        for (int j = 0; j < 8; ++j) vals[j] = from_f32<T>(__fmul_rn(v[j], f));
    }
    uint4* dst = reinterpret_cast<uint4*>(out + idx * 8);
    const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
    for (int i = 0; i < 8 * (int)sizeof(T) / 16; ++i) dst[i] = src[i];
}

#define FPMV(MODE, MN, T, TN, MM)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) wick_fpmv_##MN##_##TN##_m##MM(                      \
        const uint32_t* w, const uint8_t* s, const float* global, const T* x, T* y, int m, int n, int k) { \
        pdl_enter();                                                                                     \
        fpmv_impl<T, MODE, MM>(w, s, global_factor(global, 0), x, y, m, n, k);                          \
    }
#define GFPMV(MODE, MN, T, TN)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) wick_gfpmv_##MN##_##TN(                             \
        const uint32_t* w, const uint8_t* s, const float* global, const uint32_t* ids, long long ew,     \
        long long es, int experts, int xdiv, const T* x, T* y, int n, int k) {                           \
        gfpmv_impl<T, MODE>(w, s, global, ids, ew, es, experts, xdiv, x, y, n, k);                      \
    }
#define FP_DEQ(MODE, MN, T, TN)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) wick_fp_dequant_##MN##_##TN(                        \
        const uint32_t* w, const uint8_t* s, const float* global, T* out, long long units,               \
        long long per_mat) {                                                                             \
        pdl_enter();                                                                                     \
        fp_dequant_impl<T, MODE>(w, s, global, out, units, per_mat);                                     \
    }
#define FPMV3(MODE, MN, T, TN)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) wick_fpmv3_##MN##_##TN(                             \
        const uint32_t* w0, const uint8_t* s0, const float* g0, int n0, const uint32_t* w1,              \
        const uint8_t* s1, const float* g1, int n1, const uint32_t* w2, const uint8_t* s2,               \
        const float* g2, int n2, const T* x, T* y, int k) {                                              \
        pdl_enter();                                                                                     \
        fpmv3_impl<T, MODE>(w0, s0, g0, n0, w1, s1, g1, n1, w2, s2, g2, n2, x, y, k);                    \
    }
#define FPSWIGLU(MODE, MN, T, TN)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) wick_fpswiglu_##MN##_##TN(                          \
        const uint32_t* gw, const uint8_t* gs, const uint32_t* uw, const uint8_t* us, const T* x, T* y,  \
        int n, int k) {                                                                                  \
        pdl_enter();                                                                                     \
        fpswiglu_impl<T, MODE>(gw, gs, uw, us, x, y, n, k);                                              \
    }
#define FP_T(MODE, MN, T, TN)                                                                            \
    FPMV(MODE, MN, T, TN, 1) FPMV(MODE, MN, T, TN, 2) FPMV(MODE, MN, T, TN, 4) FPMV(MODE, MN, T, TN, 8) \
    GFPMV(MODE, MN, T, TN) FP_DEQ(MODE, MN, T, TN) FPMV3(MODE, MN, T, TN) FPSWIGLU(MODE, MN, T, TN)
#define FP_MODE(MODE, MN) FP_T(MODE, MN, float, f32) FP_T(MODE, MN, f16, f16) FP_T(MODE, MN, bf16, bf16)

FP_MODE(MXFP4, mxfp4)
FP_MODE(NVFP4, nvfp4)
FP_MODE(MXFP8, mxfp8)
