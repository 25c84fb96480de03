//! Shared layers every architecture is built from: [`Linear`] (dense, quantized or adapted),
//! [`MultiLinear`] (one per head),
//! [`Embedding`] (dense or quantized, also the tied lm head), [`RmsNorm`] / [`LayerNorm`],
//! [`Rope`], the [`Loader`] they read their tensors through, and the LoRA / DoRA adapter layer.

mod conv;
mod embedding;
mod linear;
mod loader;
pub mod lora;
mod multi_linear;
mod norm;
mod rope;
mod switch;

pub use crate::ops::rope::RopeTables;
pub use conv::{conv1d_weights_to_mlx, CausalConv1d};
pub use embedding::Embedding;
pub use linear::{fused_qkv, fused_swiglu, Linear};
pub use loader::Loader;
pub use multi_linear::MultiLinear;
#[cfg(feature = "testing")]
pub use norm::set_deferred_norms;
pub use norm::{rms_normalize, Branch, DeferredNorm, LayerNorm, Normed, RmsNorm};
pub use rope::Rope;
pub use switch::SwitchLinear;
