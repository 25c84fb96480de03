//! Rotary position embeddings applied from cos/sin tables (candle's kernels).

use anyhow::Result;
use candle_core::{Tensor, D};

/// RoPE tables for one forward pass.
#[derive(Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub dims: usize,
    pub traditional: bool,
}

impl RopeTables {
    /// Applies RoPE to `x` of shape (B, heads, L, head_dim).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(3)?;
        let rot = if self.dims < head_dim { x.narrow(D::Minus1, 0, self.dims)?.contiguous()? } else { x.contiguous()? };
        // training: candle's fused kernels have no backward; their tensor-op forms do
        let out = match (self.traditional, rot.track_op()) {
            (true, false) => candle_nn::rotary_emb::rope_i(&rot, &self.cos, &self.sin)?,
            (false, false) => candle_nn::rotary_emb::rope(&rot, &self.cos, &self.sin)?,
            (true, true) => candle_nn::rotary_emb::rope_i_slow(&rot, &self.cos, &self.sin)?,
            (false, true) => candle_nn::rotary_emb::rope_slow(&rot, &self.cos, &self.sin)?,
        };
        if self.dims < head_dim {
            let pass = x.narrow(D::Minus1, self.dims, head_dim - self.dims)?;
            Ok(Tensor::cat(&[&out, &pass], D::Minus1)?)
        } else {
            Ok(out)
        }
    }
}
