//! The ops, one folder each: `mod.rs` is the op and its dispatch, its CPU / CUDA / Metal sides
//! and kernel sources sit beside it.

pub mod argmax;
pub mod attention;
pub mod dense_matmul;
pub mod gated_delta;
pub mod gather_mm;
pub mod norm;
pub mod qmatmul;
pub mod rope;
pub mod swiglu;
