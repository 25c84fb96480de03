//! Running a loaded model: generation (chunked prefill, decode loop, statistics), batches,
//! speculative decoding, sampling, chat sessions, prompt-cache files, perplexity, and on CUDA
//! the decode step replayed from a graph.

pub mod batch;
pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
pub mod generate;
mod load;
pub mod perplexity;
pub mod prompt_cache;
pub mod sample;
pub mod speculative;

pub use load::{load_model, load_model_adapted, load_model_with};
