//! CPU building blocks shared by the dense and the quantized matmul ops: element conversion,
//! a lane-parallel dot product the compiler vectorizes, and the two matmul drivers — a
//! matrix-vector path for decode (rayon over output rows, each weight row read once for all
//! inputs) and a matrix-matrix path for prefill (weight tiles decoded to f32, then gemm).

use half::{bf16, f16};
use rayon::prelude::*;

/// A float element type of activations and weights.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    fn from_f32(x: f32) -> Self;
    /// `Σ x·w` with `w` converted on the fly, accumulated in f32.
    fn dot(x: &[f32], w: &[Self]) -> f32;
    /// `y += a·x`.
    #[inline]
    fn axpy(a: f32, x: &[Self], y: &mut [f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * xi.to_f32();
        }
    }
    /// Four rows at once, where a fused kernel exists.
    fn dot4(_x: &[f32], _w: [&[Self]; 4]) -> Option<[f32; 4]> {
        None
    }
    /// Whether [`Elem::dot4_many`] has a fused kernel on this build.
    const DOT4_MANY: bool = false;
    /// [`Elem::dot4`] for each of the `m` input rows of `xs` (m × row length) into `out[i]`,
    /// where a fused kernel exists (see [`Elem::DOT4_MANY`]); each result equals `dot4`'s.
    fn dot4_many(_xs: &[f32], _m: usize, _w: [&[Self]; 4], _out: &mut [[f32; 4]]) -> bool {
        false
    }
    /// The slice itself when the type is f32.
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f32_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn dot(x: &[f32], w: &[f32]) -> f32 {
        dot(x, w)
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}

/// The conversions every 16-bit float type shares; `dot`/`dot4` name its SIMD kernels.
macro_rules! half_elem {
    ($t:ty, $dot:path $(, $dot4:path, $many:path)?) => {
        impl Elem for $t {
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn to_f32_slice(src: &[$t], dst: &mut [f32]) {
                use half::slice::HalfFloatSliceExt;
                src.convert_to_f32_slice(dst);
            }
            fn from_f32(x: f32) -> $t {
                <$t>::from_f32(x)
            }
            fn dot(x: &[f32], w: &[$t]) -> f32 {
                $dot(x, w)
            }
            $(fn dot4(x: &[f32], w: [&[$t]; 4]) -> Option<[f32; 4]> {
                $dot4(x, w)
            }
            const DOT4_MANY: bool = cfg!(all(target_arch = "x86_64", target_feature = "avx512f"));
            fn dot4_many(xs: &[f32], m: usize, w: [&[$t]; 4], out: &mut [[f32; 4]]) -> bool {
                $many(xs, m, w, out)
            })?
        }
    };
}

half_elem!(f16, simd::dot_f16, simd::dot4_f16, simd::dot4_f16_many);
half_elem!(bf16, simd::dot_bf16);

/// `Σ a·b` in f32.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot_f32(a, b)
}

/// Explicit SIMD where the build targets AVX2+FMA (+F16C); portable loops elsewhere (the
/// compiler vectorizes them for NEON on Apple Silicon).
pub mod simd {
    use half::{bf16, f16};

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    mod x86 {
        use std::arch::x86_64::*;

        #[inline(always)]
        pub unsafe fn hsum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        /// Σ a·b over the first `n` (a multiple of 32) elements.
        #[inline(always)]
        pub unsafe fn dot_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < n {
                for (j, a_) in acc.iter_mut().enumerate() {
                    *a_ = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8 * j)), _mm256_loadu_ps(b.add(i + 8 * j)), *a_);
                }
                i += 32;
            }
            hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
        }

        /// Σ x·w for f16 `w` (raw bits), first `n` (multiple of 32) elements.
        #[cfg(target_feature = "f16c")]
        #[inline(always)]
        pub unsafe fn dot_f16(x: *const f32, w: *const u16, n: usize) -> f32 {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < n {
                for (j, a_) in acc.iter_mut().enumerate() {
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(i + 8 * j) as *const __m128i));
                    *a_ = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i + 8 * j)), wv, *a_);
                }
                i += 32;
            }
            hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
        }

        /// Σ x·w_r for four f16 rows at once (more loads in flight), first `n` (multiple of 16).
        #[cfg(target_feature = "f16c")]
        #[inline(always)]
        pub unsafe fn dot4_f16(x: *const f32, w: [*const u16; 4], n: usize) -> [f32; 4] {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut i = 0;
            while i < n {
                let x0 = _mm256_loadu_ps(x.add(i));
                let x1 = _mm256_loadu_ps(x.add(i + 8));
                for r in 0..4 {
                    let w0 = _mm256_cvtph_ps(_mm_loadu_si128(w[r].add(i) as *const __m128i));
                    let w1 = _mm256_cvtph_ps(_mm_loadu_si128(w[r].add(i + 8) as *const __m128i));
                    acc[r][0] = _mm256_fmadd_ps(x0, w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(x1, w1, acc[r][1]);
                }
                i += 16;
            }
            [
                hsum(_mm256_add_ps(acc[0][0], acc[0][1])),
                hsum(_mm256_add_ps(acc[1][0], acc[1][1])),
                hsum(_mm256_add_ps(acc[2][0], acc[2][1])),
                hsum(_mm256_add_ps(acc[3][0], acc[3][1])),
            ]
        }

        /// Σ x·w for bf16 `w` (raw bits), first `n` (multiple of 32) elements.
        #[inline(always)]
        pub unsafe fn dot_bf16(x: *const f32, w: *const u16, n: usize) -> f32 {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < n {
                for (j, a_) in acc.iter_mut().enumerate() {
                    let h = _mm_loadu_si128(w.add(i + 8 * j) as *const __m128i);
                    let wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                    *a_ = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i + 8 * j)), wv, *a_);
                }
                i += 32;
            }
            hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
        }

        /// Σ x·q over 8·`words` 4-bit codes packed little-endian in u32 words.
        #[inline(always)]
        pub unsafe fn dot_q4(x: *const f32, words: *const u32, nwords: usize) -> f32 {
            let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let mask = _mm256_set1_epi32(0xf);
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 1 < nwords {
                let q0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*words.add(i) as i32), shifts), mask);
                let q1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*words.add(i + 1) as i32), shifts), mask);
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8 * i)), _mm256_cvtepi32_ps(q0), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8 * i + 8)), _mm256_cvtepi32_ps(q1), acc1);
                i += 2;
            }
            if i < nwords {
                let q0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*words.add(i) as i32), shifts), mask);
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8 * i)), _mm256_cvtepi32_ps(q0), acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1))
        }

        /// Σ_g scale(g)·(x_g·q_g) over one row of 4-bit codes, `gw` words per group; one
        /// horizontal sum per row.
        #[inline(always)]
        pub unsafe fn row_affine_q4(
            x: *const f32,
            words: *const u32,
            groups: usize,
            gw: usize,
            scale: impl Fn(usize) -> f32,
        ) -> f32 {
            let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let mask = _mm256_set1_epi32(0xf);
            let mut acc = _mm256_setzero_ps();
            for g in 0..groups {
                let w = words.add(g * gw);
                let xg = x.add(g * gw * 8);
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut i = 0;
                while i + 1 < gw {
                    let q0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*w.add(i) as i32), shifts), mask);
                    let q1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*w.add(i + 1) as i32), shifts), mask);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg.add(8 * i)), _mm256_cvtepi32_ps(q0), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xg.add(8 * i + 8)), _mm256_cvtepi32_ps(q1), a1);
                    i += 2;
                }
                if i < gw {
                    let q0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*w.add(i) as i32), shifts), mask);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg.add(8 * i)), _mm256_cvtepi32_ps(q0), a0);
                }
                acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scale(g)), acc);
            }
            hsum(acc)
        }

        /// As [`row_affine_q4`] for 8-bit codes (`gw` words = group/4, a multiple of 4).
        #[inline(always)]
        pub unsafe fn row_affine_q8(
            x: *const f32,
            words: *const u32,
            groups: usize,
            gw: usize,
            scale: impl Fn(usize) -> f32,
        ) -> f32 {
            let bytes = words as *const u8;
            let gs = gw * 4;
            let mut acc = _mm256_setzero_ps();
            for g in 0..groups {
                let b = bytes.add(g * gs);
                let xg = x.add(g * gs);
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut i = 0;
                while i < gs {
                    let v = _mm_loadu_si128(b.add(i) as *const __m128i);
                    let q0 = _mm256_cvtepu8_epi32(v);
                    let q1 = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg.add(i)), _mm256_cvtepi32_ps(q0), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xg.add(i + 8)), _mm256_cvtepi32_ps(q1), a1);
                    i += 16;
                }
                acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scale(g)), acc);
            }
            hsum(acc)
        }

        /// Σ x·q over 4·`words` 8-bit codes.
        #[inline(always)]
        pub unsafe fn dot_q8(x: *const f32, words: *const u32, nwords: usize) -> f32 {
            let bytes = words as *const u8;
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0; // in bytes
            let n = nwords * 4;
            while i + 16 <= n {
                let b = _mm_loadu_si128(bytes.add(i) as *const __m128i);
                let q0 = _mm256_cvtepu8_epi32(b);
                let q1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i)), _mm256_cvtepi32_ps(q0), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i + 8)), _mm256_cvtepi32_ps(q1), acc1);
                i += 16;
            }
            let mut s = hsum(_mm256_add_ps(acc0, acc1));
            while i < n {
                s += *x.add(i) * (*bytes.add(i)) as f32;
                i += 1;
            }
            s
        }
    }

    /// AVX-512 kernels for 4- and 8-bit rows, used where the build targets AVX-512F.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    mod x86_512 {
        use std::arch::x86_64::*;

        /// How far ahead (bytes) the kernels prefetch each weight stream.
        const PREFETCH: usize = 1024;

        /// Where row `r` of a block of quantized rows lives: its packed bytes, scales and biases.
        #[derive(Clone, Copy)]
        pub struct Rows {
            pub codes: *const u8,
            pub row_bytes: usize,
            pub scales: *const f32,
            pub biases: *const f32,
            pub groups: usize,
            pub gs: usize,
        }

        /// Σ_g b(r, g)·xsum_g: the bias part of each row's product.
        #[inline(always)]
        unsafe fn bias_dots<const N: usize>(w: Rows, r0: usize, xsum: *const f32) -> [f32; N] {
            std::array::from_fn(|r| {
                let b = w.biases.add((r0 + r) * w.groups);
                (0..w.groups).map(|g| *b.add(g) * *xsum.add(g)).sum()
            })
        }

        /// Rows `r0 .. r0 + N` of `BITS`-bit codes (4 or 8). Each step widens 16 packed bytes
        /// straight from memory to 16 lanes: for 8 bits, 16 codes; for 4 bits, 32 codes, the
        /// low nibbles at even positions and the high ones at odd positions, so the input must
        /// be permuted by [`super::permute_x_q4`]. The input is loaded once for all rows and
        /// `N` weight streams are in flight.
        #[inline(always)]
        pub unsafe fn rows_affine<const N: usize, const BITS: usize>(
            x: *const f32,
            xsum: *const f32,
            w: Rows,
            r0: usize,
        ) -> [f32; N] {
            let m4 = _mm512_set1_epi32(0x0f);
            let step = 128 / BITS;
            let mut acc = [_mm512_setzero_ps(); N];
            let bytes: [*const u8; N] = std::array::from_fn(|r| w.codes.add((r0 + r) * w.row_bytes));
            for g in 0..w.groups {
                let mut ga = [_mm512_setzero_ps(); N];
                let mut c = g * w.gs;
                while c < (g + 1) * w.gs {
                    let at = c * BITS / 8;
                    let x0 = _mm512_loadu_ps(x.add(c));
                    for r in 0..N {
                        _mm_prefetch::<_MM_HINT_T0>(bytes[r].add(at + PREFETCH) as *const i8);
                        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes[r].add(at) as *const __m128i));
                        if BITS == 4 {
                            let lo = _mm512_and_si512(v, m4);
                            let hi = _mm512_srli_epi32::<4>(v);
                            let x1 = _mm512_loadu_ps(x.add(c + 16));
                            ga[r] = _mm512_fmadd_ps(x0, _mm512_cvtepi32_ps(lo), ga[r]);
                            ga[r] = _mm512_fmadd_ps(x1, _mm512_cvtepi32_ps(hi), ga[r]);
                        } else {
                            ga[r] = _mm512_fmadd_ps(x0, _mm512_cvtepi32_ps(v), ga[r]);
                        }
                    }
                    c += step;
                }
                for r in 0..N {
                    let s = _mm512_set1_ps(*w.scales.add((r0 + r) * w.groups + g));
                    acc[r] = _mm512_fmadd_ps(ga[r], s, acc[r]);
                }
            }
            let bias = bias_dots::<N>(w, r0, xsum);
            std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]) + bias[r])
        }

        /// [`rows_affine`] for four rows against `G` input rows at once: each weight block is
        /// widened once for all `G` inputs. Every (input, row) pair sums in exactly the order
        /// `rows_affine` uses, so a batch row gets the same bits as the row alone.
        #[inline(always)]
        pub unsafe fn rows_affine_many<const G: usize, const BITS: usize>(
            x: [*const f32; G],
            xsum: [*const f32; G],
            w: Rows,
            r0: usize,
        ) -> [[f32; 4]; G] {
            let m4 = _mm512_set1_epi32(0x0f);
            let step = 128 / BITS;
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            let bytes: [*const u8; 4] = std::array::from_fn(|r| w.codes.add((r0 + r) * w.row_bytes));
            for g in 0..w.groups {
                let mut ga = [[_mm512_setzero_ps(); 4]; G];
                let mut c = g * w.gs;
                while c < (g + 1) * w.gs {
                    let at = c * BITS / 8;
                    let mut lo = [_mm512_setzero_ps(); 4];
                    let mut hi = [_mm512_setzero_ps(); 4];
                    for r in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(bytes[r].add(at + PREFETCH) as *const i8);
                        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes[r].add(at) as *const __m128i));
                        if BITS == 4 {
                            lo[r] = _mm512_cvtepi32_ps(_mm512_and_si512(v, m4));
                            hi[r] = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
                        } else {
                            lo[r] = _mm512_cvtepi32_ps(v);
                        }
                    }
                    for i in 0..G {
                        let x0 = _mm512_loadu_ps(x[i].add(c));
                        if BITS == 4 {
                            let x1 = _mm512_loadu_ps(x[i].add(c + 16));
                            for r in 0..4 {
                                ga[i][r] = _mm512_fmadd_ps(x0, lo[r], ga[i][r]);
                                ga[i][r] = _mm512_fmadd_ps(x1, hi[r], ga[i][r]);
                            }
                        } else {
                            for r in 0..4 {
                                ga[i][r] = _mm512_fmadd_ps(x0, lo[r], ga[i][r]);
                            }
                        }
                    }
                    c += step;
                }
                for r in 0..4 {
                    let s = _mm512_set1_ps(*w.scales.add((r0 + r) * w.groups + g));
                    for i in 0..G {
                        acc[i][r] = _mm512_fmadd_ps(ga[i][r], s, acc[i][r]);
                    }
                }
            }
            std::array::from_fn(|i| {
                let bias = bias_dots::<4>(w, r0, xsum[i]);
                std::array::from_fn(|r| _mm512_reduce_add_ps(acc[i][r]) + bias[r])
            })
        }
    }

    /// Four f16 rows at once with AVX-512 (16 halves per load), `n` a multiple of 32.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    #[inline(always)]
    unsafe fn dot4_f16_512(x: *const f32, w: [*const u16; 4], n: usize) -> [f32; 4] {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            let x0 = _mm512_loadu_ps(x.add(i));
            let x1 = _mm512_loadu_ps(x.add(i + 16));
            for r in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(w[r].add(i + 2048) as *const i8);
                let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(w[r].add(i) as *const __m256i));
                let w1 = _mm512_cvtph_ps(_mm256_loadu_si256(w[r].add(i + 16) as *const __m256i));
                acc[r] = _mm512_fmadd_ps(x0, w0, acc[r]);
                acc[r] = _mm512_fmadd_ps(x1, w1, acc[r]);
            }
            i += 32;
        }
        [
            _mm512_reduce_add_ps(acc[0]),
            _mm512_reduce_add_ps(acc[1]),
            _mm512_reduce_add_ps(acc[2]),
            _mm512_reduce_add_ps(acc[3]),
        ]
    }

    /// [`dot4_f16_512`] against `G` input rows at once: each weight load is widened once for
    /// all `G` inputs, and every (input, row) pair sums in `dot4_f16_512`'s order, so a batch
    /// row gets the same bits as the row alone.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    #[inline(always)]
    unsafe fn dot4_f16_512_many<const G: usize>(x: [*const f32; G], w: [*const u16; 4], n: usize) -> [[f32; 4]; G] {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 4]; G];
        let mut i = 0;
        while i < n {
            let mut w0 = [_mm512_setzero_ps(); 4];
            let mut w1 = [_mm512_setzero_ps(); 4];
            for r in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(w[r].add(i + 2048) as *const i8);
                w0[r] = _mm512_cvtph_ps(_mm256_loadu_si256(w[r].add(i) as *const __m256i));
                w1[r] = _mm512_cvtph_ps(_mm256_loadu_si256(w[r].add(i + 16) as *const __m256i));
            }
            for g in 0..G {
                let x0 = _mm512_loadu_ps(x[g].add(i));
                let x1 = _mm512_loadu_ps(x[g].add(i + 16));
                for r in 0..4 {
                    acc[g][r] = _mm512_fmadd_ps(x0, w0[r], acc[g][r]);
                    acc[g][r] = _mm512_fmadd_ps(x1, w1[r], acc[g][r]);
                }
            }
            i += 32;
        }
        std::array::from_fn(|g| std::array::from_fn(|r| _mm512_reduce_add_ps(acc[g][r])))
    }

    /// Input rows handled together by the multi-input kernels.
    pub const MANY: usize = 4;

    /// `out[i] = x_i · w_r` (r = 0..4) for the `m` input rows of `xs` (m × n) against four f16
    /// rows of length n; `false` where there is no fused kernel (then nothing is written).
    /// Each result equals [`dot4_f16`]'s for that input row alone.
    #[inline]
    pub fn dot4_f16_many(xs: &[f32], m: usize, w: [&[f16]; 4], out: &mut [[f32; 4]]) -> bool {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            let n = w[0].len();
            if n.is_multiple_of(32) && w.iter().all(|r| r.len() == n) && xs.len() >= m * n && out.len() >= m {
                let p = w.map(|r| r.as_ptr() as *const u16);
                let row = |i: usize| xs[i * n..].as_ptr();
                let mut i = 0;
                // SAFETY: every input row and all four weight rows hold n elements (checked
                // above), n is a multiple of 32; prefetches past the end are only hints.
                unsafe {
                    while i + MANY <= m {
                        let r = dot4_f16_512_many::<MANY>(std::array::from_fn(|g| row(i + g)), p, n);
                        out[i..i + MANY].copy_from_slice(&r);
                        i += MANY;
                    }
                    match m - i {
                        0 => {}
                        1 => out[i] = dot4_f16_512_many::<1>([row(i)], p, n)[0],
                        2 => out[i..m].copy_from_slice(&dot4_f16_512_many::<2>([row(i), row(i + 1)], p, n)),
                        _ => out[i..m].copy_from_slice(&dot4_f16_512_many::<3>([row(i), row(i + 1), row(i + 2)], p, n)),
                    }
                }
                return true;
            }
        }
        let _ = (xs, m, w, out);
        false
    }
    /// The input of 4- or 8-bit rows as the AVX-512 block kernels ([`block_affine`]) read it,
    /// built once per matmul: permuted by [`permute_x_q4`] for 4 bits, as it is for 8. `None`
    /// on builds without AVX-512 (the AVX2 and portable paths read `x` directly), for other
    /// widths, or for group sizes that are not a multiple of 32.
    pub fn affine_input(xs: &[f32], bits: usize, gs: usize) -> Option<Vec<f32>> {
        if !has_affine_blocks(bits, gs) {
            return None;
        }
        Some(if bits == 4 { permute_x_q4(xs) } else { xs.to_vec() })
    }

    /// Whether the AVX-512 block kernels ([`block_affine`], [`block_affine_many`]) serve
    /// `bits`-bit rows in groups of `gs` on this build.
    pub fn has_affine_blocks(bits: usize, gs: usize) -> bool {
        cfg!(all(target_arch = "x86_64", target_feature = "avx512f")) && matches!(bits, 4 | 8) && gs.is_multiple_of(32)
    }

    /// Reorders each run of 32 inputs as [even positions, odd positions] to match the nibble
    /// order of 16 packed bytes.
    pub fn permute_x_q4(x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for (src, dst) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
            for j in 0..16 {
                dst[j] = src[2 * j];
                dst[16 + j] = src[2 * j + 1];
            }
        }
        out
    }

    /// `out[r] = Σ_g s[r,g]·(x_g·q[r,g]) + b[r,g]·xsum_g` for the `out.len()` rows of
    /// `bits`-bit codes (4 or 8) in `words` (`k·bits / 32` words each, scales and biases
    /// `k / gs` each) against input row `i` of `xp` (rows of `k` values from
    /// [`affine_input`]; `xsum` that row's group sums). AVX-512 builds only.
    #[allow(clippy::too_many_arguments)]
    pub fn block_affine(
        bits: usize,
        xp: &[f32],
        i: usize,
        k: usize,
        gs: usize,
        words: &[u32],
        scales: &[f32],
        biases: &[f32],
        xsum: &[f32],
        out: &mut [f32],
    ) {
        let (rows, groups) = (out.len(), k / gs);
        assert!(bits == 4 || bits == 8);
        assert!(k.is_multiple_of(gs) && gs.is_multiple_of(32) && xp.len() >= (i + 1) * k);
        assert!(words.len() * 32 >= rows * k * bits && xsum.len() >= groups);
        assert!(scales.len() >= rows * groups && biases.len() >= rows * groups);
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            let w = x86_512::Rows {
                codes: words.as_ptr() as *const u8,
                row_bytes: k * bits / 8,
                scales: scales.as_ptr(),
                biases: biases.as_ptr(),
                groups,
                gs,
            };
            let (xp, xs) = (xp[i * k..].as_ptr(), xsum.as_ptr());
            // SAFETY: the asserts above bound every row's codes, scales and biases and the
            // input row; gs is a multiple of 32, the kernels' step.
            let mut r = 0;
            while r + 4 <= rows {
                let d = unsafe {
                    if bits == 4 {
                        x86_512::rows_affine::<4, 4>(xp, xs, w, r)
                    } else {
                        x86_512::rows_affine::<4, 8>(xp, xs, w, r)
                    }
                };
                out[r..r + 4].copy_from_slice(&d);
                r += 4;
            }
            while r < rows {
                let d = unsafe {
                    if bits == 4 {
                        x86_512::rows_affine::<1, 4>(xp, xs, w, r)
                    } else {
                        x86_512::rows_affine::<1, 8>(xp, xs, w, r)
                    }
                };
                out[r] = d[0];
                r += 1;
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        {
            let _ = (xp, i, words, scales, biases, xsum, out);
            unreachable!("affine_input builds inputs only on AVX-512 builds")
        }
    }

    /// [`block_affine`] for all `m` input rows of `xp` at once: `out[j·m + i]` is input row
    /// `i` against row `j` of the block, bit for bit what `block_affine` gives for that input
    /// row alone; `xsum` holds the m rows' group sums. AVX-512 builds only.
    #[allow(clippy::too_many_arguments)]
    pub fn block_affine_many(
        bits: usize,
        xp: &[f32],
        m: usize,
        k: usize,
        gs: usize,
        words: &[u32],
        scales: &[f32],
        biases: &[f32],
        xsum: &[f32],
        out: &mut [f32],
    ) {
        let (rows, groups) = (out.len() / m, k / gs);
        assert!(bits == 4 || bits == 8);
        assert!(k.is_multiple_of(gs) && gs.is_multiple_of(32) && xp.len() >= m * k);
        assert!(words.len() * 32 >= rows * k * bits && xsum.len() >= m * groups);
        assert!(scales.len() >= rows * groups && biases.len() >= rows * groups);
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            let w = x86_512::Rows {
                codes: words.as_ptr() as *const u8,
                row_bytes: k * bits / 8,
                scales: scales.as_ptr(),
                biases: biases.as_ptr(),
                groups,
                gs,
            };
            let x = |i: usize| xp[i * k..].as_ptr();
            let xs = |i: usize| xsum[i * groups..].as_ptr();
            fn put<const G: usize>(out: &mut [f32], m: usize, i0: usize, d: [[f32; 4]; G], r: usize) {
                for (g, row) in d.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        out[(r + j) * m + i0 + g] = *v;
                    }
                }
            }
            macro_rules! many {
                ($g:literal, $i:expr, $r:expr) => {{
                    let (xr, sr) = (std::array::from_fn(|g| x($i + g)), std::array::from_fn(|g| xs($i + g)));
                    // SAFETY: the asserts above bound the codes, scales and biases of rows
                    // r..r+4 and the input rows i..i+G; gs is a multiple of 32.
                    let d = unsafe {
                        if bits == 4 {
                            x86_512::rows_affine_many::<$g, 4>(xr, sr, w, $r)
                        } else {
                            x86_512::rows_affine_many::<$g, 8>(xr, sr, w, $r)
                        }
                    };
                    put::<$g>(out, m, $i, d, $r);
                }};
            }
            let mut r = 0;
            while r + 4 <= rows {
                let mut i = 0;
                while i + MANY <= m {
                    many!(4, i, r);
                    i += MANY;
                }
                match m - i {
                    0 => {}
                    1 => many!(1, i, r),
                    2 => many!(2, i, r),
                    _ => many!(3, i, r),
                }
                r += 4;
            }
            for j in r..rows {
                for i in 0..m {
                    // SAFETY: as above, for the single row j and input row i.
                    let d = unsafe {
                        if bits == 4 {
                            x86_512::rows_affine::<1, 4>(x(i), xs(i), w, j)
                        } else {
                            x86_512::rows_affine::<1, 8>(x(i), xs(i), w, j)
                        }
                    };
                    out[j * m + i] = d[0];
                }
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        {
            let _ = (xp, words, scales, biases, xsum, out);
            unreachable!("affine_input builds inputs only on AVX-512 builds")
        }
    }

    fn dot_tail<T: Copy>(x: &[f32], w: &[T], f: impl Fn(T) -> f32) -> f32 {
        let mut acc = [0f32; 8];
        let cx = x.chunks_exact(8);
        let cw = w.chunks_exact(8);
        let (rx, rw) = (cx.remainder(), cw.remainder());
        for (a, b) in cx.zip(cw) {
            for i in 0..8 {
                acc[i] += a[i] * f(b[i]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (a, b) in rx.iter().zip(rw) {
            s += a * f(*b);
        }
        s
    }

    /// Σ a·b.
    #[inline]
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            let main = n / 32 * 32;
            // SAFETY: both slices hold at least `main` elements; the target has AVX2 and FMA.
            let s = unsafe { x86::dot_f32(a.as_ptr(), b.as_ptr(), main) };
            s + dot_tail(&a[main..n], &b[main..n], |v| v)
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        {
            dot_tail(&a[..n], &b[..n], |v| v)
        }
    }

    /// Σ x·w for f16 `w`.
    #[inline]
    pub fn dot_f16(x: &[f32], w: &[f16]) -> f32 {
        let n = x.len().min(w.len());
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        {
            let main = n / 32 * 32;
            // SAFETY: both slices hold at least `main` elements; f16 is 16 raw bits.
            let s = unsafe { x86::dot_f16(x.as_ptr(), w.as_ptr() as *const u16, main) };
            s + dot_tail(&x[main..n], &w[main..n], |v| v.to_f32())
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )))]
        {
            dot_tail(&x[..n], &w[..n], |v| v.to_f32())
        }
    }

    /// Σ x·w_r for four f16 rows of x's length; `None` where there is no fast path.
    #[inline]
    pub fn dot4_f16(x: &[f32], w: [&[f16]; 4]) -> Option<[f32; 4]> {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            let n = x.len();
            if n.is_multiple_of(32) && w.iter().all(|r| r.len() == n) {
                let p = w.map(|r| r.as_ptr() as *const u16);
                // SAFETY: all four rows and x hold n elements, n is a multiple of 32; prefetch
                // addresses past the end are hints and never dereferenced.
                return Some(unsafe { dot4_f16_512(x.as_ptr(), p, n) });
            }
        }
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        {
            let n = x.len();
            if n.is_multiple_of(16) && w.iter().all(|r| r.len() == n) {
                let p = w.map(|r| r.as_ptr() as *const u16);
                // SAFETY: all four rows and x hold n elements, n is a multiple of 16.
                return Some(unsafe { x86::dot4_f16(x.as_ptr(), p, n) });
            }
        }
        let _ = (x, w);
        None
    }

    /// Σ x·w for bf16 `w`.
    #[inline]
    pub fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
        let n = x.len().min(w.len());
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            let main = n / 32 * 32;
            // SAFETY: both slices hold at least `main` elements; bf16 is 16 raw bits.
            let s = unsafe { x86::dot_bf16(x.as_ptr(), w.as_ptr() as *const u16, main) };
            s + dot_tail(&x[main..n], &w[main..n], |v| v.to_f32())
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        {
            dot_tail(&x[..n], &w[..n], |v| v.to_f32())
        }
    }

    /// Σ_g scale(g)·(x_g·q_g) over a row of `groups` groups of `gs` codes of `bits` bits.
    #[inline]
    pub fn row_affine(x: &[f32], words: &[u32], bits: usize, gs: usize, scale: impl Fn(usize) -> f32) -> f32 {
        let groups = x.len() / gs;
        let gw = gs * bits / 32;
        debug_assert!(words.len() >= groups * gw);
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            // SAFETY: x holds groups·gs values and words groups·gw words (checked by the callers'
            // shapes); group sizes are multiples of 32, so 8-bit groups are whole 16-byte steps.
            if bits == 4 {
                return unsafe { x86::row_affine_q4(x.as_ptr(), words.as_ptr(), groups, gw, scale) };
            }
            if bits == 8 {
                return unsafe { x86::row_affine_q8(x.as_ptr(), words.as_ptr(), groups, gw, scale) };
            }
        }
        let mut acc = 0f32;
        for g in 0..groups {
            acc += scale(g) * dot_codes(&x[g * gs..(g + 1) * gs], &words[g * gw..(g + 1) * gw], bits);
        }
        acc
    }

    /// Σ x·q for codes of `bits` bits packed in `words` (x.len() = words.len()·32/bits).
    #[inline]
    pub fn dot_codes(x: &[f32], words: &[u32], bits: usize) -> f32 {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            // SAFETY: x holds 32/bits values per word, checked below.
            if bits == 4 && x.len() >= words.len() * 8 {
                return unsafe { x86::dot_q4(x.as_ptr(), words.as_ptr(), words.len()) };
            }
            if bits == 8 && x.len() >= words.len() * 4 {
                return unsafe { x86::dot_q8(x.as_ptr(), words.as_ptr(), words.len()) };
            }
        }
        let mut q = [0f32; 256];
        let n = words.len() * 32 / bits;
        let mut s = 0f32;
        let mut done = 0;
        // in chunks of 256 codes (a multiple of every pack size)
        while done < n {
            let cnt = 256.min(n - done);
            let w0 = done * bits / 32;
            let w1 = (done + cnt) * bits / 32;
            crate::quant::affine::unpack_row_f32(&words[w0..w1], bits, &mut q[..cnt]);
            s += dot_f32(&x[done..done + cnt], &q[..cnt]);
            done += cnt;
        }
        s
    }

    /// Σ_g scales[g] · Σ_{j ∈ g} x_j · code_j over a row of mlx's float-mode codes: E2M1 nibbles
    /// (`fp8 == false`, 8 a word) or E4M3 bytes (4 a word), `wpg` words per group of one scale.
    /// `x` holds one value per code.
    #[inline]
    pub fn dot_fp_row(x: &[f32], words: &[u32], scales: &[f32], wpg: usize, fp8: bool) -> f32 {
        let per = if fp8 { 4 } else { 8 };
        assert!(x.len() >= words.len() * per && scales.len() * wpg >= words.len(), "dot_fp_row: short row");
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if wpg.is_multiple_of(2) {
            // SAFETY: the lengths were checked above; the target has AVX2 and FMA.
            return unsafe {
                if fp8 {
                    x86_fp::dot_e4m3_row(x.as_ptr(), words.as_ptr(), scales.as_ptr(), words.len(), wpg)
                } else {
                    x86_fp::dot_e2m1_row(x.as_ptr(), words.as_ptr(), scales.as_ptr(), words.len(), wpg)
                }
            };
        }
        dot_fp_row_portable(x, words, scales, wpg, fp8)
    }

    /// [`dot_fp_row`] without explicit SIMD (what targets without AVX2 run; also the reference
    /// the SIMD form is tested against).
    pub fn dot_fp_row_portable(x: &[f32], words: &[u32], scales: &[f32], wpg: usize, fp8: bool) -> f32 {
        let per = if fp8 { 4 } else { 8 };
        let mut total = 0f32;
        for (g, (ws, &sc)) in words.chunks(wpg).zip(scales).enumerate() {
            let mut acc = 0f32;
            for (w, &word) in ws.iter().enumerate() {
                let xs = &x[(g * wpg + w) * per..];
                for (j, &xv) in xs.iter().take(per).enumerate() {
                    let v = if fp8 {
                        crate::quant::fp::e4m3((word >> (8 * j)) as u8)
                    } else {
                        crate::quant::fp::E2M1[((word >> (4 * j)) & 15) as usize]
                    };
                    acc += xv * v;
                }
            }
            total += acc * sc;
        }
        total
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    mod x86_fp {
        use super::x86::hsum;
        use std::arch::x86_64::*;

        /// [`super::dot_fp_row`] of E2M1 codes: each word's 8 nibbles spread over the lanes, the
        /// magnitude looked up in a register (`permutevar8x32`), the sign bit moved onto the float's.
        #[inline(always)]
        pub unsafe fn dot_e2m1_row(x: *const f32, words: *const u32, scales: *const f32, n: usize, wpg: usize) -> f32 {
            let lut = _mm256_setr_ps(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0);
            let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let (m7, m8) = (_mm256_set1_epi32(7), _mm256_set1_epi32(8));
            let decode = |w: u32| -> __m256 {
                let v = _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts);
                let mag = _mm256_permutevar8x32_ps(lut, _mm256_and_si256(v, m7));
                let sign = _mm256_slli_epi32(_mm256_and_si256(v, m8), 28);
                _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(mag), sign))
            };
            let mut total = _mm256_setzero_ps();
            let mut i = 0;
            let mut g = 0;
            while i < n {
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let end = i + wpg;
                while i < end {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8 * i)), decode(*words.add(i)), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8 * i + 8)), decode(*words.add(i + 1)), a1);
                    i += 2;
                }
                total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(*scales.add(g)), total);
                g += 1;
            }
            hsum(total)
        }

        /// [`super::dot_fp_row`] of E4M3 codes: two words' 8 bytes widened to lanes, normal codes
        /// rebuilt as f32 bits, subnormals (exponent 0) as m · 2^-9.
        #[inline(always)]
        pub unsafe fn dot_e4m3_row(x: *const f32, words: *const u32, scales: *const f32, n: usize, wpg: usize) -> f32 {
            let (m7f, m80, seven) = (_mm256_set1_epi32(0x7f), _mm256_set1_epi32(0x80), _mm256_set1_epi32(7));
            let bias = _mm256_set1_epi32(120 << 23);
            let sub = _mm256_set1_ps(1.0 / 512.0);
            let decode = |p: *const u32| -> __m256 {
                let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
                let em = _mm256_and_si256(b, m7f);
                let normal = _mm256_add_epi32(_mm256_slli_epi32(em, 20), bias);
                let subn = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(em), sub));
                let is_normal = _mm256_cmpgt_epi32(em, seven);
                let mag = _mm256_blendv_epi8(subn, normal, is_normal);
                let sign = _mm256_slli_epi32(_mm256_and_si256(b, m80), 24);
                _mm256_castsi256_ps(_mm256_or_si256(mag, sign))
            };
            let mut total = _mm256_setzero_ps();
            let mut i = 0;
            let mut g = 0;
            while i < n {
                let mut acc = _mm256_setzero_ps();
                let end = i + wpg;
                while i < end {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(4 * i)), decode(words.add(i)), acc);
                    i += 2;
                }
                total = _mm256_fmadd_ps(acc, _mm256_set1_ps(*scales.add(g)), total);
                g += 1;
            }
            hsum(total)
        }
    }
}

/// A weight matrix of `n` rows × `k` columns that can be read as f32.
pub trait WeightRows: Sync {
    fn n(&self) -> usize;
    fn k(&self) -> usize;
    /// Per-input data computed once per call (e.g. group sums of the input for affine weights).
    type Prep: Sync;
    fn prepare(&self, xs: &[f32], m: usize) -> Self::Prep;
    /// `out[i] = x_i · row(r)` for the `m` input rows `xs` (m × k).
    fn row_dots(&self, r: usize, xs: &[f32], m: usize, prep: &Self::Prep, scratch: &mut Vec<f32>, out: &mut [f32]);
    /// `out[j] = x_i · row(r0 + j)` for input row `i` over a block of rows, when a fused
    /// kernel exists; false leaves the block to `row_dots`.
    fn block_one(
        &self,
        _r0: usize,
        _xs: &[f32],
        _i: usize,
        _prep: &Self::Prep,
        _scratch: &mut Vec<f32>,
        _out: &mut [f32],
    ) -> bool {
        false
    }
    /// `out[j·m + i] = x_i · row(r0 + j)` for all `m` input rows over a block of rows at
    /// once, when a fused multi-input kernel exists ([`WeightRows::has_block_many`]); each value
    /// equals what [`WeightRows::block_one`] gives for that input row. False leaves the block
    /// to the other paths.
    #[allow(clippy::too_many_arguments)]
    fn block_many(
        &self,
        _r0: usize,
        _xs: &[f32],
        _m: usize,
        _prep: &Self::Prep,
        _scratch: &mut Vec<f32>,
        _out: &mut [f32],
    ) -> bool {
        false
    }
    /// Whether [`WeightRows::block_many`] has a kernel for this weight on this build.
    fn has_block_many(&self) -> bool {
        false
    }
    /// Rows `r0 .. r0 + cnt` as f32 into `dst` (cnt × k).
    fn rows_f32(&self, r0: usize, cnt: usize, dst: &mut [f32]);
}

/// Output rows handled per rayon task in the decode path.
const GEMV_BLOCK: usize = 32;
/// Weight rows decoded per tile in the prefill path.
const GEMM_TILE: usize = 64;

/// `y (m × n) = x (m × k) · Wᵀ`, x given as f32, result as f32 — the decode driver.
pub fn gemv<W: WeightRows>(w: &W, xs: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    debug_assert_eq!(xs.len(), m * k);
    let prep = w.prepare(xs, m);
    // results laid out (n × m) per block, transposed at the end
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(GEMV_BLOCK * m).enumerate().for_each_init(Vec::new, |scratch, (bi, chunk)| {
        let r0 = bi * GEMV_BLOCK;
        let rows = chunk.len() / m;
        if m == 1 && w.block_one(r0, xs, 0, &prep, scratch, chunk) {
            return;
        }
        if m > 1 && w.block_many(r0, xs, m, &prep, scratch, chunk) {
            return;
        }
        // a few input rows: the block kernel once per input row, the block's weights staying
        // in cache between them
        let mut one = [0f32; GEMV_BLOCK];
        if m > 1 && w.block_one(r0, xs, 0, &prep, scratch, &mut one[..rows]) {
            for i in 0..m {
                if i > 0 {
                    w.block_one(r0, xs, i, &prep, scratch, &mut one[..rows]);
                }
                for (j, v) in one[..rows].iter().enumerate() {
                    chunk[j * m + i] = *v;
                }
            }
            return;
        }
        for j in 0..rows {
            w.row_dots(r0 + j, xs, m, &prep, scratch, &mut chunk[j * m..(j + 1) * m]);
        }
    });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for r in 0..n {
        for i in 0..m {
            y[i * n + r] = yt[r * m + i];
        }
    }
    y
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `y (m × n) = x (m × k) · Wᵀ` — the prefill driver: tiles of W decoded to f32, then gemm.
pub fn gemm_tiles<W: WeightRows>(w: &W, xs: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    let mut y = vec![0f32; m * n];
    let yp = SendPtr(y.as_mut_ptr());
    let tiles = n.div_ceil(GEMM_TILE);
    (0..tiles).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, t| {
        let r0 = t * GEMM_TILE;
        let cnt = GEMM_TILE.min(n - r0);
        buf.resize(cnt * k, 0.0);
        w.rows_f32(r0, cnt, buf);
        let yp = &yp;
        // SAFETY: each tile writes the disjoint column block r0..r0+cnt of y (row stride n);
        // the pointers stay within y, xs and buf for the given sizes and strides.
        unsafe {
            gemm::gemm(
                m,
                cnt,
                k,
                yp.0.add(r0),
                1,
                n as isize,
                false,
                xs.as_ptr(),
                1,
                k as isize,
                buf.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    y
}

/// Largest input row count that takes the decode path.
pub const GEMV_MAX_ROWS: usize = 8;
/// Largest input row count that takes the decode path where a multi-input kernel exists
/// ([`WeightRows::has_block_many`]): a batch of decode rows then reads each weight once and
/// gets the bits each row gets alone.
pub const GEMV_MANY_MAX_ROWS: usize = 64;

/// Chooses the driver by the number of input rows.
pub fn matmul_f32<W: WeightRows>(w: &W, xs: &[f32], m: usize) -> Vec<f32> {
    if m <= GEMV_MAX_ROWS || (m <= GEMV_MANY_MAX_ROWS && w.has_block_many()) {
        gemv(w, xs, m)
    } else {
        gemm_tiles(w, xs, m)
    }
}

/// A dense row-major weight (n × k) of element type `T`.
pub struct DenseRows<'a, T: Elem> {
    pub data: &'a [T],
    pub n: usize,
    pub k: usize,
}

impl<T: Elem> WeightRows for DenseRows<'_, T> {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    type Prep = ();
    fn prepare(&self, _xs: &[f32], _m: usize) {}
    fn row_dots(&self, r: usize, xs: &[f32], m: usize, _prep: &(), scratch: &mut Vec<f32>, out: &mut [f32]) {
        let k = self.k;
        let _ = scratch;
        let row = &self.data[r * k..(r + 1) * k];
        for i in 0..m {
            out[i] = T::dot(&xs[i * k..(i + 1) * k], row);
        }
    }
    fn block_one(&self, r0: usize, xs: &[f32], i: usize, _prep: &(), _scratch: &mut Vec<f32>, out: &mut [f32]) -> bool {
        let (k, d) = (self.k, self.data);
        let x = &xs[i * k..(i + 1) * k];
        let mut j = 0;
        while j + 4 <= out.len() {
            let r = r0 + j;
            let rows = [0, 1, 2, 3].map(|i| &d[(r + i) * k..(r + i + 1) * k]);
            match T::dot4(x, rows) {
                Some(v) => out[j..j + 4].copy_from_slice(&v),
                None => break,
            }
            j += 4;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            *o = T::dot(x, &d[(r0 + jj) * k..(r0 + jj + 1) * k]);
        }
        true
    }
    fn block_many(
        &self,
        r0: usize,
        xs: &[f32],
        m: usize,
        _prep: &(),
        _scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) -> bool {
        let (k, d) = (self.k, self.data);
        let rows = out.len() / m;
        if !T::DOT4_MANY || m > GEMV_MANY_MAX_ROWS {
            return false;
        }
        let mut four = [[0f32; 4]; GEMV_MANY_MAX_ROWS];
        let four = &mut four[..m];
        let mut j = 0;
        while j + 4 <= rows {
            let r = r0 + j;
            let w = [0, 1, 2, 3].map(|i| &d[(r + i) * k..(r + i + 1) * k]);
            if !T::dot4_many(xs, m, w, four) {
                return false;
            }
            for (i, v) in four.iter().enumerate() {
                for (jj, x) in v.iter().enumerate() {
                    out[(j + jj) * m + i] = *x;
                }
            }
            j += 4;
        }
        // the rows `block_one` also leaves to `dot`
        for jj in j..rows {
            let row = &d[(r0 + jj) * k..(r0 + jj + 1) * k];
            for i in 0..m {
                out[jj * m + i] = T::dot(&xs[i * k..(i + 1) * k], row);
            }
        }
        true
    }
    fn has_block_many(&self) -> bool {
        T::DOT4_MANY && self.k.is_multiple_of(32)
    }
    fn rows_f32(&self, r0: usize, cnt: usize, dst: &mut [f32]) {
        let k = self.k;
        T::to_f32_slice(&self.data[r0 * k..(r0 + cnt) * k], &mut dst[..cnt * k]);
    }
}
