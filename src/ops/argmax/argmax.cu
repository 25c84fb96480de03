// Greedy decoding on the device, the last kernel of a replayed decode step: each row's argmax
// of the step's logits (the head's output in the model's dtype), with sample::argmax's rules (the first index on ties; NaN never
// chosen; 0 when no value exceeds -inf). The token goes into the step's own token input, so
// the next replay feeds it without the host, and into a ring the host reads (mapped host
// memory) at the step's position, so the host may read one step late while the next one runs.
// Launched from src/ops/argmax/cuda.rs; compiled by build.rs.

#include <math.h>
#include <stdint.h>

#include "../../backend/cuda/common.cuh"

#define ARGMAX_THREADS 1024
#define NONE 0xffffffffu

// Keeps (v, i) or takes (w, j): the larger value, the smaller index on ties. An index of NONE
// (nothing seen above -inf) loses to any other.
__device__ __forceinline__ void take_better(float& v, unsigned& i, float w, unsigned j) {
    if (j != NONE && (i == NONE || w > v || (w == v && j < i))) {
        v = w;
        i = j;
    }
}

// One block of ARGMAX_THREADS per row of `vocab` logits (f32, f16 or bf16: compared as their
// exact f32 values). `ring`: ring_len slots of gridDim.x tokens; this step's slot is
// pos % ring_len.
template <typename T>
__device__ void argmax_impl(const T* __restrict__ logits, unsigned vocab, unsigned* __restrict__ token,
                            unsigned* __restrict__ ring, unsigned ring_len, const unsigned* __restrict__ pos) {
    pdl_enter();
    const unsigned row = blockIdx.x, tid = threadIdx.x;
    const T* x = logits + (size_t)row * vocab;
    float best = -INFINITY;
    unsigned at = NONE;
    // each thread sees its indices in increasing order: a strict > keeps the first of equals;
    // rows of a multiple of PER values start on 16 bytes and are read 16 bytes at a time
    constexpr unsigned PER = 16 / sizeof(T);
    if (vocab % PER == 0) {
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        for (unsigned c = tid; c < vocab / PER; c += ARGMAX_THREADS) {
            const uint4 q = x4[c];
            const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
            for (unsigned k = 0; k < PER; ++k) {
                const float v = to_f32(e[k]);
                if (v > best) {
                    best = v;
                    at = PER * c + k;
                }
            }
        }
    } else {
        for (unsigned c = tid; c < vocab; c += ARGMAX_THREADS) {
            const float v = to_f32(x[c]);
            if (v > best) {
                best = v;
                at = c;
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, best, o);
        const unsigned j = __shfl_xor_sync(0xffffffffu, at, o);
        take_better(best, at, w, j);
    }
    __shared__ float vals[ARGMAX_THREADS / 32];
    __shared__ unsigned idxs[ARGMAX_THREADS / 32];
    if (tid % 32 == 0) {
        vals[tid / 32] = best;
        idxs[tid / 32] = at;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < ARGMAX_THREADS / 32; ++w) take_better(best, at, vals[w], idxs[w]);
        const unsigned t = at == NONE ? 0 : at;
        token[row] = t;
        ring[(size_t)(*pos % ring_len) * gridDim.x + row] = t;
    }
}

#define ARGMAX(T, TN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)                                         \
        wick_argmax_##TN(const T* logits, unsigned vocab, unsigned* token, unsigned* ring, unsigned ring_len, \
                         const unsigned* pos) {                                                           \
        argmax_impl<T>(logits, vocab, token, ring, ring_len, pos);                                        \
    }
ARGMAX(float, f32)
ARGMAX(__half, f16)
ARGMAX(__nv_bfloat16, bf16)
