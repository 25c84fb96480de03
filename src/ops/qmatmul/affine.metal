// Metal kernels of the affine quantized matmul, compiled by Metal at run time (src/backend/metal.rs)
// from this source with ../affine_chunk.h prepended: the unpacking and the per-chunk
// accumulation are the CUDA kernels' (and the CPU kernels') arithmetic. Launch code:
// src/ops/qmatmul/metal.rs. This file has never been compiled on this project's machines (no Mac);
// see docs/metal.md.
//
// Kernels, each instantiated for T in {float, half, bfloat} and BITS in {2, 3, 4, 5, 6, 8}:
//   wick_qmv_<T>_b<BITS>     y (m x n) = x (m x k) . W^T for m <= 8 (decode): one SIMD group
//                            per output row, lanes stride over 32-value chunks, simd_sum;
//   wick_qmm_<T>_b<BITS>     the same for any m (prefill): 32 x 32 output tiles, one chunk of
//                            k per step, codes and inputs staged in threadgroup memory;
//   wick_dequant_<T>_b<BITS> the dense matrix, rounded as mx.dequantize: round(round(s*q) + b).

#include <metal_stdlib>
using namespace metal;

struct WickDims {
    int m;   // input rows
    int n;   // output features (rows of W)
    int k;   // input features
    int gs;  // group size
};

enum : int {
    QMV_MAX_ROWS = 8,
    QMV_SIMDGROUPS = 8,  // qmv: SIMD groups (output rows) per threadgroup of 256 threads
    TILE = 32,           // qmm: output tiles of TILE x TILE, 16 x 16 threads of 2 x 2 outputs
};

template <typename T, int BITS>
kernel void wick_qmv(const device uint32_t* w [[buffer(0)]], const device T* scales [[buffer(1)]],
                     const device T* biases [[buffer(2)]], const device T* x [[buffer(3)]],
                     device T* y [[buffer(4)]], constant WickDims& d [[buffer(5)]],
                     uint tg [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
                     uint lane [[thread_index_in_simdgroup]]) {
    const int row = int(tg) * QMV_SIMDGROUPS + int(sg);
    if (row >= d.n) return;  // the whole SIMD group leaves together
    const int chunks = d.k / 32;
    const int groups = d.k / d.gs;
    const device uint32_t* wr = w + (size_t)row * chunks * BITS;
    float acc[QMV_MAX_ROWS];
    for (int m = 0; m < QMV_MAX_ROWS; ++m) acc[m] = 0.0f;
    for (int c = int(lane); c < chunks; c += 32) {
        uint32_t words[BITS];
        for (int i = 0; i < BITS; ++i) words[i] = wr[c * BITS + i];
        float q[32];
        wick_unpack32<BITS>(words, q);
        const int g = row * groups + c * 32 / d.gs;
        const float s = float(scales[g]), b = float(biases[g]);
        for (int m = 0; m < QMV_MAX_ROWS; ++m) {
            if (m >= d.m) break;
            const device T* xr = x + (size_t)m * d.k + c * 32;
            float dot = 0.0f, sx = 0.0f;
            for (int j = 0; j < 32; ++j) {
                const float xv = float(xr[j]);
                dot = fma(xv, q[j], dot);
                sx += xv;
            }
            acc[m] = wick_chunk_acc(acc[m], s, b, dot, sx);
        }
    }
    for (int m = 0; m < QMV_MAX_ROWS; ++m) {
        if (m >= d.m) break;
        const float v = simd_sum(acc[m]);
        if (lane == 0) y[(size_t)m * d.n + row] = T(v);
    }
}

template <typename T, int BITS>
kernel void wick_qmm(const device uint32_t* w [[buffer(0)]], const device T* scales [[buffer(1)]],
                     const device T* biases [[buffer(2)]], const device T* x [[buffer(3)]],
                     device T* y [[buffer(4)]], constant WickDims& d [[buffer(5)]],
                     uint2 tgp [[threadgroup_position_in_grid]], uint2 tid [[thread_position_in_threadgroup]]) {
    threadgroup float xs[TILE][TILE + 1];  // input rows x the chunk's 32 values
    threadgroup float qs[TILE][TILE + 1];  // weight rows x the chunk's 32 codes
    threadgroup float ss[TILE], bs[TILE];  // the weight rows' scale and bias for the chunk
    const int lid = int(tid.y) * 16 + int(tid.x);
    const int row0 = int(tgp.y) * TILE;  // first input row of the tile
    const int col0 = int(tgp.x) * TILE;  // first output feature of the tile
    const int chunks = d.k / 32;
    const int groups = d.k / d.gs;
    float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    for (int c = 0; c < chunks; ++c) {
        for (int i = lid; i < TILE * TILE; i += 256) {
            const int r = i / TILE, j = i % TILE;
            const int gr = row0 + r;
            xs[r][j] = gr < d.m ? float(x[(size_t)gr * d.k + c * 32 + j]) : 0.0f;
        }
        if (lid < TILE) {
            const int n = min(col0 + lid, d.n - 1);  // rows past the end repeat the last, unwritten
            uint32_t words[BITS];
            const device uint32_t* wr = w + ((size_t)n * chunks + c) * BITS;
            for (int i = 0; i < BITS; ++i) words[i] = wr[i];
            for (int j = 0; j < 32; ++j) qs[lid][j] = wick_code<BITS>(words, j);
            const int g = n * groups + c * 32 / d.gs;
            ss[lid] = float(scales[g]);
            bs[lid] = float(biases[g]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float dot[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
        float sx[2] = {0.0f, 0.0f};
        for (int j = 0; j < 32; ++j) {
            for (int a = 0; a < 2; ++a) {
                const float xv = xs[tid.y * 2 + a][j];
                sx[a] += xv;
                for (int b = 0; b < 2; ++b) dot[a][b] = fma(xv, qs[tid.x * 2 + b][j], dot[a][b]);
            }
        }
        for (int a = 0; a < 2; ++a)
            for (int b = 0; b < 2; ++b)
                acc[a][b] = wick_chunk_acc(acc[a][b], ss[tid.x * 2 + b], bs[tid.x * 2 + b], dot[a][b], sx[a]);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int a = 0; a < 2; ++a) {
        const int r = row0 + int(tid.y) * 2 + a;
        for (int b = 0; b < 2; ++b) {
            const int n = col0 + int(tid.x) * 2 + b;
            if (r < d.m && n < d.n) y[(size_t)r * d.n + n] = T(acc[a][b]);
        }
    }
}

// One thread per chunk. The product and the sum are separate statements, each rounded to T,
// so that no fused multiply-add changes MLX's rounding (the library is built without fast math).
template <typename T, int BITS>
kernel void wick_dequant(const device uint32_t* w [[buffer(0)]], const device T* scales [[buffer(1)]],
                         const device T* biases [[buffer(2)]], device T* out [[buffer(3)]],
                         constant WickDims& d [[buffer(4)]], uint idx [[thread_position_in_grid]]) {
    const int chunks = d.k / 32;
    if (int(idx) >= d.n * chunks) return;
    const int row = int(idx) / chunks, c = int(idx) % chunks;
    uint32_t words[BITS];
    for (int i = 0; i < BITS; ++i) words[i] = w[(size_t)idx * BITS + i];
    const int g = row * (d.k / d.gs) + c * 32 / d.gs;
    const float s = float(scales[g]), b = float(biases[g]);
    for (int j = 0; j < 32; ++j) {
        const T p = T(s * wick_code<BITS>(words, j));
        const T v = T(float(p) + b);
        out[(size_t)row * d.k + c * 32 + j] = v;
    }
}

#define WICK_KERNEL(NAME, TN, T, BITS) \
    template [[host_name(#NAME "_" #TN "_b" #BITS)]] [[kernel]] decltype(NAME<T, BITS>) NAME<T, BITS>;
#define WICK_INSTANTIATE(T, TN, BITS) \
    WICK_KERNEL(wick_qmv, TN, T, BITS) WICK_KERNEL(wick_qmm, TN, T, BITS) WICK_KERNEL(wick_dequant, TN, T, BITS)

#define WICK_ALL_BITS(T, TN)                                                                         \
    WICK_INSTANTIATE(T, TN, 2) WICK_INSTANTIATE(T, TN, 3) WICK_INSTANTIATE(T, TN, 4)                 \
    WICK_INSTANTIATE(T, TN, 5) WICK_INSTANTIATE(T, TN, 6) WICK_INSTANTIATE(T, TN, 8)

WICK_ALL_BITS(float, f32)
WICK_ALL_BITS(half, f16)
#if __METAL_VERSION__ >= 310
WICK_ALL_BITS(bfloat, bf16)
#endif
