//! MLX's quantization modes (`mx.quantize(…, mode=…)`): `affine` (integer codes with a float
//! scale and bias per group) and the microscaling float formats `mxfp4`, `nvfp4` and `mxfp8`
//! (float codes with one u8 scale per group, no biases). Which group sizes and bits each allows,
//! and mlx's refusal for the others, word for word.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    #[default]
    Affine,
    Mxfp4,
    Nvfp4,
    Mxfp8,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Affine, Mode::Mxfp4, Mode::Nvfp4, Mode::Mxfp8];

    /// The mode named `s` as mlx spells it; otherwise mlx's refusal.
    pub fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "affine" => Mode::Affine,
            "mxfp4" => Mode::Mxfp4,
            "nvfp4" => Mode::Nvfp4,
            "mxfp8" => Mode::Mxfp8,
            _ => bail!("[quantize] Invalid quantization mode '{s}'."),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Affine => "affine",
            Mode::Mxfp4 => "mxfp4",
            Mode::Nvfp4 => "nvfp4",
            Mode::Mxfp8 => "mxfp8",
        }
    }

    /// (group size, bits) when none are given (mlx_lm's `defaults_for_mode`).
    pub fn defaults(self) -> (usize, usize) {
        match self {
            Mode::Affine => (64, 4),
            Mode::Mxfp4 => (32, 4),
            Mode::Nvfp4 => (16, 4),
            Mode::Mxfp8 => (32, 8),
        }
    }

    /// A float mode (u8 scales, no biases).
    pub fn is_fp(self) -> bool {
        self != Mode::Affine
    }

    /// mlx's check of a group size and bit width for this mode (group size first), as
    /// `[op] …` in mlx's words; `op` is `quantize` or `dequantize`.
    pub fn check(self, group_size: usize, bits: usize, op: &str) -> Result<()> {
        if self == Mode::Affine {
            if ![32, 64, 128].contains(&group_size) {
                bail!("[{op}] The requested group size {group_size} is not supported. The supported group sizes are 32, 64, and 128.");
            }
            if ![2, 3, 4, 5, 6, 8].contains(&bits) {
                // (mlx also has 1-bit affine, which wick's kernels do not implement)
                bail!("[{op}] The requested number of bits {bits} is not supported. The supported bits are 2, 3, 4, 5, 6 and 8 (mlx's 1-bit affine is not implemented in wick).");
            }
            return Ok(());
        }
        let (g, b) = self.defaults();
        let name = self.name();
        if group_size != g {
            bail!("[{op}] {name} quantization requires group size {g} but got {group_size}.");
        }
        if bits != b {
            bail!("[{op}] {name} quantization requires bits to be {b} but got {bits}.");
        }
        Ok(())
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
