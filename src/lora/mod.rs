//! Fine-tuning in mlx_lm's formats: training (LoRA / DoRA / full), its data and optimizers, and
//! fusing adapters into a model. The adapter layer itself is `crate::nn::lora`.

pub mod data;
pub mod fuse;
pub mod optim;
pub mod train;
