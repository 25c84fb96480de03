//! wick: mlx_lm's command line as a Rust library.
//!
//! Layers import only downward (tests/layers.rs enforces the order below; see
//! `docs/ARCHITECTURE.md`): quant → backend → io → tokenizer → ops → cache → nn → models →
//! engine → lora → convert → hub → server → cli.

pub mod backend;
pub mod cache;
pub mod cli;
pub mod convert;
pub mod engine;
pub mod hub;
pub mod io;
pub mod lora;
pub mod models;
pub mod nn;
pub mod ops;
pub mod quant;
pub mod server;
pub mod tokenizer;

pub use anyhow::{Error, Result};
