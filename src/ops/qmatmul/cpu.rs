//! CPU kernels of the affine quantized matmul. Decode: codes are unpacked in registers-sized
//! runs to f32 and dotted with the input per group, `Σ_g s_g·(x_g·q_g) + b_g·Σx_g`, so scale
//! and bias are applied once per group, not per element. Prefill: rows dequantized to f32 tiles
//! for gemm (see `crate::backend::cpu`).

use crate::backend::cpu::simd::{self, row_affine};
use crate::backend::cpu::{Elem, WeightRows};
use crate::quant::affine::{unpack_row_f32, QuantParams};

/// A quantized matrix (n × k) as stored by MLX.
pub struct AffineRows<'a, S: Elem> {
    pub packed: &'a [u32],
    pub scales: &'a [S],
    pub biases: &'a [S],
    pub n: usize,
    pub k: usize,
    pub p: QuantParams,
}

impl<S: Elem> AffineRows<'_, S> {
    fn groups(&self) -> usize {
        self.k / self.p.group_size
    }

    /// The packed words of rows `r0 .. r0 + rows`.
    fn block_words(&self, r0: usize, rows: usize) -> &[u32] {
        let width = self.p.packed_width(self.k);
        &self.packed[r0 * width..(r0 + rows) * width]
    }
}

impl<S: Elem> WeightRows for AffineRows<'_, S> {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    /// Σx per (input row, group), and for 4- and 8-bit rows on AVX-512 builds the input in
    /// the block kernels' form.
    type Prep = (Vec<f32>, Option<Vec<f32>>);
    fn prepare(&self, xs: &[f32], m: usize) -> Self::Prep {
        let fast = simd::affine_input(xs, self.p.bits, self.p.group_size);
        (self.group_sums(xs, m), fast)
    }
    fn row_dots(&self, r: usize, xs: &[f32], m: usize, prep: &Self::Prep, scratch: &mut Vec<f32>, out: &mut [f32]) {
        let (k, gs, g) = (self.k, self.p.group_size, self.groups());
        let width = self.p.packed_width(k);
        let words = &self.packed[r * width..(r + 1) * width];
        let (xsum, fast) = prep;
        if let Some(input) = fast {
            let (s, b) = self.block_scales(r, 1, scratch);
            for (i, o) in out.iter_mut().enumerate().take(m) {
                simd::block_affine(
                    self.p.bits,
                    input,
                    i,
                    k,
                    gs,
                    words,
                    s,
                    b,
                    &xsum[i * g..(i + 1) * g],
                    std::slice::from_mut(o),
                );
            }
            return;
        }
        let (s, b) = (&self.scales[r * g..(r + 1) * g], &self.biases[r * g..(r + 1) * g]);
        for i in 0..m {
            let bias = S::dot(&xsum[i * g..(i + 1) * g], b);
            out[i] = row_affine(&xs[i * k..(i + 1) * k], words, self.p.bits, gs, |j| s[j].to_f32()) + bias;
        }
    }
    fn block_one(
        &self,
        r0: usize,
        _xs: &[f32],
        i: usize,
        prep: &Self::Prep,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) -> bool {
        let (xsum, fast) = prep;
        let Some(input) = fast else { return false };
        let g = self.groups();
        let (s, b) = self.block_scales(r0, out.len(), scratch);
        let (bits, k, gs) = (self.p.bits, self.k, self.p.group_size);
        simd::block_affine(
            bits,
            input,
            i,
            k,
            gs,
            self.block_words(r0, out.len()),
            s,
            b,
            &xsum[i * g..(i + 1) * g],
            out,
        );
        true
    }
    fn block_many(
        &self,
        r0: usize,
        _xs: &[f32],
        m: usize,
        prep: &Self::Prep,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) -> bool {
        let (xsum, fast) = prep;
        let Some(input) = fast else { return false };
        let rows = out.len() / m;
        let (s, b) = self.block_scales(r0, rows, scratch);
        let (bits, k, gs) = (self.p.bits, self.k, self.p.group_size);
        simd::block_affine_many(bits, input, m, k, gs, self.block_words(r0, rows), s, b, xsum, out);
        true
    }
    fn has_block_many(&self) -> bool {
        simd::has_affine_blocks(self.p.bits, self.p.group_size)
    }
    fn rows_f32(&self, r0: usize, cnt: usize, dst: &mut [f32]) {
        self.rows_f32_impl(r0, cnt, dst)
    }
}

impl<S: Elem> AffineRows<'_, S> {
    /// Scales and biases of rows `r0 .. r0 + cnt` as f32: borrowed when stored in f32,
    /// else converted into `scratch`.
    fn block_scales<'s>(&'s self, r0: usize, cnt: usize, scratch: &'s mut Vec<f32>) -> (&'s [f32], &'s [f32]) {
        let g = self.groups();
        let (s, b) = (&self.scales[r0 * g..(r0 + cnt) * g], &self.biases[r0 * g..(r0 + cnt) * g]);
        if let (Some(s), Some(b)) = (S::as_f32(s), S::as_f32(b)) {
            return (s, b);
        }
        scratch.resize(2 * cnt * g, 0.0);
        let (sf, bf) = scratch.split_at_mut(cnt * g);
        S::to_f32_slice(s, sf);
        S::to_f32_slice(b, bf);
        (sf, bf)
    }

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
