//! Training adapters (`wick lora`): mlx_lm's loss, batching, optimizers, learning-rate
//! schedules and training loop.

use crate::models::LanguageModel;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// mlx_lm's `default_loss`: mean cross-entropy of predicting `batch[:, 1:]` from
/// `batch[:, :-1]`, over the target positions `t` (1-based) with `offset ≤ t ≤ length` of each
/// row's `(offset, length)`. Returns the loss (a scalar, f32) and the number of tokens in it.
pub fn loss(model: &dyn LanguageModel, batch: &Tensor, lengths: &[(usize, usize)]) -> Result<(Tensor, usize)> {
    let (b, t) = batch.dims2()?;
    if lengths.len() != b || t < 2 {
        bail!("loss: a batch of {b} rows of {t} tokens with {} lengths", lengths.len());
    }
    let inputs = batch.narrow(1, 0, t - 1)?;
    let targets = batch.narrow(1, 1, t - 1)?.contiguous()?;
    let mut cache = model.make_cache(None);
    let logits = model.forward(&inputs, &mut cache, false)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?; // (B, T-1)
    let mut mask = vec![0f32; b * (t - 1)];
    let mut ntoks = 0;
    for (row, &(offset, length)) in lengths.iter().enumerate() {
        for j in 0..t - 1 {
            let step = j + 1;
            if step >= offset && step <= length {
                mask[row * (t - 1) + j] = 1.0;
                ntoks += 1;
            }
        }
    }
    if ntoks == 0 {
        bail!("loss: the batch has no target tokens (every position is masked)");
    }
    let mask = Tensor::from_vec(mask, (b, t - 1), &Device::Cpu)?.to_device(batch.device())?;
    let ce = (picked * mask)?.sum_all()?.neg()?;
    Ok(((ce / ntoks as f64)?, ntoks))
}
