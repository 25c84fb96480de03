//! MLX's `mxfp4` mode (`mx.quantize(…, mode="mxfp4")`), the format only: groups of 32 values
//! along the last axis, each an E2M1 4-bit float (8 per u32 word, the low nibble first) times
//! the group's power of two, stored as a biased E8M0 exponent (u8, `2^(s - 127)`); no biases.
//! Bit-exact with mlx: the exponent is `ceil(log2(max|x| / 6))` (0 for an all-zero group),
//! clamped to ±127; each value rounds to the nearest E2M1 magnitude, ties to the smaller one, and
//! a value that rounds to zero is stored as +0.

use anyhow::{bail, Result};

/// Values per group (one scale each).
pub const GROUP: usize = 32;

/// The E2M1 values of the 16 codes.
pub const LUT: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// `2^(s - 127)`.
pub fn scale_of(s: u8) -> f32 {
    f32::from_bits(if s == 0 { 0x0040_0000 } else { (s as u32) << 23 })
}

/// The code of `v` (already divided by its group's scale).
fn encode(v: f32) -> u32 {
    let mag = v.abs();
    // nearest of 0, .5, 1, 1.5, 2, 3, 4, 6; a tie goes to the smaller
    let mut best = 0;
    for (c, &l) in LUT[..8].iter().enumerate() {
        if (mag - l).abs() < (mag - LUT[best]).abs() {
            best = c;
        }
    }
    let neg = v.is_sign_negative() && best != 0;
    best as u32 | if neg { 8 } else { 0 }
}

/// `⌈log2 s⌉` of a positive finite `s`, exactly (from its bits: a float `log2` rounds a value just
/// above a power of two down onto it).
fn ceil_log2(s: f32) -> i32 {
    let bits = s.to_bits();
    let (exp, mantissa) = ((bits >> 23) & 0xff, bits & 0x7f_ffff);
    if exp == 0 {
        // subnormal: s = mantissa · 2^-149
        return 32 - (mantissa - 1).leading_zeros() as i32 - 149;
    }
    exp as i32 - 127 + (mantissa != 0) as i32
}

/// `mx.quantize(w, 32, 4, mode="mxfp4")` of `rows × cols` values: (packed words, scales).
pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<(Vec<u32>, Vec<u8>)> {
    if !cols.is_multiple_of(GROUP) || w.len() != rows * cols {
        bail!("mxfp4 quantization needs rows of a multiple of {GROUP} values (got {cols})");
    }
    let mut packed = vec![0u32; rows * cols / 8];
    let mut scales = vec![0u8; rows * cols / GROUP];
    for (g, (block, s)) in w.chunks(GROUP).zip(scales.iter_mut()).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = if amax == 0.0 { 0 } else { ceil_log2(amax / 6.0).clamp(-127, 127) };
        *s = (e + 127) as u8;
        let scale = scale_of(*s);
        for (j, v) in block.iter().enumerate() {
            let i = g * GROUP + j;
            packed[i / 8] |= encode(v / scale) << (4 * (i % 8));
        }
    }
    Ok((packed, scales))
}

/// One row of `k` values from its packed words and scales, into `out`.
pub fn decode_row(words: &[u32], scales: &[u8], k: usize, out: &mut [f32]) {
    for (g, &s) in scales.iter().enumerate().take(k / GROUP) {
        let scale = scale_of(s);
        for w in 0..GROUP / 8 {
            let word = words[g * GROUP / 8 + w];
            for n in 0..8 {
                out[g * GROUP + w * 8 + n] = LUT[((word >> (4 * n)) & 15) as usize] * scale;
            }
        }
    }
}

/// `mx.dequantize(…, mode="mxfp4")` of `rows × cols` values, as f32.
pub fn dequantize(packed: &[u32], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for (r, o) in out.chunks_mut(cols).enumerate() {
        decode_row(
            &packed[r * cols / 8..(r + 1) * cols / 8],
            &scales[r * cols / GROUP..(r + 1) * cols / GROUP],
            cols,
            o,
        );
    }
    out
}

/// [`quantize`] along the last axis of a tensor (a matrix or a stack of them): (packed u32,
/// scales u8), on the tensor's device.
pub fn quantize_tensor(w: &candle_core::Tensor) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    use candle_core::{DType, Tensor};
    let (lead, cols) = super::affine::split_last(w.dims())?;
    let rows = lead.iter().product();
    let vals: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (packed, scales) = quantize(&vals, rows, cols)?;
    let shape = |last: usize| [lead.as_slice(), &[last]].concat();
    Ok((
        Tensor::from_vec(packed, shape(cols / 8), w.device())?,
        Tensor::from_vec(scales, shape(cols / GROUP), w.device())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group's power of two is `⌈log2(max|x| / 6)⌉` exactly, as mlx takes it: a maximum one
    /// ulp above `6 · 2^5` needs `2^6` (a float log2 would round to 5).
    #[test]
    fn the_scale_exponent_is_the_exact_ceiling() {
        assert_eq!(ceil_log2(32.0), 5);
        assert_eq!(ceil_log2(f32::from_bits(32f32.to_bits() + 1)), 6);
        assert_eq!(ceil_log2(0.75), 0);
        assert_eq!(ceil_log2(f32::from_bits(1)), -149);
        assert_eq!(ceil_log2(f32::from_bits(3)), -147);
        let mut w = vec![0f32; 32];
        w[0] = f32::from_bits((6f32 * 32.0).to_bits() + 1);
        let (_, scales) = quantize(&w, 1, 32).unwrap();
        assert_eq!(scales, vec![127 + 6]);
    }
}
