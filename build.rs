//! With the `cuda` feature, compiles wick's CUDA kernels (one source per op under src/ops/: the
//! quantized matmuls, affine and float modes, attention, residual add + RMSNorm, SwiGLU, greedy
//! decoding's argmax) with nvcc, each into one fatbin: SASS for `CUDA_COMPUTE_CAP` (default 90,
//! the H100/H200) plus PTX for compute_80, which the driver JIT-compiles on any other GPU of
//! compute capability 8.0 or newer.
//! Without the feature nothing is built and no CUDA toolchain is needed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    const SOURCES: [(&str, &str); 6] = [
        ("src/ops/qmatmul/affine.cu", "affine"),
        ("src/ops/qmatmul/fp.cu", "fp"),
        ("src/ops/attention/attention.cu", "attention"),
        ("src/ops/norm/norm.cu", "norm"),
        ("src/ops/swiglu/swiglu.cu", "swiglu"),
        ("src/ops/argmax/argmax.cu", "argmax"),
    ];
    for (src, _) in SOURCES {
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-changed=src/backend/cuda/common.cuh");
    println!("cargo:rerun-if-changed=src/ops/qmatmul/affine_chunk.h");
    println!("cargo:rerun-if-changed=src/ops/qmatmul/decode_rows.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC")
        .ok()
        .or_else(|| std::env::var("CUDA_ROOT").ok().map(|r| format!("{r}/bin/nvcc")))
        .unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().replace('.', "");
    for (src, name) in SOURCES {
        let out = out_dir.join(format!("{name}.fatbin"));
        let status = Command::new(&nvcc)
            .args(["-fatbin", "-O3", "-std=c++17"])
            .arg(format!("-gencode=arch=compute_{cap},code=sm_{cap}"))
            .arg("-gencode=arch=compute_80,code=compute_80")
            .arg(src)
            .arg("-o")
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed ({s}) compiling {src}"),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc (CUDA 13.0) to compile {src}, and `{nvcc}` could not be run: {e}. \
                 Run `source scripts/cuda-toolchain.sh` first (see docs/cuda.md), or set NVCC / CUDA_ROOT."
            ),
        }
    }
}
