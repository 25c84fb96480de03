// Decode attention on CUDA: one query position per (batch row, head) over the strided KV cache,
// split over blocks of 64 keys and combined (flash-decoding): two launches instead of the
// dozen launches and the cache copies of matmul + softmax + matmul, and enough blocks to keep
// the GPU busy at batch 1. Grouped-query heads read their shared KV head in place. Launched
// from src/cuda/mod.rs; compiled by build.rs.

#include "common.cuh"

constexpr int THREADS = 128;                // 4 warps per block; one key per thread for the scores
constexpr int WARPS = THREADS / 32;
constexpr int CHUNK = 64;                   // keys per block (≤ THREADS: one key per thread)
constexpr int MAX_D = 256;                  // head size limit (keys and values)
constexpr int PER_LANE = MAX_D / 32;
constexpr int INFLIGHT = 8;                 // value rows whose loads a warp issues together

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Split-keys decode attention (flash-decoding), first pass. Block (bh, s) takes query head
// bh = b*H + head over keys s*CHUNK .. (s+1)*CHUNK and writes its unnormalized partial output
// o (DV floats), the chunk's max score m and its sum of exp(score - m) l.
// q: (B, H, D) contiguous; k: (B, KV, T, D), v: (B, KV, T, DV) with element strides
// (sb, sh, st, 1); grouped-query heads read their KV head in place. starts: per batch row the
// first visible key, or null. pos: null, or the position this step wrote (a CUDA graph replays
// the step at every position: the key count is read on the device and blocks past it write an
// empty partial).
template <typename T>
__device__ void attention_partial_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                       float* __restrict__ part_o, float* __restrict__ part_ml,
                                       const unsigned* __restrict__ starts, const unsigned* __restrict__ pos, int h,
                                       int kvh, int t_len, int d, int dv,
                                       long long ksb, long long ksh, long long kst, long long vsb, long long vsh,
                                       long long vst, float scale, float softcap, int vec) {
    __shared__ float qs[MAX_D];
    __shared__ float sc[CHUNK];
    __shared__ float red[WARPS];
    __shared__ float po[WARPS][MAX_D];
    const int bh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int b = bh / h, kv = (bh % h) / (h / kvh);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    // the position, the row's start and the query are independent reads, issued together
    const int pos_v = pos ? (int)*pos : 0;
    const int start_v = starts ? (int)starts[b] : 0;
    for (int i = tid; i < d; i += THREADS) qs[i] = to_f32(q[(size_t)bh * d + i]) * scale;
    if (pos) t_len = pos_v + 1;  // replayed decode step: the keys up to this step's position
    // a row sees at least its newest key (a batch slot whose request has left)
    const int start = starts ? min(start_v, t_len - 1) : 0;
    const int j0 = split * CHUNK, j1 = min(t_len, j0 + CHUNK);
    const T* kb = k + b * ksb + kv * ksh;
    const T* vb = v + b * vsb + kv * vsh;
    const int j = j0 + tid;
    // this thread's value row into L2 now, so that the second half's reads find it there
    if (j < j1) {
        const char* vr = reinterpret_cast<const char*>(vb + (long long)j * vst);
        for (int o = 0; o < dv * (int)sizeof(T); o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(vr + o));
    }
    // scores: one key per thread; its row read with 16-byte loads when the layout allows
    // (vec: d and the key stride are multiples of 16 bytes), up to U of them in flight at once,
    // the first U issued before the barrier that publishes the query
    constexpr int PER = 16 / sizeof(T);
    constexpr int U = 16;
    const T* kr = kb + (long long)j * kst;
    const uint4* kv4 = reinterpret_cast<const uint4*>(kr);
    uint4 kw[U];
    if (vec && j < j1) {
#pragma unroll
        for (int u = 0; u < U; ++u) if (u < d / PER) kw[u] = __ldg(kv4 + u);
    }
    __syncthreads();
    float mx = -INFINITY;
    if (j < j1) {
        float s = 0.f;
        if (vec) {
            for (int v0 = 0; v0 < d / PER; v0 += U) {
                if (v0 > 0) {
#pragma unroll
                    for (int u = 0; u < U; ++u) if (v0 + u < d / PER) kw[u] = __ldg(kv4 + v0 + u);
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    if (v0 + u < d / PER) {
                        const T* e = reinterpret_cast<const T*>(&kw[u]);
#pragma unroll
                        for (int x = 0; x < PER; ++x) s = fmaf(qs[(v0 + u) * PER + x], to_f32(e[x]), s);
                    }
                }
            }
        } else {
            for (int i = 0; i < d; ++i) s = fmaf(qs[i], to_f32(kr[i]), s);
        }
        if (softcap > 0.f) s = softcap * tanhf(s / softcap);
        if (j < start) s = -INFINITY;
        sc[j - j0] = s;
        mx = s;
    }
    mx = warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) mx = fmaxf(mx, red[w]);
    __syncthreads();
    float l = 0.f;
    if (j < j1) {
        const float e = mx == -INFINITY ? 0.f : __expf(sc[j - j0] - mx);
        sc[j - j0] = e;
        l = e;
    }
    l = warp_sum(l);
    if (lane == 0) red[warp] = l;
    __syncthreads();
    l = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) l += red[w];
    // values: a warp per key, lanes over the value dimension, INFLIGHT rows loaded together
    float acc[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) acc[c] = 0.f;
    for (int jb = j0 + warp * INFLIGHT; jb < j1; jb += WARPS * INFLIGHT) {
        float vx[INFLIGHT][PER_LANE];
#pragma unroll
        for (int u = 0; u < INFLIGHT; ++u) {
            const T* vr = vb + (long long)(jb + u) * vst;
#pragma unroll
            for (int c = 0; c < PER_LANE; ++c) {
                const int i = lane + 32 * c;
                vx[u][c] = (jb + u < j1 && i < dv) ? to_f32(vr[i]) : 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < INFLIGHT; ++u) {
            const float p = jb + u < j1 ? sc[jb + u - j0] : 0.f;
#pragma unroll
            for (int c = 0; c < PER_LANE; ++c) acc[c] = fmaf(p, vx[u][c], acc[c]);
        }
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        const int i = lane + 32 * c;
        if (i < dv) po[warp][i] = acc[c];
    }
    __syncthreads();
    float* o = part_o + ((size_t)bh * splits + split) * dv;
    for (int i = tid; i < dv; i += THREADS) {
        float x = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) x += po[w][i];
        o[i] = x;
    }
    if (tid == 0) {
        part_ml[((size_t)bh * splits + split) * 2] = mx;
        part_ml[((size_t)bh * splits + split) * 2 + 1] = l;
    }
}

// Second pass: out[bh] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
template <typename T>
__device__ void attention_combine_impl(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                       T* __restrict__ out, int splits, int dv) {
    const int bh = blockIdx.x;
    const float* ml = part_ml + (size_t)bh * splits * 2;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, ml[2 * s]);
    float l = 0.f;
    for (int s = 0; s < splits; ++s) l += ml[2 * s] == -INFINITY ? 0.f : __expf(ml[2 * s] - m) * ml[2 * s + 1];
    for (int i = threadIdx.x; i < dv; i += blockDim.x) {
        float x = 0.f;
        for (int s = 0; s < splits; ++s)
            if (ml[2 * s] != -INFINITY) x += __expf(ml[2 * s] - m) * part_o[((size_t)bh * splits + s) * dv + i];
        out[(size_t)bh * dv + i] = from_f32<T>(x / l);
    }
}

// A decode step's keys (or values) into the cache at the position read on the device (the
// step a CUDA graph replays): src (B, heads, 1, d) contiguous; cache (B, heads, T, d) with
// element strides (sb, sh, st, 1). One block per (batch row, head).
template <typename T>
__device__ void kv_write_impl(T* __restrict__ cache, const T* __restrict__ src, const unsigned* __restrict__ pos,
                              int heads, int d, long long sb, long long sh, long long st) {
    const int r = blockIdx.x, b = r / heads, hd = r % heads;
    T* row = cache + b * sb + hd * sh + (long long)*pos * st;
    for (int i = threadIdx.x; i < d; i += blockDim.x) row[i] = src[(size_t)r * d + i];
}

// A replayed decode step's RoPE and cache write in one launch, per batch row b: block
// b * (h + kvh) + i, i < h, rotates query head i into q_out; block b * (h + kvh) + h + j rotates
// key head j into the key cache and copies value head j into the value cache, both at the
// position read on the device. q: (B, h, 1, d), k, v: (B, kvh, 1, d) contiguous; cos, sin:
// (B, d/2), row b's position; caches (B, kvh, T, d) with element strides (sb, sh, st, 1).
// The products and sums round as candle's rope kernels do (in T).
template <typename T>
__device__ void rope_kv_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const T* __restrict__ cos, const T* __restrict__ sin, const unsigned* __restrict__ pos,
                             T* __restrict__ q_out, T* __restrict__ kc, T* __restrict__ vc, int h, int kvh, int d,
                             long long ksb, long long ksh, long long kst, long long vsb, long long vsh,
                             long long vst, int traditional) {
    const int b = blockIdx.x / (h + kvh), head = blockIdx.x % (h + kvh);
    const int half = d / 2;
    const T* src;
    T* dst;
    if (head < h) {
        src = q + ((size_t)b * h + head) * d;
        dst = q_out + ((size_t)b * h + head) * d;
    } else {
        const int j = head - h;
        const long long p = *pos;
        src = k + ((size_t)b * kvh + j) * d;
        dst = kc + b * ksb + j * ksh + p * kst;
        T* vdst = vc + b * vsb + j * vsh + p * vst;
        for (int i = threadIdx.x; i < d; i += blockDim.x) vdst[i] = v[((size_t)b * kvh + j) * d + i];
    }
    cos += (size_t)b * half;
    sin += (size_t)b * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const T c = cos[i], s = sin[i];
        const int i1 = traditional ? 2 * i : i, i2 = traditional ? 2 * i + 1 : i + half;
        const T a = src[i1], b2 = src[i2];
        dst[i1] = a * c - b2 * s;
        dst[i2] = a * s + b2 * c;
    }
}

#define ATTN(T, TN)                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) wick_attention_partial_##TN(                         \
        const T* q, const T* k, const T* v, float* part_o, float* part_ml, const unsigned* starts,              \
        const unsigned* pos, int h, int kvh, int t_len, int d, int dv, long long ksb, long long ksh,            \
        long long kst, long long vsb, long long vsh, long long vst, float scale, float softcap, int vec) {      \
        attention_partial_impl<T>(q, k, v, part_o, part_ml, starts, pos, h, kvh, t_len, d, dv, ksb, ksh, kst,   \
                                  vsb, vsh, vst, scale, softcap, vec);                                          \
    }                                                                                                           \
    extern "C" __global__ void wick_rope_kv_##TN(const T* q, const T* k, const T* v, const T* cos, const T* sin, \
                                                 const unsigned* pos, T* q_out, T* kc, T* vc, int h, int kvh,   \
                                                 int d, long long ksb, long long ksh, long long kst,            \
                                                 long long vsb, long long vsh, long long vst, int traditional) { \
        rope_kv_impl<T>(q, k, v, cos, sin, pos, q_out, kc, vc, h, kvh, d, ksb, ksh, kst, vsb, vsh, vst,         \
                        traditional);                                                                           \
    }                                                                                                           \
    extern "C" __global__ void wick_kv_write_##TN(T* cache, const T* src, const unsigned* pos, int heads,      \
                                                  int d, long long sb, long long sh, long long st) {            \
        kv_write_impl<T>(cache, src, pos, heads, d, sb, sh, st);                                                \
    }                                                                                                           \
    extern "C" __global__ void wick_attention_combine_##TN(const float* part_o, const float* part_ml, T* out,   \
                                                           int splits, int dv) {                                \
        attention_combine_impl<T>(part_o, part_ml, out, splits, dv);                                            \
    }
ATTN(float, f32)
ATTN(__half, f16)
ATTN(__nv_bfloat16, bf16)
