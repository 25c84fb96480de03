// Decode attention on CUDA: one query position per (batch row, head) over the strided KV cache,
// split over blocks of 64 keys and combined (flash-decoding): two launches instead of the
// dozen launches and the cache copies of matmul + softmax + matmul, and enough blocks to keep
// the GPU busy at batch 1. Grouped-query heads read their shared KV head in place. A replayed
// decode step (CUDA graph) runs one launch per layer instead: the same pass with RoPE, the
// cache write and the combine folded in (wick_attention_step_*). Prefill: flash attention on
// the tensor cores (below). Launched from src/ops/attention/cuda.rs; compiled by build.rs.

#include "../../backend/cuda/common.cuh"

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
// v's max (sum) over the block's THREADS threads, for every thread, through red (WARPS
// floats; the caller syncs before red is written again)
__device__ __forceinline__ float block_max(float v, float* red) {
    v = warp_max(v);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    v = red[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) v = fmaxf(v, red[w]);
    return v;
}
__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[w];
    return v;
}

// Second pass for one row bh: out[bh] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the
// first n of the row's `stride` partials, read through L2 (other blocks of the kernel running
// may have written them). THREADS threads: M and the sum of l over all of them, the weights of
// THREADS partials at a time into shared memory, then each output column's sum over them in
// order, its loads in flight together.
template <typename T>
__device__ void combine_row(const float* part_o, const float* part_ml, T* __restrict__ out, int bh, int n,
                            int stride, int dv) {
    __shared__ float wt[THREADS];
    __shared__ float red2[WARPS];
    const int tid = threadIdx.x;
    const float* ml = part_ml + (size_t)bh * stride * 2;
    // this thread's first partial's (m, l), kept for the first chunk
    const float m0 = tid < n ? __ldcg(ml + 2 * tid) : -INFINITY;
    const float l0 = tid < n ? __ldcg(ml + 2 * tid + 1) : 0.f;
    float m = m0;
    for (int s = tid + THREADS; s < n; s += THREADS) m = fmaxf(m, __ldcg(ml + 2 * s));
    m = block_max(m, red2);
    float l = 0.f;
    float x[MAX_D / THREADS];
#pragma unroll
    for (int q = 0; q < MAX_D / THREADS; ++q) x[q] = 0.f;
    for (int c0 = 0; c0 < n; c0 += THREADS) {
        const int s = c0 + tid;
        float ws = 0.f;
        if (s < n) {
            const float ms = c0 == 0 ? m0 : __ldcg(ml + 2 * s);
            if (ms != -INFINITY) {
                ws = __expf(ms - m);
                l = fmaf(ws, c0 == 0 ? l0 : __ldcg(ml + 2 * s + 1), l);
            }
        }
        __syncthreads();  // the previous chunk's weights (and the max's reduction) are read
        wt[tid] = ws;
        __syncthreads();
        const int cn = min(THREADS, n - c0);
#pragma unroll
        for (int q = 0; q < MAX_D / THREADS; ++q) {
            const int i = tid + q * THREADS;
            if (i < dv) {
                const float* po = part_o + ((size_t)bh * stride + c0) * dv + i;
                float acc = x[q];
#pragma unroll 8
                for (int s2 = 0; s2 < cn; ++s2) acc = fmaf(wt[s2], __ldcg(po + (size_t)s2 * dv), acc);
                x[q] = acc;
            }
        }
    }
    __syncthreads();  // the max's reads of red2 are done
    l = block_sum(l, red2);
#pragma unroll
    for (int q = 0; q < MAX_D / THREADS; ++q) {
        const int i = tid + q * THREADS;
        if (i < dv) out[(size_t)bh * dv + i] = from_f32<T>(x[q] / l);
    }
}

// What a replayed decode step's launch adds to the first pass (STEP): the step's keys and
// values before RoPE (k_new, v_new: (B, KV, D) contiguous; q is then before RoPE too), the RoPE
// tables (B, D/2) of each row's position, the output (B, H, DV), and one counter per (batch
// row, head), zero between launches.
template <typename T>
struct Step {
    const T* k_new;
    const T* v_new;
    const T* cos;
    const T* sin;
    T* out;
    unsigned* done;
    int traditional;
};

// Split-keys decode attention (flash-decoding), first pass. Block (bh, s) takes query head
// bh = b*H + head over keys s*CHUNK .. (s+1)*CHUNK and writes its unnormalized partial output
// o (DV floats), the chunk's max score m and its sum of exp(score - m) l.
// q: (B, H, D) contiguous; k: (B, KV, T, D), v: (B, KV, T, DV) with element strides
// (sb, sh, st, 1); grouped-query heads read their KV head in place. starts: per batch row the
// first visible key, or null. pos: null, or the position this step wrote (a CUDA graph replays
// the step at every position: the key count is read on the device and blocks past it write an
// empty partial).
//
// STEP (a replayed decode step, pos given): the block first rotates its query head, and the
// blocks whose chunk holds the position rotate the step's key, which they and the cache take
// (the first query head of each KV head writes the cache; every block of the chunk reads the
// new key and value from shared memory, never from the cache it is writing). Blocks past the
// position exit, and the last block of a row to finish (the counter) combines the row's
// partials into out. Keys before the position are issued before pdl_wait: earlier steps wrote
// them, and a step starts behind the copies of its position (full dependencies), so no kernel
// of the step before is still running.
template <typename T, bool STEP>
__device__ void attention_partial_impl(const T* __restrict__ q, T* k, T* v, float* __restrict__ part_o,
                                       float* __restrict__ part_ml, const unsigned* __restrict__ starts,
                                       const unsigned* __restrict__ pos, int h, int kvh, int t_len, int d, int dv,
                                       long long ksb, long long ksh, long long kst, long long vsb, long long vsh,
                                       long long vst, float scale, float softcap, int vec, Step<T> step) {
    __shared__ float qs[MAX_D];
    __shared__ float sc[CHUNK];
    __shared__ float red[WARPS];
    __shared__ __align__(16) float po[WARPS][MAX_D];
    __shared__ __align__(16) T kn[STEP ? MAX_D : 1];
    __shared__ __align__(16) T vn[STEP ? MAX_D : 1];
    __shared__ bool last;
    const int bh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int b = bh / h, head = bh % h, n_rep = h / kvh, kv = head / n_rep;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    // the position, the row's start and the query are independent reads, issued together
    const int pos_v = pos ? (int)*pos : 0;
    const int start_v = starts ? (int)starts[b] : 0;
    if (!STEP)
        for (int i = tid; i < d; i += THREADS) qs[i] = to_f32(q[(size_t)bh * d + i]) * scale;
    if (pos) t_len = pos_v + 1;  // replayed decode step: the keys up to this step's position
    // a row sees at least its newest key (a batch slot whose request has left)
    const int start = starts ? min(start_v, t_len - 1) : 0;
    const int j0 = split * CHUNK, j1 = min(t_len, j0 + CHUNK);
    if (STEP && j0 >= t_len) return;  // no keys: the combine counts only the splits with keys
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
    if ((vec & 1) && j < j1) {
#pragma unroll
        for (int u = 0; u < U; ++u) if (u < d / PER) kw[u] = __ldg(kv4 + u);
    }
    if (STEP) {
        // RoPE in T, rounding as candle's rope kernels do: this head's query, and the step's key
        // (with its value) where this chunk holds the position
        const int half = d / 2;
        const bool here = pos_v >= j0 && pos_v < j1;
        T c = T(0.f), s = T(0.f);
        if (tid < half) {
            c = step.cos[(size_t)b * half + tid];
            s = step.sin[(size_t)b * half + tid];
        }
        pdl_wait();
        const int i1 = step.traditional ? 2 * tid : tid, i2 = step.traditional ? 2 * tid + 1 : tid + half;
        // elements i1 and i2 of src rotated by (c, s) into o1, o2
        auto rotate = [&](const T* src, T& o1, T& o2) {
            const T a = src[i1], a2 = src[i2];
            o1 = a * c - a2 * s;
            o2 = a * s + a2 * c;
        };
        if (tid < half) {
            T r1, r2;
            rotate(q + (size_t)bh * d, r1, r2);
            qs[i1] = to_f32(r1) * scale;
            qs[i2] = to_f32(r2) * scale;
        }
        if (here) {
            const bool writer = head % n_rep == 0;
            if (tid < half) {
                rotate(step.k_new + ((size_t)b * kvh + kv) * d, kn[i1], kn[i2]);
                if (writer) {
                    T* row = k + b * ksb + kv * ksh + (long long)pos_v * kst;
                    row[i1] = kn[i1];
                    row[i2] = kn[i2];
                }
            }
            for (int i = tid; i < dv; i += THREADS) {
                vn[i] = step.v_new[((size_t)b * kvh + kv) * dv + i];
                if (writer) v[b * vsb + kv * vsh + (long long)pos_v * vst + i] = vn[i];
            }
        }
    }
    __syncthreads();
    float mx = -INFINITY;
    if (j < j1) {
        float s = 0.f;
        // the step's own key row: from shared memory (the cache row may not be written yet)
        const bool fresh = STEP && j == pos_v;
        const uint4* kn4 = reinterpret_cast<const uint4*>(kn);
        if (vec & 1) {
            if (fresh) {
#pragma unroll
                for (int u = 0; u < U; ++u) if (u < d / PER) kw[u] = kn4[u];
            }
            for (int v0 = 0; v0 < d / PER; v0 += U) {
                if (v0 > 0) {
#pragma unroll
                    for (int u = 0; u < U; ++u) if (v0 + u < d / PER) kw[u] = fresh ? kn4[v0 + u] : __ldg(kv4 + v0 + u);
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
            const T* row = fresh ? kn : kr;
            for (int i = 0; i < d; ++i) s = fmaf(qs[i], to_f32(row[i]), s);
        }
        if (softcap > 0.f) s = softcap * tanhf(s / softcap);
        if (j < start) s = -INFINITY;
        sc[j - j0] = s;
        mx = s;
    }
    mx = block_max(mx, red);
    __syncthreads();
    float l = 0.f;
    if (j < j1) {
        const float e = mx == -INFINITY ? 0.f : __expf(sc[j - j0] - mx);
        sc[j - j0] = e;
        l = e;
    }
    l = block_sum(l, red);
    // values, with 16-byte loads where the layout allows (vec & 2: dv and the value stride in
    // whole 16-byte units, dv / E ≤ 32): G lanes per value row, E elements each, R rows per
    // warp load, VU loads in flight; a lane accumulates its E columns over its rows, and the
    // (warp, row-lane) sums meet in shared memory (po as one array)
    constexpr int E = 16 / sizeof(T);
    constexpr int VU = 8;
    float* pof = &po[0][0];
    int rows;  // partial sums per column in pof
    if ((vec & 2) && dv / E <= 32) {
        const int G = dv / E, R = 32 / G, r = lane / G, col = (lane % G) * E;
        const bool on = r < R;
        float a[E];
#pragma unroll
        for (int e = 0; e < E; ++e) a[e] = 0.f;
        const uint4* vn4 = reinterpret_cast<const uint4*>(vn);
        for (int jb = j0 + warp * R + r; jb < j1; jb += WARPS * R * VU) {
            uint4 w[VU];
            float p[VU];
#pragma unroll
            for (int u = 0; u < VU; ++u) {
                const int jj = jb + u * WARPS * R;
                const bool ok = on && jj < j1;
                w[u] = make_uint4(0, 0, 0, 0);
                if (STEP && ok && jj == pos_v) w[u] = vn4[col / E];
                else if (ok) w[u] = __ldg(reinterpret_cast<const uint4*>(vb + (long long)jj * vst + col));
                p[u] = ok ? sc[jj - j0] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < VU; ++u) {
                const T* e8 = reinterpret_cast<const T*>(&w[u]);
#pragma unroll
                for (int e = 0; e < E; ++e) a[e] = fmaf(p[u], to_f32(e8[e]), a[e]);
            }
        }
        rows = WARPS * R;
        if (on) {
#pragma unroll
            for (int e = 0; e < E; ++e) pof[(warp * R + r) * dv + col + e] = a[e];
        }
    } else {
        // a warp per key, lanes over the value dimension, INFLIGHT rows loaded together
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
            if (STEP && pos_v >= jb && pos_v < jb + INFLIGHT) {
                // the step's own value row: from shared memory (its cache row may not be written yet)
#pragma unroll
                for (int u = 0; u < INFLIGHT; ++u)
#pragma unroll
                    for (int c = 0; c < PER_LANE; ++c) {
                        const int i = lane + 32 * c;
                        if (jb + u == pos_v && i < dv) vx[u][c] = to_f32(vn[i]);
                    }
            }
#pragma unroll
            for (int u = 0; u < INFLIGHT; ++u) {
                const float p = jb + u < j1 ? sc[jb + u - j0] : 0.f;
#pragma unroll
                for (int c = 0; c < PER_LANE; ++c) acc[c] = fmaf(p, vx[u][c], acc[c]);
            }
        }
        rows = WARPS;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) {
            const int i = lane + 32 * c;
            if (i < dv) pof[warp * dv + i] = acc[c];
        }
    }
    __syncthreads();
    float* o = part_o + ((size_t)bh * splits + split) * dv;
    for (int i = tid; i < dv; i += THREADS) {
        float x = 0.f;
        for (int w = 0; w < rows; ++w) x += pof[w * dv + i];
        o[i] = x;
    }
    if (tid == 0) {
        part_ml[((size_t)bh * splits + split) * 2] = mx;
        part_ml[((size_t)bh * splits + split) * 2 + 1] = l;
    }
    if (STEP) {
        // the row's last block to finish combines its partials (and leaves the counter at zero)
        const int active = (t_len + CHUNK - 1) / CHUNK;
        __threadfence();
        __syncthreads();
        if (tid == 0) last = atomicAdd(step.done + bh, 1u) == (unsigned)active - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        combine_row<T>(part_o, part_ml, step.out, bh, active, splits, dv);
        if (tid == 0) step.done[bh] = 0;
    }
}

// Second pass: out[bh] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
template <typename T>
__device__ void attention_combine_impl(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                       T* __restrict__ out, int splits, int dv) {
    combine_row<T>(part_o, part_ml, out, blockIdx.x, splits, splits, dv);
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
        pdl_enter();                                                                                            \
        attention_partial_impl<T, false>(q, const_cast<T*>(k), const_cast<T*>(v), part_o, part_ml, starts, pos, \
                                         h, kvh, t_len, d, dv, ksb, ksh, kst, vsb, vsh, vst, scale, softcap,    \
                                         vec, Step<T>{});                                                       \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS) wick_attention_step_##TN(                            \
        const T* q, T* k, T* v, float* part_o, float* part_ml, const unsigned* starts, const unsigned* pos,     \
        int h, int kvh, int t_len, int d, int dv, long long ksb, long long ksh, long long kst, long long vsb,   \
        long long vsh, long long vst, float scale, float softcap, int vec, const T* k_new, const T* v_new,      \
        const T* cos, const T* sin, T* out, unsigned* done, int traditional) {                                  \
        pdl_launch_dependents();                                                                                \
        attention_partial_impl<T, true>(q, k, v, part_o, part_ml, starts, pos, h, kvh, t_len, d, dv, ksb, ksh,  \
                                        kst, vsb, vsh, vst, scale, softcap, vec,                                \
                                        Step<T>{k_new, v_new, cos, sin, out, done, traditional});               \
    }                                                                                                           \
    extern "C" __global__ void wick_kv_write_##TN(T* cache, const T* src, const unsigned* pos, int heads,      \
                                                  int d, long long sb, long long sh, long long st) {            \
        pdl_enter();                                                                                            \
        kv_write_impl<T>(cache, src, pos, heads, d, sb, sh, st);                                                \
    }                                                                                                           \
    extern "C" __global__ void wick_attention_combine_##TN(const float* part_o, const float* part_ml, T* out,   \
                                                           int splits, int dv) {                                \
        pdl_enter();                                                                                            \
        attention_combine_impl<T>(part_o, part_ml, out, splits, dv);                                            \
    }
ATTN(float, f32)
ATTN(__half, f16)
ATTN(__nv_bfloat16, bf16)
