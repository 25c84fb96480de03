//! [`CausalConv1d`]: the depthwise causal convolution of recurrent layers (mlx's `nn.Conv1d` with
//! `groups = channels` as LFM2, Qwen3-Next and Mamba use it), run on a sequence after the last
//! `kernel - 1` inputs of the one before (the layer's conv state).

use super::Loader;
use crate::io::Weights;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Every `conv1d.weight` still in Hugging Face's layout (channels, 1, kernel) in mlx's
/// (channels, kernel, 1), as the recurrent families' `sanitize`s do; whether there was one.
pub fn conv1d_weights_to_mlx(weights: &mut Weights) -> Result<bool> {
    let names: Vec<String> = weights.names().filter(|k| k.contains("conv1d.weight")).map(str::to_string).collect();
    let mut any = false;
    for k in &names {
        if weights.shape(k)?.last() != Some(&1) {
            weights.transpose(k, 1, 2)?;
            any = true;
        }
    }
    Ok(any)
}

#[derive(Debug, Clone)]
pub struct CausalConv1d {
    /// (kernel, channels) in f32: tap j of every channel
    taps: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
    channels: usize,
}

impl CausalConv1d {
    /// `{p}.weight` in mlx's layout (channels, kernel, 1), and `{p}.bias` (channels) when `bias`.
    pub fn load(ld: &Loader, p: &str, channels: usize, kernel: usize, bias: bool) -> Result<Self> {
        if kernel == 0 {
            bail!("layer `{p}`: a convolution kernel of 0 taps");
        }
        let w = ld.tensor(&format!("{p}.weight"), &[channels, kernel, 1])?;
        let taps = w.reshape((channels, kernel))?.t()?.to_dtype(DType::F32)?.contiguous()?;
        let bias = if bias { Some(ld.tensor(&format!("{p}.bias"), &[channels])?) } else { None };
        Ok(Self { taps, bias, kernel, channels })
    }

    /// The inputs a state keeps: the last `kernel - 1`.
    pub fn state_len(&self) -> usize {
        self.kernel - 1
    }

    /// `x` (B, S, channels) after `state` (B, kernel-1, channels; zeros when None): the
    /// convolution (B, S, channels) in `x`'s dtype (summed in f32, rounded once, then the bias
    /// added) and the new state (the last kernel-1 inputs of state ++ x).
    pub fn forward(&self, x: &Tensor, state: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, s, c) = x.dims3()?;
        if c != self.channels {
            bail!("convolution over {c} channels; the layer has {}", self.channels);
        }
        let k1 = self.state_len();
        let state = match state {
            Some(t) => t.to_dtype(x.dtype())?,
            None => Tensor::zeros((b, k1, c), x.dtype(), x.device())?,
        };
        let full = Tensor::cat(&[&state, x], 1)?;
        let new_state = full.narrow(1, s, k1)?.contiguous()?;
        let f = full.to_dtype(DType::F32)?;
        let taps = &self.taps;
        let mut acc = f.narrow(1, 0, s)?.broadcast_mul(&taps.get(0)?)?;
        for j in 1..self.kernel {
            acc = (acc + f.narrow(1, j, s)?.broadcast_mul(&taps.get(j)?)?)?;
        }
        let mut y = acc.to_dtype(x.dtype())?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        Ok((y, new_state))
    }
}
