//! CPU kernels of the affine quantized matmul. Decode: codes are unpacked in registers-sized
//! runs to f32 and dotted with the input per group, `Σ_g s_g·(x_g·q_g) + b_g·Σx_g`, so scale
//! and bias are applied once per group, not per element. Prefill: rows dequantized to f32 tiles
//! for gemm (see `kernels`).

use super::affine::{unpack, QuantParams};
use crate::kernels::simd::{self, row_affine};
use crate::kernels::{Elem, WeightRows};

/// A quantized matrix (n × k) as stored by MLX.
pub struct AffineRows<'a, S: Elem> {
    pub packed: &'a [u32],
    pub scales: &'a [S],
    pub biases: &'a [S],
    pub n: usize,
    pub k: usize,
    pub p: QuantParams,
}

/// Unpacks one packed row of `k` codes into f32 values.
#[inline]
pub fn unpack_row_f32(words: &[u32], bits: usize, out: &mut [f32]) {
    match bits {
        4 => {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(8)) {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = ((w >> (4 * j)) & 0xf) as f32;
                }
            }
        }
        8 => {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(4)) {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = ((w >> (8 * j)) & 0xff) as f32;
                }
            }
        }
        2 => {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(16)) {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = ((w >> (2 * j)) & 0x3) as f32;
                }
            }
        }
        _ => {
            let mut codes = vec![0u8; out.len()];
            unpack(words, bits, &mut codes);
            for (o, c) in out.iter_mut().zip(codes) {
                *o = c as f32;
            }
        }
    }
}

impl<S: Elem> AffineRows<'_, S> {
    fn groups(&self) -> usize {
        self.k / self.p.group_size
    }
}

impl<S: Elem> WeightRows for AffineRows<'_, S> {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    /// Σx per (input row, group), and for 4-bit rows on AVX-512 builds the inputs permuted to
    /// the nibble order.
    type Prep = (Vec<f32>, Option<Vec<f32>>);
    fn prepare(&self, xs: &[f32], m: usize) -> Self::Prep {
        let permuted = (self.p.bits == 4 && simd::Q4_PERMUTED).then(|| simd::permute_x_q4(xs));
        (self.group_sums(xs, m), permuted)
    }
    fn row_dots(&self, r: usize, xs: &[f32], m: usize, prep: &Self::Prep, _scratch: &mut Vec<f32>, out: &mut [f32]) {
        let (k, gs, g) = (self.k, self.p.group_size, self.groups());
        let width = self.p.packed_width(k);
        let words = &self.packed[r * width..(r + 1) * width];
        let (s, b) = (&self.scales[r * g..(r + 1) * g], &self.biases[r * g..(r + 1) * g]);
        let (xsum, permuted) = prep;
        for i in 0..m {
            let bias = S::dot(&xsum[i * g..(i + 1) * g], b);
            let main = match permuted {
                Some(xp) => simd::row_affine_q4_permuted(&xp[i * k..(i + 1) * k], words, gs, |j| s[j].to_f32()),
                None => row_affine(&xs[i * k..(i + 1) * k], words, self.p.bits, gs, |j| s[j].to_f32()),
            };
            out[i] = main + bias;
        }
    }
    fn dot4(&self, r: usize, _x: &[f32], prep: &Self::Prep) -> Option<[f32; 4]> {
        let (xsum, permuted) = prep;
        let xp = permuted.as_ref()?;
        let (k, gs, g) = (self.k, self.p.group_size, self.groups());
        let width = self.p.packed_width(k);
        let rows: [usize; 4] = [r, r + 1, r + 2, r + 3];
        let words = rows.map(|rr| &self.packed[rr * width..(rr + 1) * width]);
        let main = simd::rows4_affine_q4_permuted(xp, words, gs, |i, j| self.scales[(r + i) * g + j].to_f32());
        let mut out = main;
        for (o, rr) in out.iter_mut().zip(rows) {
            *o += S::dot(xsum, &self.biases[rr * g..(rr + 1) * g]);
        }
        Some(out)
    }
    fn rows_f32(&self, r0: usize, cnt: usize, dst: &mut [f32]) {
        self.rows_f32_impl(r0, cnt, dst)
    }
}

impl<S: Elem> AffineRows<'_, S> {
    fn group_sums(&self, xs: &[f32], m: usize) -> Vec<f32> {
        let gs = self.p.group_size;
        let g = self.groups();
        let mut sums = vec![0f32; m * g];
        for i in 0..m {
            for j in 0..g {
                sums[i * g + j] = xs[i * self.k + j * gs..i * self.k + (j + 1) * gs].iter().sum();
            }
        }
        sums
    }

    fn rows_f32_impl(&self, r0: usize, cnt: usize, dst: &mut [f32]) {
        let (k, gs) = (self.k, self.p.group_size);
        let width = self.p.packed_width(k);
        for rr in 0..cnt {
            let r = r0 + rr;
            let row = &mut dst[rr * k..(rr + 1) * k];
            unpack_row_f32(&self.packed[r * width..(r + 1) * width], self.p.bits, row);
            let g = self.groups();
            let (s, b) = (&self.scales[r * g..(r + 1) * g], &self.biases[r * g..(r + 1) * g]);
            for (j, chunk) in row.chunks_exact_mut(gs).enumerate() {
                let (sj, bj) = (s[j].to_f32(), b[j].to_f32());
                for v in chunk.iter_mut() {
                    *v = sj * *v + bj;
                }
            }
        }
    }
}
