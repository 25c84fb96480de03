// Metal kernels of the quantized matmul in MLX's float modes (`mxfp4`, `nvfp4`, `mxfp8`; the
// format, bit for bit, is src/quant/fp.rs), beside the CUDA ones (fp.cu): codes along the input
// axis packed little end first into u32 words (8 E2M1 nibbles or 4 E4M3 bytes a word), one u8
// scale per group (mxfp4: 32 values, E8M0; nvfp4: 16 values, E4M3, times g / 2688 with a global
// scale g; mxfp8: 32 E4M3 values, E8M0), no biases. Compiled by Metal at run time
// (src/backend/metal.rs); launch code: src/ops/qmatmul/fp_metal.rs. This file has never been
// compiled by Metal on this project's machines (no Mac); see docs/metal.md.
//
// As in fp.cu the unit of work is a chunk of 32 consecutive values of one row: 4 words (one
// 16-byte load) at 4 bits, 8 words at 8 bits, one mx group or two nvfp4 groups. In the matmuls
// the codes become floats through bit operations and the exact half -> float conversion (as
// MLX's own Metal kernels decode them, half subnormals included): the decoded values are the
// codes' values times a constant power of two, which each group's dot product takes back
// before its scale. Everything accumulates in f32.
//
// Kernels, each for T in {float, half, bfloat} (names: f32, f16, bf16) and each mode:
//   wick_fpmv_<mode>_<T>_m<M>   y (m x n) = x (m x k) . W^T for m <= M input rows, M in
//                               {1, 2, 4, 8} (decode): one SIMD group per output row, lanes
//                               stride over the row's chunks, simd_sum;
//   wick_gfpmv_<mode>_<T>       the same for one input row, gathered (mixture-of-experts
//                               decode): routed row r (threadgroup y) is input row r / xdiv
//                               times matrix ids[r] of the stack, the ids read on the device;
//   wick_fp_dequant_<mode>_<T>  the dense matrix bit for bit as src/quant/fp.rs `dequantize`
//                               rounds it (f32 output with a global scale).
//
// nvfp4's global scale is a device buffer (one f32 per matrix); `has_global` says whether one
// was bound (without one the launcher binds another buffer there, never read).

#include <metal_stdlib>
using namespace metal;

enum : int { FP_MXFP4 = 0, FP_NVFP4 = 1, FP_MXFP8 = 2 };

enum : int {
    FP_SIMDGROUPS = 8,  // fpmv / gfpmv: SIMD groups (output rows) per threadgroup of 256 threads
};

// The decode kernels' sizes (fp_metal.rs `MvDims`).
struct WickFpDims {
    int m;           // input rows (at most the kernel's M)
    int n;           // output features (rows of W)
    int k;           // input features, a multiple of 32
    int has_global;  // nvfp4's global scale bound at buffer 2
};

// The gathered kernel's sizes (fp_metal.rs `GatherDims`).
struct WickFpGatherDims {
    int n;
    int k;
    int experts;     // matrices in the stack: an id at or past it gives a NaN row
    int xdiv;        // routed rows per input row
    int has_global;  // one global scale per matrix at buffer 2
    uint ew;         // u32 words per matrix
    uint es;         // scale bytes per matrix
};

// The dequantize kernel's sizes (fp_metal.rs `DequantDims`).
struct WickFpDequantDims {
    uint units;      // values / 8 (one thread each)
    uint per_mat;    // values per matrix (the global scale of each matrix of a stack)
    int has_global;
};

// The chunk geometry of a mode: u32 words per 32 values, values per scale, scales per chunk.
template <int MODE>
constexpr int fp_words() {
    return MODE == FP_MXFP8 ? 8 : 4;
}
template <int MODE>
constexpr int fp_group() {
    return MODE == FP_NVFP4 ? 16 : 32;
}
template <int MODE>
constexpr int fp_groups() {
    return 32 / fp_group<MODE>();
}

// What the matmuls' decoded codes must be multiplied by to give their values: E2M1 codes
// decode as value * 2^-14, E4M3 codes as value * 2^-8.
template <int MODE>
constexpr float fp_unit() {
    return MODE == FP_MXFP8 ? 256.0f : 16384.0f;
}

// w << s, or w >> -s for a negative s (a constant after inlining).
inline uint fp_shift(uint w, int s) {
    return s >= 0 ? (w << uint(s)) : (w >> uint(-s));
}

// E2M1 codes j and j + 4 of word w (16 bits apart), each as its value * 2^-14: the code's sign
// goes to bit 15 of a half and its three magnitude bits (exponent, mantissa) to bits 9..11, the
// half exponent's lowest two bits and the mantissa's top bit. A half reads exponent e > 0 as
// 2^(e-15) (1 + m/2) = 2^-14 * 2^(e-1) (1 + m/2), the E2M1 value times 2^-14, and the
// subnormal code 1 (0.5) as 2^-15 = 2^-14 * 0.5: every code, signed zero included.
inline float2 fp_e2m1_pair(uint w, int j) {
    const uint h = (fp_shift(w, 12 - 4 * j) & 0x80008000u) | (fp_shift(w, 9 - 4 * j) & 0x0E000E00u);
    return float2(as_type<half2>(h));
}

// The 8 E2M1 codes of a word, each its value * 2^-14.
inline void fp_e2m1_word(uint w, thread float* v) {
    for (int j = 0; j < 4; ++j) {
        const float2 f = fp_e2m1_pair(w, j);
        v[j] = f.x;
        v[j + 4] = f.y;
    }
}

// The 4 E4M3 codes of a word, each its value * 2^-8: bytes (0, 2) and (1, 3) as half pairs,
// sign to bit 15, exponent and mantissa to bits 7..13, which a half reads as the E4M3 value
// * 2^-8 (subnormals as subnormals). NaN codes read as 480 (mlx never writes them).
inline void fp_e4m3_word(uint w, thread float* v) {
    const float2 a = float2(as_type<half2>(((w << 8) & 0x80008000u) | ((w << 7) & 0x3F803F80u)));
    const float2 b = float2(as_type<half2>((w & 0x80008000u) | ((w >> 1) & 0x3F803F80u)));
    v[0] = a.x;
    v[1] = b.x;
    v[2] = a.y;
    v[3] = b.y;
}

// The value of an E4M3 byte exactly as src/quant/fp.rs `e4m3` gives it (bias 7, subnormals
// m * 2^-9, 0x7f / 0xff NaN with the code's sign).
inline float fp_e4m3_value(uint c) {
    const uint em = c & 0x7fu;
    float mag;
    if (em == 0x7fu)
        mag = as_type<float>(0x7fc00000u);
    else if (em >= 8u)
        mag = as_type<float>((em << 20) + (120u << 23));  // exponent e - 7 + 127, mantissa m
    else
        mag = float(em) * 0.001953125f;  // m * 2^-9, exact
    return as_type<float>(as_type<uint>(mag) | ((c & 0x80u) << 24));
}

// An E8M0 scale, 2^(s - 127), as mlx decodes it (through bf16: s == 0 gives 2^-127).
inline float fp_e8m0_value(uint s) {
    return as_type<float>(s == 0u ? 0x00400000u : s << 23);
}

// The multiplier of scale byte s in a mode (without the global scale).
template <int MODE>
inline float fp_scale_value(uint s) {
    return MODE == FP_NVFP4 ? fp_e4m3_value(s) : fp_e8m0_value(s);
}

// All 32 codes of a chunk, as values / fp_unit<MODE>().
template <int MODE>
inline void fp_decode32(thread const uint* w, thread float* q) {
    for (int i = 0; i < fp_words<MODE>(); ++i) {
        if (MODE == FP_MXFP8)
            fp_e4m3_word(w[i], q + 4 * i);
        else
            fp_e2m1_word(w[i], q + 8 * i);
    }
}

// 32 consecutive activations as floats (vector loads: the launcher passes inputs from offset 0
// of their buffer and rows of whole chunks, so a chunk starts 64-byte aligned at least).
template <typename T>
inline void fp_load_x32(const device T* p, thread float* x) {
    const device vec<T, 4>* p4 = (const device vec<T, 4>*)p;
    for (int i = 0; i < 8; ++i) {
        const vec<T, 4> v = p4[i];
        for (int j = 0; j < 4; ++j) x[4 * i + j] = float(v[j]);
    }
}

// One chunk's contribution to an output: per group, the dot product of its inputs and codes,
// back in value units, times the group's scale.
template <int MODE>
inline float fp_chunk_acc(float acc, thread const float* x, thread const float* q, thread const float* s) {
    constexpr int GV = fp_group<MODE>();
    for (int g = 0; g < fp_groups<MODE>(); ++g) {
        float d = 0.0f;
        for (int j = 0; j < GV; ++j) d = fma(x[g * GV + j], q[g * GV + j], d);
        acc = fma(d * fp_unit<MODE>(), s[g], acc);
    }
    return acc;
}

// Output row `row` of y = x . W^T for m_rows <= MM input rows, by one SIMD group (`w`, `sc`:
// the matrix's codes and scale bytes; `factor`: its global scale factor, or 1): lanes stride
// over the row's chunks (a SIMD group's loads read 32 consecutive chunks, 512 contiguous bytes
// at 4 bits). On return every lane holds the sums.
template <typename T, int MODE, int MM>
inline void fp_row(const device uint* w, const device uchar* sc, float factor, const device T* x, int row,
                   int m_rows, int k, uint lane, thread float* acc) {
    constexpr int WORDS = fp_words<MODE>(), GROUPS = fp_groups<MODE>();
    const int chunks = k / 32;
    const device uint* wr = w + (size_t)row * chunks * WORDS;
    const device uchar* sr = sc + (size_t)row * chunks * GROUPS;
    for (int m = 0; m < MM; ++m) acc[m] = 0.0f;
    for (int c = int(lane); c < chunks; c += 32) {
        uint words[WORDS];
        const device uint4* wp = (const device uint4*)(wr + (size_t)c * WORDS);
        for (int i = 0; i < WORDS / 4; ++i) {
            const uint4 v = wp[i];
            words[4 * i] = v.x;
            words[4 * i + 1] = v.y;
            words[4 * i + 2] = v.z;
            words[4 * i + 3] = v.w;
        }
        float s[GROUPS];
        for (int g = 0; g < GROUPS; ++g) s[g] = fp_scale_value<MODE>(uint(sr[c * GROUPS + g])) * factor;
        float q[32];
        fp_decode32<MODE>(words, q);
        for (int m = 0; m < MM; ++m) {
            if (m >= m_rows) break;
            float xv[32];
            fp_load_x32<T>(x + (size_t)m * k + (size_t)c * 32, xv);
            acc[m] = fp_chunk_acc<MODE>(acc[m], xv, q, s);
        }
    }
    for (int m = 0; m < MM; ++m) acc[m] = simd_sum(acc[m]);
}

template <typename T, int MODE, int MM>
kernel void wick_fpmv(const device uint* w [[buffer(0)]], const device uchar* sc [[buffer(1)]],
                      const device float* gscale [[buffer(2)]], const device T* x [[buffer(3)]],
                      device T* y [[buffer(4)]], constant WickFpDims& d [[buffer(5)]],
                      uint tg [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    const int row = int(tg) * FP_SIMDGROUPS + int(sg);
    if (row >= d.n) return;  // the whole SIMD group leaves together
    const float factor = d.has_global != 0 ? gscale[0] / 2688.0f : 1.0f;
    float acc[MM];
    fp_row<T, MODE, MM>(w, sc, factor, x, row, d.m, d.k, lane, acc);
    if (lane == 0) {
        for (int m = 0; m < MM; ++m) {
            if (m >= d.m) break;
            y[(size_t)m * d.n + row] = T(acc[m]);
        }
    }
}

// Routed row r (threadgroup y) of the result is input row r / xdiv times matrix ids[r] of the
// stack (matrix e's codes at w + e * ew words, its scales at sc + e * es bytes, its global
// scale at gscale[e]); threadgroup x covers the n output rows as in wick_fpmv. An id outside
// the stack is not read through: its routed row becomes NaN.
template <typename T, int MODE>
kernel void wick_gfpmv(const device uint* w [[buffer(0)]], const device uchar* sc [[buffer(1)]],
                       const device float* gscale [[buffer(2)]], const device uint* ids [[buffer(3)]],
                       const device T* x [[buffer(4)]], device T* y [[buffer(5)]],
                       constant WickFpGatherDims& d [[buffer(6)]], uint2 tg [[threadgroup_position_in_grid]],
                       uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
    const int row = int(tg.x) * FP_SIMDGROUPS + int(sg);
    if (row >= d.n) return;
    const uint r = tg.y;
    const uint e = ids[r];
    device T* yr = y + (size_t)r * d.n;
    if (e >= uint(d.experts)) {
        if (lane == 0) yr[row] = T(as_type<float>(0x7fc00000u));
        return;
    }
    const float factor = d.has_global != 0 ? gscale[e] / 2688.0f : 1.0f;
    const device T* xr = x + (size_t)(r / uint(d.xdiv)) * d.k;
    float acc[1];
    fp_row<T, MODE, 1>(w + (size_t)e * d.ew, sc + (size_t)e * d.es, factor, xr, row, 1, d.k, lane, acc);
    if (lane == 0) yr[row] = T(acc[0]);
}

// ---- dequantize: the rounding of src/quant/fp.rs `dequantize`, by integer operations ----
//
// Every value there is a product of exact factors rounded once to T (the mx scale is first
// rounded to T, a power of two or 0 or infinity; the product of a code and a scale is exact in
// f32 for every code and scale byte). So the kernel forms the exact product as an integer
// times a power of two and rounds it to T itself, to nearest even, subnormals included: no
// float arithmetic, so nothing depends on how the GPU treats f32 subnormals (an mx scale byte
// of 0 is 2^-127). Only nvfp4 with a global scale is computed in f32 floats, as mlx does:
// code * (scale * (g / 2688)), each step rounded by the GPU (IEEE, fast math off).

// The bits of the magnitude n * 2^k (n < 2^31) in a binary float format of MANT mantissa
// bits, smallest normal exponent EMIN and largest EMAX, rounded to nearest even (infinity
// past the range).
template <int MANT, int EMIN, int EMAX>
inline uint fp_round_bits(uint n, int k) {
    if (n == 0u) return 0u;
    const int p = 31 - int(clz(n));  // n's leading bit
    if (p + k > EMAX) return uint(EMAX - EMIN + 2) << MANT;
    // q: the exponent of the result's last place (the subnormals' below EMIN)
    const int q = max(p + k - MANT, EMIN - MANT);
    const int drop = q - k;  // n's bits below that place
    uint m;
    if (drop <= 0) {
        m = n << uint(-drop);
    } else if (drop >= 32) {
        m = 0u;  // below half the smallest subnormal
    } else {
        m = n >> uint(drop);
        const uint rest = n & ((1u << uint(drop)) - 1u), half_ulp = 1u << uint(drop - 1);
        if (rest > half_ulp || (rest == half_ulp && (m & 1u) != 0u)) m += 1u;
    }
    // m * 2^q: a subnormal's bits are m (q = EMIN - MANT), a normal's carry the implicit bit
    // into the exponent field, and a mantissa rounded up to 2^(MANT+1) the next exponent
    return (uint(q + MANT - EMIN) << MANT) + m;
}

// The output formats: mantissa bits, exponent range, and values from sign and magnitude bits.
// NaN: a quiet NaN with the sign src/quant/fp.rs gives (f16: 0xfd00, what mlx gives, as
// `dequantize_tensor` writes every f16 NaN).
template <typename T>
struct FpOut;

template <>
struct FpOut<float> {
    static constant constexpr int MANT = 23, EMIN = -126, EMAX = 127;
    static float make(uint neg, uint mag) { return as_type<float>((neg << 31) | mag); }
    static float make_nan(uint neg) { return as_type<float>((neg << 31) | 0x7fc00000u); }
};

template <>
struct FpOut<half> {
    static constant constexpr int MANT = 10, EMIN = -14, EMAX = 15;
    static half make(uint neg, uint mag) { return as_type<half>(ushort((neg << 15) | mag)); }
    static half make_nan(uint) { return as_type<half>(ushort(0xfd00u)); }
};

#if __METAL_VERSION__ >= 310
template <>
struct FpOut<bfloat> {
    static constant constexpr int MANT = 7, EMIN = -126, EMAX = 127;
    static bfloat make(uint neg, uint mag) { return as_type<bfloat>(ushort((neg << 15) | mag)); }
    static bfloat make_nan(uint neg) { return as_type<bfloat>(ushort((neg << 15) | 0x7fc0u)); }
};
#endif

// An E2M1 code's sign and magnitude times 2^9 (an integer).
inline uint fp_e2m1_int(uint c, thread uint& neg) {
    neg = (c >> 3) & 1u;
    const uint e = (c >> 1) & 3u, m = c & 1u;
    return e == 0u ? m << 8 : (2u + m) << (e + 7u);
}

// An E4M3 byte's sign and magnitude times 2^9 (an integer); NaN codes set `is_nan`.
inline uint fp_e4m3_int(uint c, thread uint& neg, thread bool& is_nan) {
    neg = (c >> 7) & 1u;
    const uint em = c & 0x7fu, e = em >> 3, m = em & 7u;
    is_nan = em == 0x7fu;
    return e == 0u ? m : (8u + m) << (e - 1u);
}

// mxfp4 / mxfp8: round_T(code * round_T(2^(s - 127))).
template <typename T, int MODE>
inline T fp_dequant_mx(uint c, uint s) {
    typedef FpOut<T> F;
    uint neg;
    bool is_nan = false;
    const uint n = MODE == FP_MXFP8 ? fp_e4m3_int(c, neg, is_nan) : fp_e2m1_int(c, neg);
    if (is_nan) return F::make_nan(neg);
    // the scale rounded to T: 2^e, infinity past T's range, 0 below half its smallest
    // subnormal (half of it, a tie, rounds to the even 0)
    const int e = s == 0u ? -127 : int(s) - 127;
    if (s == 255u || e > F::EMAX) {
        // code * infinity: NaN for a zero code (the default NaN), else infinity
        return n == 0u ? F::make_nan(0u) : F::make(neg, uint(F::EMAX - F::EMIN + 2) << F::MANT);
    }
    if (e < F::EMIN - F::MANT) return F::make(neg, 0u);
    return F::make(neg, fp_round_bits<F::MANT, F::EMIN, F::EMAX>(n, e - 9));
}

// nvfp4 without a global scale: round_T(code * e4m3(s)).
template <typename T>
inline T fp_dequant_nv(uint c, uint s) {
    typedef FpOut<T> F;
    uint neg_c, neg_s;
    bool is_nan;
    const uint nc = fp_e2m1_int(c, neg_c), ns = fp_e4m3_int(s, neg_s, is_nan);
    if (is_nan) return F::make_nan(neg_s);
    return F::make(neg_c ^ neg_s, fp_round_bits<F::MANT, F::EMIN, F::EMAX>(nc * ns, -18));
}

// The dense matrix in T, eight values per thread (one word at 4 bits, two at 8). Rows are
// whole groups, so the group index runs on across rows and matrices.
template <typename T, int MODE>
kernel void wick_fp_dequant(const device uint* w [[buffer(0)]], const device uchar* sc [[buffer(1)]],
                            const device float* gscale [[buffer(2)]], device T* out [[buffer(3)]],
                            constant WickFpDequantDims& d [[buffer(4)]], uint idx [[thread_position_in_grid]]) {
    if (idx >= d.units) return;
    const size_t v0 = (size_t)idx * 8;
    uint codes[8];
    if (MODE == FP_MXFP8) {
        const uint a = w[2 * (size_t)idx], b = w[2 * (size_t)idx + 1];
        for (int j = 0; j < 4; ++j) {
            codes[j] = (a >> (8 * j)) & 0xffu;
            codes[4 + j] = (b >> (8 * j)) & 0xffu;
        }
    } else {
        const uint a = w[idx];
        for (int j = 0; j < 8; ++j) codes[j] = (a >> (4 * j)) & 0xfu;
    }
    const uint s = uint(sc[v0 / fp_group<MODE>()]);
    if (MODE == FP_NVFP4 && d.has_global != 0) {
        // as mlx, in f32: code * (scale * (g / 2688)) (the launcher passes T = float)
        const float f = fp_e4m3_value(s) * (gscale[v0 / d.per_mat] / 2688.0f);
        for (int j = 0; j < 8; ++j) {
            uint neg;
            const uint n = fp_e2m1_int(codes[j], neg);
            const float v = as_type<float>(as_type<uint>(float(n) * 0.001953125f) | (neg << 31));
            out[v0 + j] = T(v * f);
        }
    } else if (MODE == FP_NVFP4) {
        for (int j = 0; j < 8; ++j) out[v0 + j] = fp_dequant_nv<T>(codes[j], s);
    } else {
        for (int j = 0; j < 8; ++j) out[v0 + j] = fp_dequant_mx<T, MODE>(codes[j], s);
    }
}

#define WICK_FP_KERNELS(MODE, MN, T, TN)                                                                  \
    template [[host_name("wick_fpmv_" #MN "_" #TN "_m1")]] [[kernel]] decltype(wick_fpmv<T, MODE, 1>)    \
        wick_fpmv<T, MODE, 1>;                                                                            \
    template [[host_name("wick_fpmv_" #MN "_" #TN "_m2")]] [[kernel]] decltype(wick_fpmv<T, MODE, 2>)    \
        wick_fpmv<T, MODE, 2>;                                                                            \
    template [[host_name("wick_fpmv_" #MN "_" #TN "_m4")]] [[kernel]] decltype(wick_fpmv<T, MODE, 4>)    \
        wick_fpmv<T, MODE, 4>;                                                                            \
    template [[host_name("wick_fpmv_" #MN "_" #TN "_m8")]] [[kernel]] decltype(wick_fpmv<T, MODE, 8>)    \
        wick_fpmv<T, MODE, 8>;                                                                            \
    template [[host_name("wick_gfpmv_" #MN "_" #TN)]] [[kernel]] decltype(wick_gfpmv<T, MODE>)           \
        wick_gfpmv<T, MODE>;                                                                              \
    template [[host_name("wick_fp_dequant_" #MN "_" #TN)]] [[kernel]] decltype(wick_fp_dequant<T, MODE>) \
        wick_fp_dequant<T, MODE>;

#define WICK_FP_MODES(T, TN)                                                                              \
    WICK_FP_KERNELS(FP_MXFP4, mxfp4, T, TN) WICK_FP_KERNELS(FP_NVFP4, nvfp4, T, TN)                      \
        WICK_FP_KERNELS(FP_MXFP8, mxfp8, T, TN)

WICK_FP_MODES(float, f32)
WICK_FP_MODES(half, f16)
#if __METAL_VERSION__ >= 310
WICK_FP_MODES(bfloat, bf16)
#endif
