//! MLX's float quantization modes, the format only (`mx.quantize` / `mx.dequantize` with
//! `mode="mxfp4" | "nvfp4" | "mxfp8"`), bit for bit with mlx 0.32 on the CPU:
//!
//! - codes along the last axis, packed little end first into u32 words (8 E2M1 nibbles or 4 E4M3
//!   bytes per word), and one u8 scale per group: `mxfp4` groups of 32 E2M1 codes with an E8M0
//!   scale (`2^(s-127)`), `nvfp4` groups of 16 E2M1 codes with an E4M3 scale, `mxfp8` groups of
//!   32 E4M3 codes with an E8M0 scale; no biases;
//! - `nvfp4` may carry a float32 global scale `g` (mlx_lm's MoE layers with `global_scale`):
//!   the stored scale is then relative to `g / 2688`.
//!
//! Every arithmetic step rounds to the input dtype D as mlx's CPU path does (`round`: identity
//! for f32). The mx scale is `2^⌈log2(r_D(max|x| / M))⌉` exactly (M = 6 or 448), with no clamp
//! (the biased exponent wraps as a u8); E2M1 codes are the first nearest of mlx's 16-entry table
//! in f32 (a tie goes to the smaller magnitude, a value rounding to zero is +0); E4M3 rounds to
//! nearest even and saturates at 448.

use super::Mode;
use anyhow::{bail, Result};

/// The E2M1 values of the 16 codes (bit 3 is the sign).
pub const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// `2688 = 6 · 448`: the largest nvfp4 value over the largest E4M3 scale.
const NV_RANGE: f32 = 2688.0;

/// `2^(s - 127)` of an E8M0 byte as mlx decodes it (through bf16 `s << 7`: 0 gives 2^-127, 255
/// gives +inf).
pub fn e8m0(s: u8) -> f32 {
    f32::from_bits(if s == 0 { 0x0040_0000 } else { (s as u32) << 23 })
}

/// The value of an E4M3 byte (bias 7, subnormals `m · 2^-9`, 0x7f / 0xff NaN).
pub fn e4m3(c: u8) -> f32 {
    let (e, m) = ((c >> 3) & 15, (c & 7) as u32);
    let mag = if e == 15 && m == 7 {
        f32::NAN
    } else if e == 0 {
        m as f32 / 512.0
    } else {
        f32::from_bits(((e as u32 + 120) << 23) | (m << 20))
    };
    if c & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

/// `x` as E4M3, rounding to nearest even, saturating at ±448; NaN gives 0x7e with the sign bit,
/// and zeros keep their sign.
pub fn to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return 0x7e | sign;
    }
    let a = x.abs();
    if a > 448.0 {
        return 0x7e | sign;
    }
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127;
    if exp < -6 {
        // subnormal: a multiple of 2^-9 (8 · 2^-9 is the smallest normal, code 8)
        return (a * 512.0).round_ties_even() as u8 | sign;
    }
    let m = bits & 0x7f_ffff;
    let (mut q, rem, half) = (m >> 20, m & 0xf_ffff, 0x8_0000);
    if rem > half || (rem == half && q & 1 == 1) {
        q += 1;
    }
    let code = ((exp + 7) as u32) * 8 + q; // q = 8 carries into the exponent
    code.min(0x7e) as u8 | sign
}

/// The E2M1 code of `v`: the first entry of [`E2M1`] nearest in f32 (mlx's argmin: ties go to
/// the lower index; NaN and infinities give 0).
pub fn to_e2m1(v: f32) -> u32 {
    let mut best = 0;
    let mut dist = (v - E2M1[0]).abs();
    for (i, &l) in E2M1.iter().enumerate().skip(1) {
        let d = (v - l).abs();
        if d < dist {
            best = i;
            dist = d;
        }
    }
    best as u32
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

/// `2^e` for any `e` of an f32 (or f32-subnormal) power of two, as f64.
fn pow2(e: i32) -> f64 {
    2f64.powi(e)
}

/// Values per code word.
pub fn per_word(mode: Mode) -> usize {
    32 / bits(mode)
}

fn bits(mode: Mode) -> usize {
    mode.defaults().1
}

/// Values per scale.
pub fn group(mode: Mode) -> usize {
    mode.defaults().0
}

/// The stored code of value `v` (already divided by its scale).
fn encode(mode: Mode, v: f32) -> u32 {
    match mode {
        Mode::Mxfp8 => to_e4m3(v) as u32,
        _ => to_e2m1(v),
    }
}

/// The value of code `c`.
#[inline]
pub fn decode(mode: Mode, c: u32) -> f32 {
    match mode {
        Mode::Mxfp8 => e4m3(c as u8),
        _ => E2M1[(c & 15) as usize],
    }
}

/// The multiplier of scale byte `s` (`g`: nvfp4's global scale factor `g / 2688`, else 1).
#[inline]
pub fn scale_value(mode: Mode, s: u8) -> f32 {
    match mode {
        Mode::Nvfp4 => E4M3_TABLE[s as usize],
        _ => e8m0(s),
    }
}

/// How a group's values are divided by its scale before encoding.
#[derive(Clone, Copy)]
enum Divide {
    /// nvfp4: by the E4M3 scale's value `d`, then times the global factor
    Nv { d: f32, factor: Option<f32> },
    /// an mx scale of a non-finite group: by zero
    Zero,
    /// an mx scale of an all-zero group
    One,
    /// an mx scale `2^e` (given as f64: `e` may be below f32's normal range)
    Pow(f64),
}

/// `mx.quantize(w, mode=…)` of `rows × cols` values of dtype D (given as f32, with `round` D's
/// rounding; `f32_input`: D is f32), with nvfp4's optional global scale: (packed words, scales).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    mode: Mode,
    round: fn(f32) -> f32,
    f32_input: bool,
    global: Option<f32>,
) -> Result<(Vec<u32>, Vec<u8>)> {
    if !mode.is_fp() {
        bail!("fp::quantize takes a float mode, not {mode}");
    }
    if global.is_some() && mode != Mode::Nvfp4 {
        bail!("[quantize] Global scale is only supported for 'nvfp4' quantization mode.");
    }
    let (gs, per) = (group(mode), per_word(mode));
    if !cols.is_multiple_of(gs) || w.len() != rows * cols {
        bail!("[quantize] The last dimension of the matrix needs to be divisible by the quantization group size {gs}. However the provided matrix has shape ({rows},{cols})");
    }
    let nbits = bits(mode);
    let mut packed = vec![0u32; rows * cols / per];
    let mut scales = vec![0u8; rows * cols / gs];
    let factor = global.map(|g| NV_RANGE / g);
    for (gi, (block, s)) in w.chunks(gs).zip(scales.iter_mut()).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| if m.is_nan() || v.is_nan() { f32::NAN } else { m.max(v.abs()) });
        // how each value of the group becomes a code's value
        let divide = match mode {
            Mode::Nvfp4 => {
                let s0 = round(amax / 6.0);
                *s = match factor {
                    _ if !s0.is_finite() => 0x7e,
                    Some(f) => to_e4m3(s0 * f),
                    None => to_e4m3(s0),
                };
                Divide::Nv { d: e4m3(*s), factor }
            }
            _ => {
                let m = if mode == Mode::Mxfp8 { 448.0 } else { 6.0 };
                let s0 = round(amax / m);
                if !s0.is_finite() {
                    *s = if f32_input { 128 } else { 0 };
                    Divide::Zero
                } else if s0 == 0.0 {
                    *s = 127;
                    Divide::One
                } else {
                    let e = ceil_log2(s0);
                    *s = (e + 127).rem_euclid(256) as u8;
                    Divide::Pow(pow2(e))
                }
            }
        };
        for (j, &x) in block.iter().enumerate() {
            let i = gi * gs + j;
            let v = match divide {
                Divide::Nv { d, factor: Some(f) } => round(x / d) * f,
                Divide::Nv { d, factor: None } => round(x / d),
                Divide::Zero => x / 0.0,
                Divide::One => x,
                Divide::Pow(p) => round((x as f64 / p) as f32),
            };
            packed[i / per] |= encode(mode, v) << (nbits * (i % per));
        }
    }
    Ok((packed, scales))
}

/// The value of every E4M3 byte.
static E4M3_TABLE: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|c| e4m3(c as u8)));

/// The two E2M1 values of every byte (low nibble first).
static E2M1_PAIRS: std::sync::LazyLock<[[f32; 2]; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|b| [E2M1[b & 15], E2M1[b >> 4]]));

/// One row of `k` values from its packed words and scales into `out`, in f32 (what the matmul
/// kernels compute with); `factor`: nvfp4's `g / 2688`, else 1.
pub fn decode_row(mode: Mode, words: &[u32], scales: &[u8], factor: f32, out: &mut [f32]) {
    let gs = group(mode);
    let words_per_group = gs / per_word(mode);
    for ((o, w), &s) in out.chunks_mut(gs).zip(words.chunks(words_per_group)).zip(scales) {
        let scale = scale_value(mode, s) * factor;
        if mode == Mode::Mxfp8 {
            let t = &*E4M3_TABLE;
            for (o4, &word) in o.chunks_exact_mut(4).zip(w) {
                for (v, b) in o4.iter_mut().zip(word.to_le_bytes()) {
                    *v = t[b as usize] * scale;
                }
            }
        } else {
            let t = &*E2M1_PAIRS;
            for (o8, &word) in o.chunks_exact_mut(8).zip(w) {
                for (v2, b) in o8.chunks_exact_mut(2).zip(word.to_le_bytes()) {
                    let [a, c] = t[b as usize];
                    v2[0] = a * scale;
                    v2[1] = c * scale;
                }
            }
        }
    }
}

/// `mx.dequantize(…, mode=…, dtype=D)` of `rows × cols` values, as f32 values of D (`round`:
/// D's rounding). With nvfp4's global scale mlx computes in f32 whatever D is.
pub fn dequantize(
    packed: &[u32],
    scales: &[u8],
    rows: usize,
    cols: usize,
    mode: Mode,
    round: fn(f32) -> f32,
    global: Option<f32>,
) -> Vec<f32> {
    let (gs, per, nbits) = (group(mode), per_word(mode), bits(mode));
    let mask = (1u32 << nbits) - 1;
    let mut out = vec![0f32; rows * cols];
    for (i, o) in out.iter_mut().enumerate() {
        let c = (packed[i / per] >> (nbits * (i % per))) & mask;
        let s = scales[i / gs];
        *o = match (mode, global) {
            (Mode::Nvfp4, Some(g)) => decode(mode, c) * (e4m3(s) * (g / NV_RANGE)),
            (Mode::Nvfp4, None) => round(decode(mode, c) * e4m3(s)),
            _ => round(decode(mode, c) * round(e8m0(s))),
        };
    }
    out
}

/// [`quantize`] along the last axis of a float tensor (a matrix or a stack of them), in its
/// dtype: (packed u32, scales u8) on its device.
pub fn quantize_tensor(
    w: &candle_core::Tensor,
    mode: Mode,
    global: Option<f32>,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    use candle_core::{DType, Tensor};
    let (lead, cols) = super::affine::split_last(w.dims())?;
    let rows = lead.iter().product();
    let vals: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let round = super::affine::rounding(w.dtype());
    let (packed, scales) = quantize(&vals, rows, cols, mode, round, w.dtype() == DType::F32, global)?;
    let shape = |last: usize| [lead.as_slice(), &[last]].concat();
    Ok((
        Tensor::from_vec(packed, shape(cols / per_word(mode)), w.device())?,
        Tensor::from_vec(scales, shape(cols / group(mode)), w.device())?,
    ))
}

/// mlx_lm's `_quantize_experts` for a stack of experts (E × out × in): each expert in nvfp4 with
/// its own global scale `max|W_e|` (f32): (packed, scales, global scales (E,)).
pub fn quantize_experts_global(
    w: &candle_core::Tensor,
) -> Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
    use candle_core::{DType, Tensor};
    let e = w.dim(0)?;
    let (mut ps, mut ss, mut gs) = (vec![], vec![], vec![]);
    for i in 0..e {
        let we = w.get(i)?;
        let g = we.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let (p, s) = quantize_tensor(&we, Mode::Nvfp4, Some(g))?;
        ps.push(p);
        ss.push(s);
        gs.push(g);
    }
    Ok((Tensor::stack(&ps, 0)?, Tensor::stack(&ss, 0)?, Tensor::from_vec(gs, e, w.device())?))
}

/// [`dequantize`] of tensors (packed u32 and scales u8 along the last axis; `global`: nvfp4's
/// global scale per leading index, or one for all) into `dtype` (f32 with a global scale).
pub fn dequantize_tensor(
    packed: &candle_core::Tensor,
    scales: &candle_core::Tensor,
    mode: Mode,
    dtype: candle_core::DType,
    global: Option<&[f32]>,
) -> Result<candle_core::Tensor> {
    use candle_core::{DType, Device, Tensor};
    let (lead, width) = super::affine::split_last(packed.dims())?;
    let cols = width * per_word(mode);
    let rows: usize = lead.iter().product();
    let pk: Vec<u32> = packed.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    let sc: Vec<u8> = scales.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    if sc.len() * group(mode) != rows * cols {
        bail!("{mode} dequantize: {} scales for {rows} rows of {cols} values", sc.len());
    }
    let round = super::affine::rounding(dtype);
    let out = match global {
        None => dequantize(&pk, &sc, rows, cols, mode, round, None),
        Some(g) => {
            // one global scale per matrix of the stack
            let mats = g.len().max(1);
            let per_mat = rows / mats;
            let mut out = Vec::with_capacity(rows * cols);
            for (m, &gv) in g.iter().enumerate() {
                let (w0, s0) = (m * per_mat * cols / per_word(mode), m * per_mat * cols / group(mode));
                let pw = &pk[w0..w0 + per_mat * cols / per_word(mode)];
                let ps = &sc[s0..s0 + per_mat * cols / group(mode)];
                out.extend(dequantize(pw, ps, per_mat, cols, mode, |x| x, Some(gv)));
            }
            out
        }
    };
    let shape = [lead.as_slice(), &[cols]].concat();
    Ok(match (global, dtype) {
        // 0 · inf (a code of zero over a scale beyond f16's range) comes out of mlx as this NaN
        (None, DType::F16) => {
            let nan = half::f16::from_bits(0xfd00);
            let v: Vec<half::f16> =
                out.iter().map(|&x| if x.is_nan() { nan } else { half::f16::from_f32(x) }).collect();
            Tensor::from_vec(v, shape, packed.device())?
        }
        (None, _) => Tensor::from_vec(out, shape, packed.device())?.to_dtype(dtype)?,
        (Some(_), _) => Tensor::from_vec(out, shape, packed.device())?,
    })
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
        let (_, scales) = quantize(&w, 1, 32, Mode::Mxfp4, |x| x, true, None).unwrap();
        assert_eq!(scales, vec![127 + 6]);
    }

    /// E4M3 from its definition (bias 7, 3 mantissa bits): every finite code decodes and
    /// re-encodes to itself, and halfway values go to the even neighbour.
    #[test]
    fn e4m3_round_trips_and_rounds_to_even() {
        for c in 0u8..=255 {
            if c & 0x7f == 0x7f {
                assert!(e4m3(c).is_nan());
                continue;
            }
            assert_eq!(to_e4m3(e4m3(c)), c, "code {c:#x}");
        }
        assert_eq!(e4m3(0x7e), 448.0);
        assert_eq!(e4m3(0x01), 1.0 / 512.0);
        // 1.0625 is halfway between 1 (0x38) and 1.125 (0x39): even is 0x38
        assert_eq!(to_e4m3(1.0625), 0x38);
        // 1.1875 is halfway between 1.125 (0x39) and 1.25 (0x3a): even is 0x3a
        assert_eq!(to_e4m3(1.1875), 0x3a);
        assert_eq!(to_e4m3(1e9), 0x7e);
        assert_eq!(to_e4m3(-0.0), 0x80);
    }

    /// E2M1: ties go to the smaller magnitude, and negatives rounding to zero are +0.
    #[test]
    fn e2m1_ties_go_down() {
        let cases = [(0.25, 0), (0.75, 1), (1.25, 2), (2.5, 4), (5.0, 6), (7.0, 7), (-0.2, 0), (-5.0, 14)];
        for (v, c) in cases {
            assert_eq!(to_e2m1(v), c, "{v}");
        }
    }
}
