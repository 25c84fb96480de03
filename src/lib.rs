//! wick: mlx_lm's command line as a Rust library.
//!
//! Data flows one way: resolve → load → model → generate → output. See `docs/ARCHITECTURE.md`.

pub mod batch;
pub mod cache;
pub mod chat;
pub mod cli;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod kernels;
pub mod load;
pub mod lora;
pub mod memory;
#[cfg(feature = "metal")]
pub mod metal;
pub mod models;
pub mod nn;
pub mod output;
pub mod perplexity;
pub mod prompt_cache;
pub mod quant;
pub mod sample;
pub mod server;
pub mod speculative;
pub mod tokenizer;

pub use anyhow::{Error, Result};
