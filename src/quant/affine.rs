//! The affine format. Per group of `group_size` consecutive values along the input dimension,
//! `w ≈ scale · q + bias` with `q` in `0 ..= 2^bits − 1`. Rows of `q` are packed as one
//! little-endian bit stream (value `j` at bits `j·bits .. (j+1)·bits`) stored in u32 words, so
//! 3-, 5- and 6-bit values straddle words exactly as MLX packs them.

use super::Mode;
use anyhow::{bail, Result};

/// Bits MLX's affine mode supports.
pub const SUPPORTED_BITS: [usize; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes MLX's affine mode supports.
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// One layer's quantization parameters: bits, group size and mode (see [`Mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    pub bits: usize,
    pub group_size: usize,
    pub mode: Mode,
}

impl QuantParams {
    /// Affine bits and group size, unchecked (an architecture's fixed choice).
    pub const fn affine(bits: usize, group_size: usize) -> Self {
        Self { bits, group_size, mode: Mode::Affine }
    }

    /// `mode` with the given or the mode's default group size and bits, checked as mlx checks
    /// them (its refusal, after `what`: the layer or flag).
    pub fn with_mode(mode: Mode, group_size: Option<usize>, bits: Option<usize>, what: &str) -> Result<Self> {
        let (g, b) = mode.defaults();
        let (group_size, bits) = (group_size.unwrap_or(g), bits.unwrap_or(b));
        if mode == Mode::Affine {
            return Self::new(bits, group_size, what);
        }
        mode.check(group_size, bits, "quantize").map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self { bits, group_size, mode })
    }

    /// Checks that MLX's affine mode supports this combination; `what` names the layer or flag
    /// for the error.
    pub fn new(bits: usize, group_size: usize, what: &str) -> Result<Self> {
        if !SUPPORTED_BITS.contains(&bits) {
            bail!(
                "{what}: bits = {bits} is not supported by MLX affine quantization (expected one of 2, 3, 4, 5, 6, 8)"
            );
        }
        if !SUPPORTED_GROUP_SIZES.contains(&group_size) {
            bail!("{what}: group_size = {group_size} is not supported by MLX affine quantization (expected 32, 64 or 128)");
        }
        Ok(Self { bits, group_size, mode: Mode::Affine })
    }

    /// Number of u32 words of one packed row of `in_dim` values.
    pub fn packed_width(&self, in_dim: usize) -> usize {
        in_dim * self.bits / 32
    }
}

/// Packs one row of quantized values (each `< 2^bits`) into u32 words.
pub fn pack(q: &[u8], bits: usize, out: &mut [u32]) {
    debug_assert_eq!(out.len() * 32, q.len() * bits);
    out.iter_mut().for_each(|w| *w = 0);
    let mut bit = 0usize;
    for &v in q {
        let word = bit / 32;
        let off = bit % 32;
        out[word] |= (v as u32) << off;
        if off + bits > 32 {
            out[word + 1] |= (v as u32) >> (32 - off);
        }
        bit += bits;
    }
}

/// Unpacks one row of u32 words into `n` quantized values.
pub fn unpack(words: &[u32], bits: usize, out: &mut [u8]) {
    let mask = (1u64 << bits) - 1;
    let mut bit = 0usize;
    for v in out.iter_mut() {
        let word = bit / 32;
        let off = bit % 32;
        let mut x = (words[word] as u64) >> off;
        if off + bits > 32 {
            x |= (words[word + 1] as u64) << (32 - off);
        }
        *v = (x & mask) as u8;
        bit += bits;
    }
}

/// Quantizes `rows × cols` values (given as f32, the exact values of the source dtype).
/// Returns packed words (rows × cols·bits/32) and per-group scale and bias as f32 — the caller
/// rounds those to the source dtype, exactly as MLX stores them. The integer codes are computed
/// with the f32 scale before that rounding, as MLX does.
pub fn quantize(w: &[f32], rows: usize, cols: usize, p: QuantParams) -> Result<(Vec<u32>, Vec<f32>, Vec<f32>)> {
    if !cols.is_multiple_of(p.group_size) {
        bail!("cannot quantize a matrix with {cols} columns in groups of {}: the last dimension must be divisible by the group size", p.group_size);
    }
    let n_bins = ((1u32 << p.bits) - 1) as f32;
    let eps = 1e-7f32;
    let groups = cols / p.group_size;
    let width = p.packed_width(cols);
    let mut packed = vec![0u32; rows * width];
    let mut scales = vec![0f32; rows * groups];
    let mut biases = vec![0f32; rows * groups];
    let mut codes = vec![0u8; cols];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for g in 0..groups {
            let vals = &row[g * p.group_size..(g + 1) * p.group_size];
            let mut w_min = f32::INFINITY;
            let mut w_max = f32::NEG_INFINITY;
            for &v in vals {
                w_max = w_max.max(v);
                w_min = w_min.min(v);
            }
            let mask = w_min.abs() > w_max.abs();
            let mut scale = ((w_max - w_min) / n_bins).max(eps);
            if !mask {
                scale = -scale;
            }
            let edge = if mask { w_min } else { w_max };
            let q0 = (edge / scale).round_ties_even();
            let mut bias = 0.0f32;
            if q0 != 0.0 {
                scale = edge / q0;
                bias = edge;
            }
            for (j, &v) in vals.iter().enumerate() {
                let q = ((v - bias) / scale).round_ties_even().clamp(0.0, n_bins);
                codes[g * p.group_size + j] = q as u8;
            }
            scales[r * groups + g] = scale;
            biases[r * groups + g] = bias;
        }
        pack(&codes, p.bits, &mut packed[r * width..(r + 1) * width]);
    }
    Ok((packed, scales, biases))
}

/// Dequantizes packed rows into `scale · q + bias` (scales/biases given as f32 values of their
/// stored dtype). MLX evaluates this in the scales' dtype, rounding the product and then the sum;
/// `round` is that dtype's rounding (identity for f32), so the result is bit-exact with it.
pub fn dequantize_rounded(
    packed: &[u32],
    scales: &[f32],
    biases: &[f32],
    rows: usize,
    cols: usize,
    p: QuantParams,
    round: impl Fn(f32) -> f32 + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let width = p.packed_width(cols);
    let groups = cols / p.group_size;
    let mut out = vec![0f32; rows * cols];
    let row = |r: usize, o: &mut [f32], codes: &mut Vec<u8>| {
        unpack(&packed[r * width..(r + 1) * width], p.bits, codes);
        for (c, x) in o.iter_mut().enumerate() {
            let g = r * groups + c / p.group_size;
            *x = round(round(scales[g] * codes[c] as f32) + biases[g]);
        }
    };
    // rows are independent; small inputs stay on this thread
    if rows * cols >= 1 << 16 {
        out.par_chunks_mut(cols).enumerate().for_each_init(|| vec![0u8; cols], |codes, (r, o)| row(r, o, codes));
    } else {
        let mut codes = vec![0u8; cols];
        out.chunks_mut(cols).enumerate().for_each(|(r, o)| row(r, o, &mut codes));
    }
    out
}

/// [`dequantize_rounded`] in f32.
pub fn dequantize(
    packed: &[u32],
    scales: &[f32],
    biases: &[f32],
    rows: usize,
    cols: usize,
    p: QuantParams,
) -> Vec<f32> {
    dequantize_rounded(packed, scales, biases, rows, cols, p, |x| x)
}

/// The rounding of a float dtype, as a function on f32 values.
pub fn rounding(dtype: candle_core::DType) -> fn(f32) -> f32 {
    match dtype {
        candle_core::DType::F16 => |x| half::f16::from_f32(x).to_f32(),
        candle_core::DType::BF16 => |x| half::bf16::from_f32(x).to_f32(),
        _ => |x| x,
    }
}

/// Tensor-level quantization as `mx.quantize(w, group_size, bits)`: `w` (rows × cols) of a float
/// dtype; returns packed u32 (rows × cols·bits/32) and scales/biases in `w`'s dtype.
pub fn quantize_tensor(
    w: &candle_core::Tensor,
    p: QuantParams,
) -> Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
    use candle_core::{DType, Tensor};
    // along the last axis, as mx.quantize (stacked experts have a leading axis)
    let (lead, cols) = split_last(w.dims())?;
    let rows = lead.iter().product();
    let dtype = w.dtype();
    let vals: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (packed, scales, biases) = quantize(&vals, rows, cols, p)?;
    let dev = w.device();
    let shape = |last: usize| [lead.as_slice(), &[last]].concat();
    let g = cols / p.group_size;
    Ok((
        Tensor::from_vec(packed, shape(p.packed_width(cols)), dev)?,
        Tensor::from_vec(scales, shape(g), dev)?.to_dtype(dtype)?,
        Tensor::from_vec(biases, shape(g), dev)?.to_dtype(dtype)?,
    ))
}

/// (leading dims, last dim) of a shape with at least two dimensions.
pub(crate) fn split_last(dims: &[usize]) -> Result<(Vec<usize>, usize)> {
    match dims {
        [lead @ .., last] if !lead.is_empty() => Ok((lead.to_vec(), *last)),
        _ => anyhow::bail!("expected a matrix (or a stack of matrices), got shape {dims:?}"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_all_bits() {
        for bits in SUPPORTED_BITS {
            let n = 96;
            let q: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            let mut words = vec![0u32; n * bits / 32];
            pack(&q, bits, &mut words);
            let mut back = vec![0u8; n];
            unpack(&words, bits, &mut back);
            assert_eq!(q, back, "bits {bits}");
        }
    }

    #[test]
    fn four_bit_packing_is_nibble_little_endian() {
        // value j of a 4-bit row sits in nibble j of the word (math, not MLX output).
        let q: Vec<u8> = (0..8).collect();
        let mut w = [0u32; 1];
        pack(&q, 4, &mut w);
        assert_eq!(w[0], 0x7654_3210);
    }
}
