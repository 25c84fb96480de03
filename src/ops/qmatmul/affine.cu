// CUDA kernels of the affine quantized matmul (MLX's format: each row of W packed as one
// little-endian bit stream of `BITS`-bit codes in u32 words; per group of `gs` consecutive
// values w = scale * q + bias). Compiled to PTX by build.rs (nvcc, `cuda` feature) and loaded
// once per device; the launch code is src/ops/qmatmul/cuda.rs.
//
// The unit of work everywhere is a chunk of 32 consecutive values of one row; its unpacking and
// accumulation (y += s * (x . q) + b * sum(x) in f32, as the CPU kernels) are in
// affine_chunk.h, shared with the Metal kernels.

#include "../../backend/cuda/common.cuh"
#include "affine_chunk.h"
#include "decode_rows.cuh"

typedef __half f16;
typedef __nv_bfloat16 bf16;

// The BITS words of one chunk, with the widest aligned loads the bit width allows (a chunk
// starts at word c*BITS of a row of K*BITS/32 words, K a multiple of 32).
template <int BITS>
__device__ __forceinline__ void load_words(const uint32_t* __restrict__ p, uint32_t (&w)[BITS]) {
    if constexpr (BITS % 4 == 0) {
#pragma unroll
        for (int i = 0; i < BITS / 4; ++i) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
    } else if constexpr (BITS % 2 == 0) {
#pragma unroll
        for (int i = 0; i < BITS / 2; ++i) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
            w[2 * i] = v.x; w[2 * i + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < BITS; ++i) w[i] = __ldg(p + i);
    }
}

// All 32 codes of a chunk as floats (the shared arithmetic of affine_chunk.h).
template <int BITS>
__device__ __forceinline__ void unpack32(const uint32_t (&w)[BITS], float (&q)[32]) {
    wick_unpack32<BITS>(w, q);
}

// One output row of y (m x n) = x (m x k) . W^T for m <= MM input rows (decode and small
// batches), computed by one warp: lanes stride over the row's chunks, so each warp-wide load
// reads 32 consecutive chunks (512 contiguous bytes at 4 bits); U chunks per lane are loaded
// before any arithmetic to keep enough bytes in flight. On return every lane holds the sums.
template <typename T, int BITS, int MM>
__device__ __forceinline__ void qmv_row(const uint32_t* __restrict__ w, const T* __restrict__ scales,
                                        const T* __restrict__ biases, const T* __restrict__ x, int row,
                                        int m_rows, int k, int gs, float (&acc)[MM]) {
    const int lane = threadIdx.x % 32;
    const int chunks = k / 32;
    const uint32_t* wr = w + (size_t)row * chunks * BITS;
    const T* sr = scales + (size_t)row * (k / gs);
    const T* br = biases + (size_t)row * (k / gs);
    const int chunks_per_group = gs / 32;
    constexpr int U = BITS <= 4 ? 4 : 2;
#pragma unroll
    for (int m = 0; m < MM; ++m) acc[m] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint32_t words[U][BITS];
        float s[U], b[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                load_words<BITS>(wr + (size_t)c * BITS, words[u]);
                const int g = c / chunks_per_group;
                s[u] = to_f32(sr[g]);
                b[u] = to_f32(br[g]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                float q[32];
                unpack32<BITS>(words[u], q);
#pragma unroll
                for (int m = 0; m < MM; ++m) {
                    if (m < m_rows) {
                        float xv[32];
                        load_x32<T>(x + (size_t)m * k + (size_t)c * 32, xv);
                        float d = 0.f, sx = 0.f;
#pragma unroll
                        for (int j = 0; j < 32; ++j) {
                            d = fmaf(xv[j], q[j], d);
                            sx += xv[j];
                        }
                        acc[m] = wick_chunk_acc(acc[m], s[u], b[u], d, sx);
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

// Two rows (any two weights of the same shape family) against one input row: the decode case.
// The input chunk is loaded, converted and summed once for both rows, which halves the L1
// traffic and the per-value work that does not depend on the weight.
template <typename T, int BITS>
__device__ __forceinline__ void qmv_two_rows(const uint32_t* __restrict__ w0, const T* __restrict__ s0,
                                             const T* __restrict__ b0, const uint32_t* __restrict__ w1,
                                             const T* __restrict__ s1, const T* __restrict__ b1,
                                             const T* __restrict__ x, int k, int gs, float& acc0, float& acc1) {
    const int lane = threadIdx.x % 32;
    const int chunks = k / 32;
    const int chunks_per_group = gs / 32;
    constexpr int U = BITS <= 4 ? 2 : 1;
    acc0 = 0.f;
    acc1 = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint32_t wa[U][BITS], wb[U][BITS];
        float sa[U], ba[U], sb[U], bb[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                load_words<BITS>(w0 + (size_t)c * BITS, wa[u]);
                load_words<BITS>(w1 + (size_t)c * BITS, wb[u]);
                const int g = c / chunks_per_group;
                sa[u] = to_f32(s0[g]); ba[u] = to_f32(b0[g]);
                sb[u] = to_f32(s1[g]); bb[u] = to_f32(b1[g]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                float xv[32];
                load_x32<T>(x + (size_t)c * 32, xv);
                float sx = 0.f;
#pragma unroll
                for (int j = 0; j < 32; ++j) sx += xv[j];
                float q[32];
                unpack32<BITS>(wa[u], q);
                float d = 0.f;
#pragma unroll
                for (int j = 0; j < 32; ++j) d = fmaf(xv[j], q[j], d);
                acc0 = wick_chunk_acc(acc0, sa[u], ba[u], d, sx);
                unpack32<BITS>(wb[u], q);
                d = 0.f;
#pragma unroll
                for (int j = 0; j < 32; ++j) d = fmaf(xv[j], q[j], d);
                acc1 = wick_chunk_acc(acc1, sb[u], bb[u], d, sx);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, o);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, o);
    }
}

// The output rows one warp owns, from `row` of W (n rows): for one input row, `row` and
// `row + 1` (an odd last row is computed twice and written once), else `row` for all MM inputs.
template <typename T, int BITS, int MM>
__device__ __forceinline__ void qmv_warp_rows(const uint32_t* __restrict__ w, const T* __restrict__ scales,
                                              const T* __restrict__ biases, const T* __restrict__ x,
                                              T* __restrict__ y, int row, int m_rows, int n, int k, int gs) {
    if constexpr (MM == 1) {
        const int row1 = min(row + 1, n - 1);
        const size_t wst = (size_t)k / 32 * BITS, sst = k / gs;
        float a0, a1;
        qmv_two_rows<T, BITS>(w + row * wst, scales + row * sst, biases + row * sst, w + row1 * wst,
                              scales + row1 * sst, biases + row1 * sst, x, k, gs, a0, a1);
        if (threadIdx.x % 32 == 0) {
            y[row] = from_f32<T>(a0);
            if (row + 1 < n) y[row + 1] = from_f32<T>(a1);
        }
    } else {
        float acc[MM];
        qmv_row<T, BITS, MM>(w, scales, biases, x, row, m_rows, k, gs, acc);
        if (threadIdx.x % 32 == 0) {
#pragma unroll
            for (int m = 0; m < MM; ++m)
                if (m < m_rows) y[(size_t)m * n + row] = from_f32<T>(acc[m]);
        }
    }
}

// y = x . W^T.
template <typename T, int BITS, int MM>
__device__ __forceinline__ void qmv_impl(const uint32_t* __restrict__ w, const T* __restrict__ scales,
                                         const T* __restrict__ biases, const T* __restrict__ x,
                                         T* __restrict__ y, int m_rows, int n, int k, int gs) {
    const int row = first_row<MM>();
    if (row < n) qmv_warp_rows<T, BITS, MM>(w, scales, biases, x, y, row, m_rows, n, k, gs);
}

// Three weights that share their input (attention's q, k and v projections) in one launch:
// rows 0..n0 of the grid are W0's, then W1's, then W2's, each written to its own output. The
// launcher passes even sizes, so a warp's pair of rows never straddles two weights.
template <typename T, int BITS, int MM>
__device__ __forceinline__ void qmv3_impl(const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1,
                                          const T* s1, const T* b1, const uint32_t* w2, const T* s2,
                                          const T* b2, T* y0, T* y1, T* y2, int n0, int n1, int n2,
                                          const T* __restrict__ x, int m_rows, int k, int gs) {
    int row = first_row<MM>();
    const uint32_t* w = w0; const T* s = s0; const T* b = b0; T* y = y0; int n = n0;
    if (row >= n0) {
        row -= n0; w = w1; s = s1; b = b1; y = y1; n = n1;
        if (row >= n1) { row -= n1; w = w2; s = s2; b = b2; y = y2; n = n2; }
    }
    if (row < n) qmv_warp_rows<T, BITS, MM>(w, s, b, x, y, row, m_rows, n, k, gs);
}

// The gated MLP's first half in one launch: y = silu(x . G^T) * (x . U^T), in f32 before rounding.
template <typename T, int BITS, int MM>
__device__ __forceinline__ void qmv_swiglu_impl(const uint32_t* __restrict__ gw, const T* __restrict__ gsc,
                                                const T* __restrict__ gb, const uint32_t* __restrict__ uw,
                                                const T* __restrict__ usc, const T* __restrict__ ub,
                                                const T* __restrict__ x, T* __restrict__ y, int m_rows, int n,
                                                int k, int gs) {
    const int row = warp_row();
    if (row >= n) return;
    float g[MM], u[MM];
    if constexpr (MM == 1) {
        const size_t wst = (size_t)k / 32 * BITS, sst = k / gs;
        qmv_two_rows<T, BITS>(gw + row * wst, gsc + row * sst, gb + row * sst, uw + row * wst, usc + row * sst,
                              ub + row * sst, x, k, gs, g[0], u[0]);
    } else {
        qmv_row<T, BITS, MM>(gw, gsc, gb, x, row, m_rows, k, gs, g);
        qmv_row<T, BITS, MM>(uw, usc, ub, x, row, m_rows, k, gs, u);
    }
    if (threadIdx.x % 32 == 0) {
#pragma unroll
        for (int m = 0; m < MM; ++m)
            if (m < m_rows) y[(size_t)m * n + row] = from_f32<T>(silu_mul(g[m], u[m]));
    }
}

// One value of the dense matrix, rounded as MLX's dequantize rounds in T: round(round(s*q) + b)
// (explicit roundings: no fused multiply-add).
template <typename T>
__device__ __forceinline__ T dequant_value(float s, float q, float b) {
    return from_f32<T>(__fadd_rn(to_f32(from_f32<T>(__fmul_rn(s, q))), b));
}

// The dense matrix (n x k) in T, 32 codes per thread (any bits).
template <typename T, int BITS>
__device__ __forceinline__ void dequant_impl(const uint32_t* __restrict__ w, const T* __restrict__ scales,
                                             const T* __restrict__ biases, T* __restrict__ out, int n, int k,
                                             int gs) {
    const size_t chunks = (size_t)k / 32;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * chunks) return;
    const size_t row = idx / chunks, c = idx % chunks;
    uint32_t words[BITS];
    load_words<BITS>(w + idx * BITS, words);
    float q[32];
    unpack32<BITS>(words, q);
    const size_t g = row * (k / gs) + c * 32 / gs;
    const float s = to_f32(scales[g]), b = to_f32(biases[g]);
    T vals[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) vals[j] = dequant_value<T>(s, q[j], b);
    uint4* dst = reinterpret_cast<uint4*>(out + row * k + c * 32);
    const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
    for (int i = 0; i < 32 * (int)sizeof(T) / 16; ++i) dst[i] = src[i];
}

// The same for 4 and 8 bits, eight codes per thread (one or two words in, 16 bytes of f16 /
// bf16 out): a warp's loads and stores are each one contiguous run.
template <typename T, int BITS>
__device__ __forceinline__ void dequant8_impl(const uint32_t* __restrict__ w, const T* __restrict__ scales,
                                              const T* __restrict__ biases, T* __restrict__ out, int n, int k,
                                              int gs) {
    static_assert(BITS == 4 || BITS == 8, "eight codes per one or two words");
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // eight codes: out[idx*8 ..]
    if (idx >= (size_t)n * k / 8) return;
    const size_t g = idx * 8 / gs;  // rows are whole groups: the group index runs on across rows
    const float s = to_f32(scales[g]), b = to_f32(biases[g]);
    uint32_t words[BITS / 4];
    if constexpr (BITS == 4) {
        words[0] = w[idx];
    } else {
        const uint2 p = reinterpret_cast<const uint2*>(w)[idx];
        words[0] = p.x;
        words[1] = p.y;
    }
    T vals[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        vals[j] = dequant_value<T>(s, wick_code<BITS>(words, j), b);
    }
    uint4* dst = reinterpret_cast<uint4*>(out + idx * 8);
    const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
    for (int i = 0; i < 8 * (int)sizeof(T) / 16; ++i) dst[i] = src[i];
}

#define QMV(T, TN, BITS, MM)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) wick_qmv_##TN##_b##BITS##_m##MM(               \
        const uint32_t* w, const T* s, const T* b, const T* x, T* y, int m, int n, int k, int gs) {  \
        pdl_enter(); qmv_impl<T, BITS, MM>(w, s, b, x, y, m, n, k, gs);                                            \
    }
#define FUSED(T, TN, BITS, MM)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) wick_qmv3_##TN##_b##BITS##_m##MM(              \
        const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1, const T* s1, const T* b1,   \
        const uint32_t* w2, const T* s2, const T* b2, T* y0, T* y1, T* y2, int n0, int n1, int n2,    \
        const T* x, int m, int k, int gs) {                                                           \
        pdl_enter(); qmv3_impl<T, BITS, MM>(w0, s0, b0, w1, s1, b1, w2, s2, b2, y0, y1, y2, n0, n1, n2, x, m, k, gs); \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) wick_qmv_swiglu_##TN##_b##BITS##_m##MM(        \
        const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw, const T* usc, const T* ub, \
        const T* x, T* y, int m, int n, int k, int gs) {                                              \
        pdl_enter(); qmv_swiglu_impl<T, BITS, MM>(gw, gsc, gb, uw, usc, ub, x, y, m, n, k, gs);                    \
    }
#define DEQ(T, TN, BITS)                                                                              \
    extern "C" __global__ void wick_dequant_##TN##_b##BITS(const uint32_t* w, const T* s, const T* b, \
                                                           T* out, int n, int k, int gs) {            \
        pdl_enter();                                                                                  \
        if constexpr (BITS == 4 || BITS == 8)                                                         \
            dequant8_impl<T, BITS>(w, s, b, out, n, k, gs);                                           \
        else                                                                                          \
            dequant_impl<T, BITS>(w, s, b, out, n, k, gs);                                            \
    }
#define FOR_M(T, TN, BITS) QMV(T, TN, BITS, 1) QMV(T, TN, BITS, 2) QMV(T, TN, BITS, 4) QMV(T, TN, BITS, 8)
#define FOR_T(BITS)                                                                                   \
    FOR_M(float, f32, BITS) FOR_M(f16, f16, BITS) FOR_M(bf16, bf16, BITS)                            \
    DEQ(float, f32, BITS) DEQ(f16, f16, BITS) DEQ(bf16, bf16, BITS)
// the fused decode kernels, for the common widths (others run the three or two launches)
#define FUSED_M(T, TN, BITS) FUSED(T, TN, BITS, 1) FUSED(T, TN, BITS, 2) FUSED(T, TN, BITS, 4) FUSED(T, TN, BITS, 8)
#define FUSED_T(BITS) FUSED_M(float, f32, BITS) FUSED_M(f16, f16, BITS) FUSED_M(bf16, bf16, BITS)

FOR_T(2)
FOR_T(3)
FOR_T(4)
FOR_T(5)
FOR_T(6)
FOR_T(8)
FUSED_T(4)
FUSED_T(8)

// ---------------------------------------------------------------------------------------------
// Tensor-core kernels for few input rows (decode and decode batches, up to 32 rows), 4-bit
// codes, f16 / bf16 activations: `wick_qmt*`.
//
// A warp owns a tile of 16 output rows and, split over the block's KW warps, part of the
// groups of k. Per group the codes themselves (not dequantized values) go through
// mma.m16n8k16 as the A operand against the input rows as B (8 per n-tile), so each product
// x·q is exact and the sums are f32, as in the scalar kernels; per group and row the
// accumulator then takes  s·(x·q) + b·Σx,  Σx coming from a second mma with all-ones codes.
//
// Lane (g = lane/4, t = lane%4) holds rows g and g+8 of the tile and, of each group, the
// GS/4 consecutive codes from t·GS/4 on (one 32-, 64- or 128-bit load per row). Within an mma
// the k order is a permutation of the group's: A pair (low, high) = codes (p, p+4) of one
// word, which `(word >> 4p) & 0x000F000F` extracts in place, and the input's B pairs are
// permuted the same way (PRMT). A code becomes an f16/bf16 by OR-ing it into the mantissa of
// a power of two (1024 / 128); f16 subtracts it again, bf16 leaves it in and takes
// OFFSET·s·Σx off the bias term (exact math; the rounding stays far below bf16's).
// ---------------------------------------------------------------------------------------------

template <typename T> struct QmtType;
template <> struct QmtType<bf16> : MmaType<bf16> {
    static constexpr uint32_t MAGIC = 0x43004300u;  // 128.0 in both halves: 128 + q exact for q < 128
    static constexpr uint32_t ONES = 0x3F803F80u;
    static constexpr float OFFSET = 128.f;
    static constexpr float MAGIC_VALUE = 128.f;
    static __device__ __forceinline__ uint32_t pair(uint32_t v) { return v | MAGIC; }
};
template <> struct QmtType<f16> : MmaType<f16> {
    static constexpr uint32_t MAGIC = 0x64006400u;  // 1024.0 in both halves
    static constexpr uint32_t ONES = 0x3C003C00u;
    static constexpr float OFFSET = 0.f;
    static constexpr float MAGIC_VALUE = 1024.f;
    static __device__ __forceinline__ uint32_t pair(uint32_t v) {
        v |= MAGIC;
        __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&v), __half2half2(__ushort_as_half(0x6400)));
        return *reinterpret_cast<uint32_t*>(&h);
    }
};

// The tile's f32 accumulators for NW weights of the same shape (rows row0 .. row0+16) against
// the NT·8 input rows of x (rows >= m read as zeros), over this warp's groups of k: warp w of
// the block's KW takes groups w, w + KW, ..., so that the block's loads of one moment lie close
// together in each row (contiguous ranges per warp, or per block with k split between blocks,
// measured slower on the H100).
// Lane layout as in the comment above: acc[w][nt][i] is row g + 8·(i/2), input nt·8 + 2t + i%2.
template <typename T, int GS, int NT, int NW, int KW>
__device__ __forceinline__ void qmt_tile(const uint32_t* const (&w)[NW], const T* const (&sc)[NW],
                                         const T* const (&bi)[NW], const T* __restrict__ x, int m, int n,
                                         int k, int row0, float (&acc)[NW][NT][4]) {
    using Q = QmtType<T>;
    constexpr int WPL = GS / 32;      // words per lane per row and group (one load_words load)
    constexpr int CPL = GS / 4;       // codes per lane per group
    constexpr int UG = 8 / WPL > 4 ? 4 : 8 / WPL;  // groups whose loads are issued together
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, warp = threadIdx.x / 32;
    const int groups = k / GS;
    const int ra = min(row0 + g, n - 1), rb = min(row0 + g + 8, n - 1);
    const size_t wrow = (size_t)k / 8;  // words per row
#pragma unroll
    for (int v = 0; v < NW; ++v)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[v][j][i] = 0.f;
    const uint32_t ones[4] = {Q::ONES, Q::ONES, Q::ONES, Q::ONES};
    pdl_launch_dependents();
    bool waited = false;  // the first groups' weights load before the wait (common.cuh)
    for (int g0 = warp; g0 < groups; g0 += KW * UG) {
        uint32_t wa[UG][NW][WPL], wb[UG][NW][WPL];
        float sa[UG][NW], sb[UG][NW], ba[UG][NW], bb[UG][NW];
#pragma unroll
        for (int u = 0; u < UG; ++u) {
            const int gi = g0 + u * KW;
            if (gi < groups) {
                const size_t off = (size_t)gi * (GS / 8) + t * WPL;
#pragma unroll
                for (int v = 0; v < NW; ++v) {
                    load_words<WPL>(w[v] + ra * wrow + off, wa[u][v]);
                    load_words<WPL>(w[v] + rb * wrow + off, wb[u][v]);
                    sa[u][v] = to_f32(sc[v][(size_t)ra * groups + gi]);
                    sb[u][v] = to_f32(sc[v][(size_t)rb * groups + gi]);
                    ba[u][v] = to_f32(bi[v][(size_t)ra * groups + gi]);
                    bb[u][v] = to_f32(bi[v][(size_t)rb * groups + gi]);
                }
            }
        }
        if (!waited) {
            pdl_wait();
            waited = true;
        }
#pragma unroll
        for (int u = 0; u < UG; ++u) {
            const int gi = g0 + u * KW;
            if (gi >= groups) break;
            // this lane's input values of the group, for each n-tile, as bf16/f16 pairs
            uint32_t xw[NT][CPL / 2];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int row = j * 8 + g;
                if (row < m) {
                    const uint4* p = reinterpret_cast<const uint4*>(x + (size_t)row * k + (size_t)gi * GS + t * CPL);
#pragma unroll
                    for (int q = 0; q < CPL / 8; ++q) {
                        const uint4 v = load_after_wait(p + q);
                        xw[j][4 * q] = v.x; xw[j][4 * q + 1] = v.y; xw[j][4 * q + 2] = v.z; xw[j][4 * q + 3] = v.w;
                    }
                } else {
#pragma unroll
                    for (int q = 0; q < CPL / 2; ++q) xw[j][q] = 0u;
                }
            }
            float d[NW][NT][4], s[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    s[j][i] = 0.f;
#pragma unroll
                    for (int v = 0; v < NW; ++v) d[v][j][i] = 0.f;
                }
#pragma unroll
            for (int wi = 0; wi < WPL; ++wi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint32_t a[NW][4];
#pragma unroll
                    for (int v = 0; v < NW; ++v) {
                        a[v][0] = Q::pair((wa[u][v][wi] >> (8 * h)) & 0x000F000Fu);
                        a[v][1] = Q::pair((wb[u][v][wi] >> (8 * h)) & 0x000F000Fu);
                        a[v][2] = Q::pair((wa[u][v][wi] >> (8 * h + 4)) & 0x000F000Fu);
                        a[v][3] = Q::pair((wb[u][v][wi] >> (8 * h + 4)) & 0x000F000Fu);
                    }
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const uint32_t lo = xw[j][4 * wi + h], hi = xw[j][4 * wi + 2 + h];
                        const uint32_t b0 = __byte_perm(lo, hi, 0x5410), b1 = __byte_perm(lo, hi, 0x7632);
#pragma unroll
                        for (int v = 0; v < NW; ++v) Q::mma(d[v][j], a[v], b0, b1);
                        Q::mma(s[j], ones, b0, b1);
                    }
                }
            }
#pragma unroll
            for (int v = 0; v < NW; ++v)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float sv = i < 2 ? sa[u][v] : sb[u][v], bv = i < 2 ? ba[u][v] : bb[u][v];
                        acc[v][j][i] = fmaf(sv, d[v][j][i], fmaf(bv - Q::OFFSET * sv, s[j][i], acc[v][j][i]));
                    }
        }
    }
    if (!waited) pdl_wait();  // a warp without groups still waits before the block writes
}

// Sums the block's warps' accumulators (each holds its share of the groups) into warp 0's.
// Returns true in warp 0, whose acc then holds the totals.
template <int NT, int NW, int KW>
__device__ __forceinline__ bool qmt_reduce(float (&acc)[NW][NT][4]) {
    __shared__ float red[KW - 1][NW * NT * 4][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (warp > 0) {
#pragma unroll
        for (int v = 0; v < NW; ++v)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) red[warp - 1][(v * NT + j) * 4 + i][lane] = acc[v][j][i];
    }
    __syncthreads();
    if (warp > 0) return false;
#pragma unroll
    for (int r = 0; r < KW - 1; ++r)
#pragma unroll
        for (int v = 0; v < NW; ++v)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[v][j][i] += red[r][(v * NT + j) * 4 + i][lane];
    return true;
}

// Where acc[..][j][i] goes: output row (of W) and input row (of x).
__device__ __forceinline__ int qmt_out_row(int row0, int i) { return row0 + (threadIdx.x % 32) / 4 + 8 * (i / 2); }
__device__ __forceinline__ int qmt_in_row(int j, int i) { return j * 8 + 2 * (threadIdx.x % 4) + i % 2; }

template <typename T, int NT>
__device__ __forceinline__ void qmt_store(const float (&acc)[NT][4], T* __restrict__ y, int row0, int m, int n) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = qmt_out_row(row0, i), xr = qmt_in_row(j, i);
            if (r < n && xr < m) y[(size_t)xr * n + r] = from_f32<T>(acc[j][i]);
        }
}

// One weight's tile from row0 on: y (m × n) = x (m × k) · Wᵀ for those rows.
template <typename T, int GS, int NT, int KW>
__device__ __forceinline__ void qmt_one(const uint32_t* w, const T* s, const T* b, const T* x, T* y, int m, int n,
                                        int k, int row0) {
    float acc[1][NT][4];
    const uint32_t* const ws[1] = {w};
    const T* const ss[1] = {s};
    const T* const bs[1] = {b};
    qmt_tile<T, GS, NT, 1, KW>(ws, ss, bs, x, m, n, k, row0, acc);
    if (qmt_reduce<NT, 1, KW>(acc)) qmt_store<T, NT>(acc[0], y, row0, m, n);
}

// Of three weights sharing the input (q, k, v), the one this block's tile of 16 rows belongs
// to: the first ceil(n0/16) tiles are W0's, then W1's, W2's.
template <typename T>
struct ThreeTiles {
    const uint32_t* w; const T* s; const T* b; T* y; int n; int tile;
    __device__ __forceinline__ ThreeTiles(const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1, const T* s1,
                                          const T* b1, const uint32_t* w2, const T* s2, const T* b2, T* y0, T* y1,
                                          T* y2, int n0, int n1, int n2)
        : w(w0), s(s0), b(b0), y(y0), n(n0), tile(blockIdx.x) {
        const int t0 = (n0 + 15) / 16, t1 = (n1 + 15) / 16;
        if (tile >= t0) {
            tile -= t0; w = w1; s = s1; b = b1; y = y1; n = n1;
            if (tile >= t1) { tile -= t1; w = w2; s = s2; b = b2; y = y2; n = n2; }
        }
    }
};

// Three weights sharing the input (q, k, v): the first ceil(n0/16) tiles are W0's, then W1's, W2's.
template <typename T, int GS, int NT, int KW>
__device__ __forceinline__ void qmt3_impl(const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1,
                                          const T* s1, const T* b1, const uint32_t* w2, const T* s2, const T* b2,
                                          T* y0, T* y1, T* y2, int n0, int n1, int n2, const T* x, int m, int k) {
    const ThreeTiles<T> o(w0, s0, b0, w1, s1, b1, w2, s2, b2, y0, y1, y2, n0, n1, n2);
    qmt_one<T, GS, NT, KW>(o.w, o.s, o.b, x, o.y, m, o.n, k, o.tile * 16);
}

// y = silu(x · Gᵀ) * (x · Uᵀ), both tiles from the same input fragments.
template <typename T, int GS, int NT, int KW>
__device__ __forceinline__ void qmt_swiglu_impl(const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw,
                                                const T* usc, const T* ub, const T* x, T* y, int m, int n, int k) {
    const int row0 = blockIdx.x * 16;
    float acc[2][NT][4];
    const uint32_t* const ws[2] = {gw, uw};
    const T* const ss[2] = {gsc, usc};
    const T* const bs[2] = {gb, ub};
    qmt_tile<T, GS, NT, 2, KW>(ws, ss, bs, x, m, n, k, row0, acc);
    if (!qmt_reduce<NT, 2, KW>(acc)) return;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[0][j][i] = silu_mul(acc[0][j][i], acc[1][j][i]);
    qmt_store<T, NT>(acc[0], y, row0, m, n);
}

#define QMT(T, TN, GS, NT, KW)                                                                              \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qmt_##TN##_g##GS##_n##NT##_w##KW(           \
        const uint32_t* w, const T* s, const T* b, const T* x, T* y, int m, int n, int k) {                \
        qmt_one<T, GS, NT, KW>(w, s, b, x, y, m, n, k, blockIdx.x * 16);                                    \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qmt3_##TN##_g##GS##_n##NT##_w##KW(          \
        const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1, const T* s1, const T* b1,         \
        const uint32_t* w2, const T* s2, const T* b2, T* y0, T* y1, T* y2, int n0, int n1, int n2,          \
        const T* x, int m, int k) {                                                                         \
        qmt3_impl<T, GS, NT, KW>(w0, s0, b0, w1, s1, b1, w2, s2, b2, y0, y1, y2, n0, n1, n2, x, m, k);      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qmt_swiglu_##TN##_g##GS##_n##NT##_w##KW(    \
        const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw, const T* usc, const T* ub,       \
        const T* x, T* y, int m, int n, int k) {                                                            \
        qmt_swiglu_impl<T, GS, NT, KW>(gw, gsc, gb, uw, usc, ub, x, y, m, n, k);                            \
    }
#define QMT_N(T, TN, GS, KW) QMT(T, TN, GS, 1, KW) QMT(T, TN, GS, 2, KW) QMT(T, TN, GS, 3, KW) QMT(T, TN, GS, 4, KW)
#define QMT_G(T, TN, KW) QMT_N(T, TN, 32, KW) QMT_N(T, TN, 64, KW) QMT_N(T, TN, 128, KW)
// KW (warps per block sharing a tile's k): 4 for layers with many tiles, 8 for few (see cuda.rs)
QMT_G(bf16, bf16, 4)
QMT_G(bf16, bf16, 8)
QMT_G(f16, f16, 4)
QMT_G(f16, f16, 8)

// ---------------------------------------------------------------------------------------------
// One input row (the decode step at batch 1), 4-bit codes, f16 / bf16: `wick_qm1*`, the codes
// through the tensor cores with the B operand's eight columns used as "slots".
//
// A block owns a tile of 16 output rows; its KW warps share k by segments of 128 codes (64
// bytes per row): warp w takes segments w, w + KW, ... In a segment lane (g = lane/4,
// t = lane%4) loads 16 bytes of rows g and g+8, codes 32t .. 32t+31 of the segment (slot t),
// and supplies the input only to column t of B (the lanes with g == t; the others give zeros).
// One mma.m16n8k16 then sums, per row, four codes of each slot into that slot's column, and the
// segment's eight mmas leave in columns 0..3 the four 32-code dot products x·q of each row, each
// times its own group's scale afterwards (lanes t = 0, 1 hold columns 0..3). Σx per slot comes
// from an all-ones mma on the same input fragments. Codes become f16/bf16 as MAGIC_VALUE + q
// (OR-ed into the mantissa, nothing subtracted): the accumulator takes s·(x·(M+q)) + (b − M·s)·Σx.
// Against the scalar kernel (three instructions per code) this spends under one, so the warps
// need fewer cycles between their loads; the launcher picks KW so that a layer runs about 3,000
// warps (see cuda.rs), one segment per warp in flight.
// ---------------------------------------------------------------------------------------------

// The deferred norm's partial sums of squares (see `qm1_res_impl`): at most this many, a
// multiple of 4, copied by warp 0 into shared memory while the block's matmul runs.
constexpr int SQ_MAX = 512;
// Warp 0 starts the copy of n parts into shared memory (16 bytes per lane and copy: cp.async,
// no registers held and nothing waits for it until `sum_squares_parts`).
__device__ __forceinline__ void copy_squares_parts(float* dst, const float* p, int n) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < SQ_MAX / 128; ++j) {
        const int i = 4 * (lane + 32 * j);
        if (i < n) {
            const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst + i));
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(p + i) : "memory");
        }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}
// Their sum, in a fixed order (lane's parts 4i .. 4i+3 of each 128, then the warp's
// butterfly), on every lane of warp 0.
__device__ __forceinline__ float sum_squares_parts(const float* src, int n) {
    asm volatile("cp.async.wait_all;" ::: "memory");
    const int lane = threadIdx.x % 32;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < SQ_MAX / 128; ++j) {
        const int i = 4 * (lane + 32 * j);
        if (i < n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s += src[i + e];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, 32);
    return s;
}

// A consumer's view of the deferred norm (see `qm1_res_impl`): the `n` partial sums of squares
// at `p` and the norm's eps.
struct SqIn {
    const float* p;
    int n;
    float eps;
};

// (a & m) | c in one LOP3: the compiler folds at most one immediate into a LOP3, so a code
// fragment written as (a & MASK) | MAGIC with both constants costs two; with m and c in
// registers it is one.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t m, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(m), "r"(c));
    return d;
}

// The tile's sums for NW weights of the same shape (rows row0 .. row0+16): on return thread i
// < 16 of the block holds row row0 + i of weight v in acc[v][0]. The loop is written for a short
// instruction stream (the kernel is bound by each warp's latency between its loads, and every
// instruction of a segment lengthens it): row, scale and input pointers are set once, each
// code fragment is one LOP3 (plus a shift for three of a word's four), and a warp keeps one
// segment in flight, which measured faster than two (fewer registers, more warps per SM).
//
// With SQ the input is a deferred norm's u (see `qm1_res_impl`): warp 0 also sums its partial
// sums of squares `sq` (copied after the wait, added after the loop) and the sums returned are
// scaled by the norm's rsqrt(mean + eps).
template <typename T, int GS, int KW, int NW, bool SQ = false>
__device__ __forceinline__ void qm1_tile(const uint32_t* const (&w)[NW], const T* const (&sc)[NW],
                                         const T* const (&bi)[NW], const T* __restrict__ x, int n, int k, int row0,
                                         float (&acc)[NW][2], SqIn sq = {}) {
    using Q = QmtType<T>;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, warp = threadIdx.x / 32;
    const int segs = k / 128, groups = k / GS;
    const int ra = min(row0 + g, n - 1), rb = min(row0 + g + 8, n - 1);
    constexpr int C = GS == 32 ? 2 : 1;  // groups per lane and segment (lanes t = 0, 1)
    constexpr int GPS = 128 / GS;        // groups per segment
    // per weight: the lane's 16 bytes of rows ra and rb (uint4 seg·4 + t) and its first group's
    // scale and bias in each row (group seg·GPS + c of the row from there)
    const uint4* pa[NW];
    const uint4* pb[NW];
    const T* qa[NW];
    const T* qb[NW];
    const T* ca[NW];
    const T* cb[NW];
    const int g0 = t < 2 ? 2 * t * 32 / GS : 0;
#pragma unroll
    for (int v = 0; v < NW; ++v) {
        pa[v] = reinterpret_cast<const uint4*>(w[v] + (size_t)ra * (k / 8)) + t;
        pb[v] = reinterpret_cast<const uint4*>(w[v] + (size_t)rb * (k / 8)) + t;
        qa[v] = sc[v] + (size_t)ra * groups + g0;
        qb[v] = sc[v] + (size_t)rb * groups + g0;
        ca[v] = bi[v] + (size_t)ra * groups + g0;
        cb[v] = bi[v] + (size_t)rb * groups + g0;
        acc[v][0] = acc[v][1] = 0.f;
    }
    const uint4* px = reinterpret_cast<const uint4*>(x) + 4 * t;  // slot t's 32 inputs of a segment
    uint32_t mask = 0x000F000Fu, magic = Q::MAGIC;
    asm volatile("" : "+r"(mask), "+r"(magic));  // kept in registers (see and_or)
    pdl_launch_dependents();
    bool waited = false;  // the first segment's weights load before the wait (common.cuh)
    __shared__ __align__(16) float sq_parts[SQ ? SQ_MAX : 4];
    for (int seg = warp; seg < segs; seg += KW) {
        uint4 wa[NW], wb[NW];
        float sa[NW][C], sb[NW][C], ba[NW][C], bb[NW][C];
#pragma unroll
        for (int v = 0; v < NW; ++v) {
            wa[v] = load_weights(pa[v] + seg * 4);
            wb[v] = load_weights(pb[v] + seg * 4);
#pragma unroll
            for (int c = 0; c < C; ++c) {
                sa[v][c] = sb[v][c] = ba[v][c] = bb[v][c] = 0.f;
                if (t < 2) {
                    const int gi = seg * GPS + c;
                    sa[v][c] = to_f32(qa[v][gi]);
                    sb[v][c] = to_f32(qb[v][gi]);
                    ba[v][c] = to_f32(ca[v][gi]);
                    bb[v][c] = to_f32(cb[v][gi]);
                }
            }
        }
        if (!waited) {
            pdl_wait();
            waited = true;
            if (SQ && warp == 0) copy_squares_parts(sq_parts, sq.p, sq.n);
        }
        // the B pairs of the segment's eight mmas from the input of slot t (lanes g == t; zeros
        // elsewhere): mma 2·wi + h takes codes (p, p+4) and (p+1, p+5), p = 2h, of word wi, so
        // the input pairs are permuted the same way (PRMT)
        uint32_t xb[8][2];
        {
            uint4 xv[4];
#pragma unroll
            for (int wi = 0; wi < 4; ++wi) xv[wi] = g == t ? load_after_wait(px + seg * 16 + wi) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int wi = 0; wi < 4; ++wi) {
                xb[2 * wi][0] = __byte_perm(xv[wi].x, xv[wi].z, 0x5410);
                xb[2 * wi][1] = __byte_perm(xv[wi].x, xv[wi].z, 0x7632);
                xb[2 * wi + 1][0] = __byte_perm(xv[wi].y, xv[wi].w, 0x5410);
                xb[2 * wi + 1][1] = __byte_perm(xv[wi].y, xv[wi].w, 0x7632);
            }
        }
        float sx[4] = {0.f, 0.f, 0.f, 0.f};
        const uint32_t ones[4] = {Q::ONES, Q::ONES, Q::ONES, Q::ONES};
#pragma unroll
        for (int i = 0; i < 8; ++i) Q::mma(sx, ones, xb[i][0], xb[i][1]);
#pragma unroll
        for (int v = 0; v < NW; ++v) {
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            const uint32_t A[4] = {wa[v].x, wa[v].y, wa[v].z, wa[v].w};
            const uint32_t B[4] = {wb[v].x, wb[v].y, wb[v].z, wb[v].w};
#pragma unroll
            for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t frag[4] = {and_or(A[wi] >> (8 * h), mask, magic), and_or(B[wi] >> (8 * h), mask, magic),
                                              and_or(A[wi] >> (8 * h + 4), mask, magic),
                                              and_or(B[wi] >> (8 * h + 4), mask, magic)};
                    Q::mma(d, frag, xb[2 * wi + h][0], xb[2 * wi + h][1]);
                }
            }
            // columns 2t and 2t+1 (t < 2): chunks seg·4 + 2t (+1), rows g (d0, d1), g+8 (d2, d3)
            constexpr float M = Q::MAGIC_VALUE;
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int ci = C == 2 ? c : 0;
                acc[v][0] = fmaf(sa[v][ci], d[c], fmaf(ba[v][ci] - M * sa[v][ci], sx[c], acc[v][0]));
                acc[v][1] = fmaf(sb[v][ci], d[2 + c], fmaf(bb[v][ci] - M * sb[v][ci], sx[2 + c], acc[v][1]));
            }
        }
    }
    if (!waited) pdl_wait();  // a warp without segments still waits before the block writes
    float total = 0.f;
    if (SQ && warp == 0) total = sum_squares_parts(sq_parts, sq.n);
    // lanes t = 0, 1 hold rows g and g+8 (t >= 2 zeros): the four lanes of a row, then the warps
    __shared__ float red[KW][NW][16];
#pragma unroll
    for (int v = 0; v < NW; ++v)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            acc[v][r] += __shfl_xor_sync(0xffffffffu, acc[v][r], 1);
            acc[v][r] += __shfl_xor_sync(0xffffffffu, acc[v][r], 2);
            if (t == 0) red[warp][v][g + 8 * r] = acc[v][r];
        }
    __syncthreads();
    if (threadIdx.x < 16) {
#pragma unroll
        for (int v = 0; v < NW; ++v) {
            float s = 0.f;
#pragma unroll
            for (int q = 0; q < KW; ++q) s += red[q][v][threadIdx.x];
            acc[v][0] = SQ ? rsqrtf(total / k + sq.eps) * s : s;
        }
    }
}

// One weight's tile: thread i < 16 of the block returns row row0 + i's sum (see `qm1_tile`).
template <typename T, int GS, int KW, bool SQ = false>
__device__ __forceinline__ float qm1_tile_one(const uint32_t* w, const T* s, const T* b, const T* x, int n, int k,
                                              int row0, SqIn sq = {}) {
    float acc[1][2];
    const uint32_t* const ws[1] = {w};
    const T* const ss[1] = {s};
    const T* const bs[1] = {b};
    qm1_tile<T, GS, KW, 1, SQ>(ws, ss, bs, x, n, k, row0, acc, sq);
    return acc[0][0];
}

template <typename T, int GS, int KW, bool SQ = false>
__device__ __forceinline__ void qm1_one(const uint32_t* w, const T* s, const T* b, const T* x, T* y, int n, int k,
                                        int row0, SqIn sq = {}) {
    const float v = qm1_tile_one<T, GS, KW, SQ>(w, s, b, x, n, k, row0, sq);
    const int r = row0 + threadIdx.x;
    if (threadIdx.x < 16 && r < n) y[r] = from_f32<T>(v);
}

// q, k and v: the first ceil(n0/16) tiles are W0's, then W1's, W2's.
template <typename T, int GS, int KW, bool SQ = false>
__device__ __forceinline__ void qm13_impl(const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1,
                                          const T* s1, const T* b1, const uint32_t* w2, const T* s2, const T* b2,
                                          T* y0, T* y1, T* y2, int n0, int n1, int n2, const T* x, int k,
                                          SqIn sq = {}) {
    const ThreeTiles<T> o(w0, s0, b0, w1, s1, b1, w2, s2, b2, y0, y1, y2, n0, n1, n2);
    qm1_one<T, GS, KW, SQ>(o.w, o.s, o.b, x, o.y, o.n, k, o.tile * 16, sq);
}

template <typename T, int GS, int KW, bool SQ = false>
__device__ __forceinline__ void qm1_swiglu_impl(const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw,
                                                const T* usc, const T* ub, const T* x, T* y, int n, int k,
                                                SqIn sq = {}) {
    const int row0 = blockIdx.x * 16;
    float acc[2][2];
    const uint32_t* const ws[2] = {gw, uw};
    const T* const ss[2] = {gsc, usc};
    const T* const bs[2] = {gb, ub};
    qm1_tile<T, GS, KW, 2, SQ>(ws, ss, bs, x, n, k, row0, acc, sq);
    const int r = row0 + threadIdx.x;
    if (threadIdx.x < 16 && r < n) y[r] = from_f32<T>(silu_mul(acc[0][0], acc[1][0]));
}

// The deferred RMSNorm of the decode step (one row of d = n values): the o and down
// projections finish the residual add, h = y + r (in T, as candle's add), and hand the next
// matmul u = T(h · w) (the norm's weight w) and per tile the sum of h² over its 16 rows (f32,
// `sq[tile]`); the next matmul (q/k/v, gate/up: `wick_qm13n`, `wick_qm1_swiglun`, `qm1_tile`
// with SQ) takes u as its input and scales its sums by rsqrt(Σ sq / d + eps): W·(s·(h ⊙ w)) =
// s·(W·(h ⊙ w)). This saves the add + RMSNorm launch between them (its wait for the whole
// matmul and the next one's for it); against n = T(s·h·w) then W·n it differs by the rounding
// of u (and the order of the sum).
template <typename T, int GS, int KW>
__device__ __forceinline__ void qm1_res_impl(const uint32_t* w, const T* s, const T* b, const T* x, const T* r,
                                             const T* nw, T* h, T* u, float* sq, int n, int k) {
    const int row0 = blockIdx.x * 16;
    const float y = qm1_tile_one<T, GS, KW>(w, s, b, x, n, k, row0);
    if (threadIdx.x < 16) {
        const int row = row0 + threadIdx.x;
        float v = 0.f;
        if (row < n) {
            const T hv = add_t(from_f32<T>(y), elem_after_wait(r + row));
            h[row] = hv;
            v = to_f32(hv);
            u[row] = from_f32<T>(v * to_f32(nw[row]));
        }
        float q = v * v;
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) q += __shfl_xor_sync(0x0000ffffu, q, o, 16);
        if (threadIdx.x == 0) sq[blockIdx.x] = q;
    }
}

#define QM1(T, TN, GS, KW)                                                                               \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qm1_##TN##_g##GS##_w##KW(                    \
        const uint32_t* w, const T* s, const T* b, const T* x, T* y, int n, int k) {                        \
        qm1_one<T, GS, KW>(w, s, b, x, y, n, k, blockIdx.x * 16);                                        \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qm13_##TN##_g##GS##_w##KW(                   \
        const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1, const T* s1, const T* b1,         \
        const uint32_t* w2, const T* s2, const T* b2, T* y0, T* y1, T* y2, int n0, int n1, int n2,          \
        const T* x, int k) {                                                                                \
        qm13_impl<T, GS, KW>(w0, s0, b0, w1, s1, b1, w2, s2, b2, y0, y1, y2, n0, n1, n2, x, k);          \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qm1_swiglu_##TN##_g##GS##_w##KW(             \
        const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw, const T* usc, const T* ub,       \
        const T* x, T* y, int n, int k) {                                                                   \
        qm1_swiglu_impl<T, GS, KW>(gw, gsc, gb, uw, usc, ub, x, y, n, k);                                \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qm1_res_##TN##_g##GS##_w##KW(                \
        const uint32_t* w, const T* s, const T* b, const T* x, const T* r, const T* nw, T* h, T* u,          \
        float* sq, int n, int k) {                                                                          \
        qm1_res_impl<T, GS, KW>(w, s, b, x, r, nw, h, u, sq, n, k);                                         \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qm13n_##TN##_g##GS##_w##KW(                  \
        const uint32_t* w0, const T* s0, const T* b0, const uint32_t* w1, const T* s1, const T* b1,         \
        const uint32_t* w2, const T* s2, const T* b2, T* y0, T* y1, T* y2, int n0, int n1, int n2,          \
        const T* u, const float* sq, int nsq, int k, float eps) {                                           \
        qm13_impl<T, GS, KW, true>(w0, s0, b0, w1, s1, b1, w2, s2, b2, y0, y1, y2, n0, n1, n2, u, k, {sq, nsq, eps}); \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_qm1_swiglun_##TN##_g##GS##_w##KW(            \
        const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw, const T* usc, const T* ub,       \
        const T* u, const float* sq, int nsq, T* y, int n, int k, float eps) {                              \
        qm1_swiglu_impl<T, GS, KW, true>(gw, gsc, gb, uw, usc, ub, u, y, n, k, {sq, nsq, eps});            \
    }
// KW warps per tile (the launcher's choice: cuda.rs `qm1_launch`)
#define QM1_W(T, TN, GS) QM1(T, TN, GS, 4) QM1(T, TN, GS, 8) QM1(T, TN, GS, 16)
#define QM1_G(T, TN) QM1_W(T, TN, 32) QM1_W(T, TN, 64) QM1_W(T, TN, 128)
QM1_G(bf16, bf16)
QM1_G(f16, f16)

// ---------------------------------------------------------------------------------------------
// Gathered forms (mixture-of-experts layers, mlx's `gather_qmm`), launched by
// src/ops/gather_mm/cuda.rs: the weights of E experts are stacked (expert e's packed codes at
// w + e·ew words, its scales and biases at + e·es values), and routed row r = blockIdx.y
// multiplies input row r / xdiv (a token's row serves its xdiv chosen experts, or xdiv = 1: one
// input row per routed row) by expert ids[r]'s weight into output row r. The ids come from the
// router's kernels on the device, so a block waits for the kernel ahead before it knows which
// weights to read; nothing goes through the host, and a decode step with experts is captured
// as a graph like a dense one. Each routed row reads its expert's weights (the decode case:
// few rows, mostly distinct experts); prefill groups its rows by expert instead (gather_mm).
// ---------------------------------------------------------------------------------------------

struct Gather {
    const uint32_t* ids;
    long long ew, es;
    int xdiv;
};

// The expert of this block's routed row, read after the wait (the router wrote it).
__device__ __forceinline__ size_t gathered_expert(const uint32_t* ids) {
    pdl_launch_dependents();
    pdl_wait();
    return elem_after_wait(ids + blockIdx.y);
}
// The routing arguments of every gathered kernel, and its routed row r and expert e.
#define GATHER_ARGS const uint32_t *ids, long long ew, long long es, int xdiv
#define GATHER_ROW                                             \
    const Gather gt{ids, ew, es, xdiv};                        \
    const size_t e = gathered_expert(ids), r = blockIdx.y

#define GATHERED_QMV(T, TN, BITS)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) wick_gqmv_##TN##_b##BITS(                              \
        const uint32_t* w, const T* s, const T* b, GATHER_ARGS, const T* x, T* y, int n, int k, int gs) {       \
        GATHER_ROW;                                                 \
        qmv_impl<T, BITS, 1>(w + e * gt.ew, s + e * gt.es, b + e * gt.es, x + r / gt.xdiv * k, y + r * n, 1, \
                             n, k, gs);                                                                       \
    }
#define GATHERED_QMV_SWIGLU(T, TN, BITS)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) wick_gqmv_swiglu_##TN##_b##BITS(                       \
        const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw, const T* usc, const T* ub,         \
        GATHER_ARGS, const T* x, T* y, int n, int k, int gs) {                                                  \
        GATHER_ROW;                                                 \
        qmv_swiglu_impl<T, BITS, 1>(gw + e * gt.ew, gsc + e * gt.es, gb + e * gt.es, uw + e * gt.ew,         \
                                    usc + e * gt.es, ub + e * gt.es, x + r / gt.xdiv * k, y + r * n, 1, n, k, \
                                    gs);                                                                      \
    }
#define GATHERED_QMV_T(BITS) \
    GATHERED_QMV(float, f32, BITS) GATHERED_QMV(f16, f16, BITS) GATHERED_QMV(bf16, bf16, BITS)
#define GATHERED_QMV_SWIGLU_T(BITS) \
    GATHERED_QMV_SWIGLU(float, f32, BITS) GATHERED_QMV_SWIGLU(f16, f16, BITS) GATHERED_QMV_SWIGLU(bf16, bf16, BITS)
GATHERED_QMV_T(2)
GATHERED_QMV_T(3)
GATHERED_QMV_T(4)
GATHERED_QMV_T(5)
GATHERED_QMV_T(6)
GATHERED_QMV_T(8)
GATHERED_QMV_SWIGLU_T(4)
GATHERED_QMV_SWIGLU_T(8)

// The one-row tensor-core kernels (`wick_qm1*`) gathered: 4-bit codes, f16 / bf16, k a multiple
// of 128; blockIdx.x is the tile of 16 output rows as there.
#define GATHERED_QM1(T, TN, GS, KW)                                                                           \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_gqm1_##TN##_g##GS##_w##KW(                    \
        const uint32_t* w, const T* s, const T* b, GATHER_ARGS, const T* x, T* y, int n, int k) {               \
        GATHER_ROW;                                                 \
        qm1_one<T, GS, KW>(w + e * gt.ew, s + e * gt.es, b + e * gt.es, x + r / gt.xdiv * k, y + r * n, n, k, \
                           blockIdx.x * 16);                                                                  \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(KW * 32) wick_gqm1_swiglu_##TN##_g##GS##_w##KW(             \
        const uint32_t* gw, const T* gsc, const T* gb, const uint32_t* uw, const T* usc, const T* ub,         \
        GATHER_ARGS, const T* x, T* y, int n, int k) {                                                          \
        GATHER_ROW;                                                 \
        qm1_swiglu_impl<T, GS, KW>(gw + e * gt.ew, gsc + e * gt.es, gb + e * gt.es, uw + e * gt.ew,           \
                                   usc + e * gt.es, ub + e * gt.es, x + r / gt.xdiv * k, y + r * n, n, k);    \
    }
#define GATHERED_QM1_W(T, TN, GS) GATHERED_QM1(T, TN, GS, 4) GATHERED_QM1(T, TN, GS, 8) GATHERED_QM1(T, TN, GS, 16)
#define GATHERED_QM1_G(T, TN) GATHERED_QM1_W(T, TN, 32) GATHERED_QM1_W(T, TN, 64) GATHERED_QM1_W(T, TN, 128)
GATHERED_QM1_G(bf16, bf16)
GATHERED_QM1_G(f16, f16)
