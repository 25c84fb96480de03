// Decode attention on CUDA: one query position per (batch row, head) over the strided KV cache,
// split over blocks of 64 keys and combined (flash-decoding): two launches instead of the
// dozen launches and the cache copies of matmul + softmax + matmul, and enough blocks to keep
// the GPU busy at batch 1. Grouped-query heads read their shared KV head in place. Prefill:
// flash attention on the tensor cores (below). Launched from src/cuda/mod.rs; compiled by
// build.rs.

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

// ---------------------------------------------------------------------------------------------
// Prefill attention on the tensor cores (flash-attention style), f16 / bf16, head size D (64,
// 96 or 128) for keys and values: block (i, b·H + head) takes 64 query rows of one head, 16
// per warp, and walks the keys they may see in tiles of 64, copied into shared memory with
// cp.async (the values' copy overlapping the scores). Per tile a warp's scores S = Q·Kᵀ come
// from mma.m16n8k16 (Q's fragments stay in registers), are scaled, capped and masked in f32,
// and enter an online softmax (running max and sum per row); P, rounded to T, multiplies the
// values (ldmatrix.trans fragments) into f32 accumulators, divided by the row's sum at the end.
// One launch instead of the scores' matmul, mask, softmax, casts and the values' matmul, and
// no (H, L, T) scores in memory. The mask is scaled_dot_product_attention's: query row r sits
// at key index offset + r and sees keys j ≤ offset + r, within `window` (if > 0) and not before
// its row's first key `starts[b]` (left padding; a padding query sees itself).
// q: (B, H, L, D) contiguous; k, v: (B, KV, T, D) with element strides (sb, sh, st, 1), rows
// 16-byte aligned; out: (B, L, H, D).
// ---------------------------------------------------------------------------------------------
constexpr int PF_ROWS = 64;  // query rows per block, 16 per warp
constexpr int PF_KEYS = 64;  // keys per tile

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// rows j0 .. j0+63 of src (rows past t repeat row t-1: finite values under a zero weight) into
// the tile dst (row stride S elements), as one cp.async group
template <typename T, int D, int S>
__device__ __forceinline__ void load_tile(T* dst, const T* src, long long st, int j0, int t) {
#pragma unroll
    for (int c = threadIdx.x; c < PF_KEYS * D / 8; c += 128) {
        const int row = c / (D / 8), col = c % (D / 8) * 8;
        const long long j = min(j0 + row, t - 1);
        cp_async16(dst + row * S + col, src + j * st + col);
    }
    cp_async_commit();
}

template <typename T, int D>
__device__ void attention_prefill_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                       T* __restrict__ out, const unsigned* __restrict__ starts, int h, int kvh,
                                       int l, int t, int offset, int window, long long ksb, long long ksh,
                                       long long kst, long long vsb, long long vsh, long long vst, float scale,
                                       float softcap) {
    using P = MmaType<T>;
    constexpr int KS = D / 16;       // k-steps of the scores
    constexpr int NT = PF_KEYS / 8;  // n-tiles of the scores
    constexpr int DT = D / 8;        // n-tiles of the output
    constexpr int S = D + 8;         // tile row stride: 16 bytes of padding keep fragment reads conflict-free
    constexpr float LOG2E = 1.4426950408889634f;
    __shared__ __align__(16) T ks[PF_KEYS * S];
    __shared__ __align__(16) T vs[PF_KEYS * S];
    const int bh = blockIdx.y, b = bh / h, head = bh % h, kv = head / (h / kvh);
    const int q0 = (gridDim.x - 1 - blockIdx.x) * PF_ROWS;  // the blocks with the most keys first
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tq = lane % 4;
    const int pad = starts ? (int)starts[b] : 0;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this lane's query rows
    const int p0 = offset + r0, p1 = offset + r1;    // and their key indices
    uint32_t qa[KS][4];
    {
        const T* qr0 = q + ((size_t)bh * l + min(r0, l - 1)) * D + 2 * tq;
        const T* qr1 = q + ((size_t)bh * l + min(r1, l - 1)) * D + 2 * tq;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            qa[kk][0] = *reinterpret_cast<const uint32_t*>(qr0 + kk * 16);
            qa[kk][1] = *reinterpret_cast<const uint32_t*>(qr1 + kk * 16);
            qa[kk][2] = *reinterpret_cast<const uint32_t*>(qr0 + kk * 16 + 8);
            qa[kk][3] = *reinterpret_cast<const uint32_t*>(qr1 + kk * 16 + 8);
        }
    }
    // the keys the block's rows may see
    const int k_end = min(t, offset + min(q0 + PF_ROWS, l));
    const int k_begin = window > 0 ? max(0, offset + q0 - window + 1) / PF_KEYS * PF_KEYS : 0;
    const T* kb = k + b * ksb + kv * ksh;
    const T* vb = v + b * vsb + kv * vsh;
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[dt][i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
    for (int j0 = k_begin; j0 < k_end; j0 += PF_KEYS) {
        __syncthreads();  // the previous tile's readers are done
        load_tile<T, D, S>(ks, kb, kst, j0, t);
        load_tile<T, D, S>(vs, vb, vst, j0, t);
        cp_async_wait<1>();  // the keys
        __syncthreads();
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
            const T* kr = ks + (nt * 8 + g) * S + 2 * tq;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + kk * 16);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + kk * 16 + 8);
                P::mma(s[nt], qa[kk], b0, b1);
            }
        }
        // scale, cap and mask, in log2 units; each row's max over the tile (the quad's 4 lanes)
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int j = j0 + nt * 8 + 2 * tq + (i & 1);
                const int p = i < 2 ? p0 : p1;
                float x = s[nt][i] * scale;
                if (softcap > 0.f) x = softcap * tanhf(x / softcap);
                const bool seen = j < t && j <= p && (window <= 0 || j + window > p) && (j >= pad || j == p);
                x = seen ? x * LOG2E : -INFINITY;
                s[nt][i] = x;
                mx[i / 2] = fmaxf(mx[i / 2], x);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            corr[r] = mn == -INFINITY ? 1.f : exp2f(m[r] - mn);
            m[r] = mn;
            lsum[r] *= corr[r];
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float e = m[i / 2] == -INFINITY ? 0.f : exp2f(s[nt][i] - m[i / 2]);
                s[nt][i] = e;
                lsum[i / 2] += e;
            }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[dt][i] *= corr[i / 2];
        // the probabilities as the A fragments of P·V: the scores' accumulator layout is theirs
        uint32_t pa[PF_KEYS / 16][4];
#pragma unroll
        for (int kk = 0; kk < PF_KEYS / 16; ++kk) {
            pa[kk][0] = P::pack(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = P::pack(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = P::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = P::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
        cp_async_wait<0>();  // the values
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < PF_KEYS / 16; ++kk) {
            const T* vr = vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8;
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b0, b1, b2, b3;
                const unsigned a = (unsigned)__cvta_generic_to_shared(vr + dp * 16);
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                             : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                             : "r"(a));
                P::mma(o[2 * dp], pa[kk], b0, b1);
                P::mma(o[2 * dp + 1], pa[kk], b2, b3);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], 1);
        lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], 2);
        lsum[r] = lsum[r] > 0.f ? 1.f / lsum[r] : 0.f;
    }
    const int hb = b * l;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r ? r1 : r0;
        if (row >= l) continue;
        T* dst = out + (((size_t)hb + row) * h + head) * D + 2 * tq;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
            *reinterpret_cast<uint32_t*>(dst + dt * 8) = P::pack(o[dt][2 * r] * lsum[r], o[dt][2 * r + 1] * lsum[r]);
    }
}

#define PREFILL(T, TN, D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) wick_attention_prefill_##TN##_d##D(                      \
        const T* q, const T* k, const T* v, T* out, const unsigned* starts, int h, int kvh, int l, int t,       \
        int offset, int window, long long ksb, long long ksh, long long kst, long long vsb, long long vsh,      \
        long long vst, float scale, float softcap) {                                                            \
        pdl_enter(); attention_prefill_impl<T, D>(q, k, v, out, starts, h, kvh, l, t, offset, window, ksb, ksh, kst, vsb,    \
                                     vsh, vst, scale, softcap);                                                 \
    }
PREFILL(__half, f16, 64)
PREFILL(__half, f16, 96)
PREFILL(__half, f16, 128)
PREFILL(__nv_bfloat16, bf16, 64)
PREFILL(__nv_bfloat16, bf16, 96)
PREFILL(__nv_bfloat16, bf16, 128)

#define ATTN(T, TN)                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) wick_attention_partial_##TN(                         \
        const T* q, const T* k, const T* v, float* part_o, float* part_ml, const unsigned* starts,              \
        const unsigned* pos, int h, int kvh, int t_len, int d, int dv, long long ksb, long long ksh,            \
        long long kst, long long vsb, long long vsh, long long vst, float scale, float softcap, int vec) {      \
        pdl_enter(); attention_partial_impl<T>(q, k, v, part_o, part_ml, starts, pos, h, kvh, t_len, d, dv, ksb, ksh, kst,   \
                                  vsb, vsh, vst, scale, softcap, vec);                                          \
    }                                                                                                           \
    extern "C" __global__ void wick_rope_kv_##TN(const T* q, const T* k, const T* v, const T* cos, const T* sin, \
                                                 const unsigned* pos, T* q_out, T* kc, T* vc, int h, int kvh,   \
                                                 int d, long long ksb, long long ksh, long long kst,            \
                                                 long long vsb, long long vsh, long long vst, int traditional) { \
        pdl_enter(); rope_kv_impl<T>(q, k, v, cos, sin, pos, q_out, kc, vc, h, kvh, d, ksb, ksh, kst, vsb, vsh, vst,         \
                        traditional);                                                                           \
    }                                                                                                           \
    extern "C" __global__ void wick_kv_write_##TN(T* cache, const T* src, const unsigned* pos, int heads,      \
                                                  int d, long long sb, long long sh, long long st) {            \
        pdl_enter(); kv_write_impl<T>(cache, src, pos, heads, d, sb, sh, st);                                                \
    }                                                                                                           \
    extern "C" __global__ void wick_attention_combine_##TN(const float* part_o, const float* part_ml, T* out,   \
                                                           int splits, int dv) {                                \
        pdl_enter(); attention_combine_impl<T>(part_o, part_ml, out, splits, dv);                                            \
    }
ATTN(float, f32)
ATTN(__half, f16)
ATTN(__nv_bfloat16, bf16)
