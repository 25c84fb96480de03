//! Files in and out: a model folder's `config.json`, its safetensors weights (memory-mapped), and
//! outputs written atomically (a temporary file or folder renamed into place).

mod config;
pub mod output;
mod weights;

pub use config::{generation_eos_ids, ConfigFile};
pub use weights::Weights;
