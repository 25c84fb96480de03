//! `wick convert`: a GGUF file (`--gguf`) or a Hugging Face / mlx folder (`--hf-path`) to an
//! mlx-style folder, optionally cast, quantized or dequantized (mlx_lm.convert's flags).

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A llama.cpp GGUF file to import
    #[arg(long, conflicts_with = "hf_path")]
    pub gguf: Option<PathBuf>,
    /// A Hugging Face / mlx model folder to convert
    #[arg(long)]
    pub hf_path: Option<String>,
    /// Where to write the mlx-style folder
    #[arg(long, default_value = "mlx_model")]
    pub mlx_path: PathBuf,
    /// Replace --mlx-path if it exists
    #[arg(long)]
    pub force: bool,
    /// Weight dtype of the output: float16, bfloat16 or float32 (GGUF import: float16)
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(a: ConvertArgs) -> Result<i32> {
    if let Some(g) = &a.gguf {
        let dtype = match &a.dtype {
            Some(d) => crate::device::parse_dtype(d).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?,
            None => candle_core::DType::F16,
        };
        let out = crate::gguf::import(g, &a.mlx_path, dtype, a.force)?;
        println!("[INFO] Imported {} to {}", g.display(), out.display());
        return Ok(0);
    }
    if a.hf_path.is_some() {
        bail!("--hf-path conversion is not available yet in this version; use --gguf FILE");
    }
    bail!("nothing to convert: pass --gguf FILE or --hf-path FOLDER")
}
