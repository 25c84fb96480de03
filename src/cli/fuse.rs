//! `wick fuse`: mlx_lm.fuse's flags — fold a folder of adapters into the model and write a
//! standalone model folder.

use crate::convert::{convert, ConvertOptions};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct FuseArgs {
    /// The model folder (or repo id / .gguf, as for every command); the default model when omitted
    #[arg(long)]
    pub model: Option<String>,
    /// Branch, tag or commit of a repo id given to --model
    #[arg(long)]
    pub revision: Option<String>,
    /// Where to write the fused model
    #[arg(long, default_value = "fused_model")]
    pub save_path: PathBuf,
    /// Folder of the trained adapter weights and config
    #[arg(long, default_value = "adapters")]
    pub adapter_path: PathBuf,
    /// Write a float model: every quantized layer dequantized
    #[arg(long)]
    pub dequantize: bool,
    /// Replace --save-path if it exists
    #[arg(long)]
    pub force: bool,
    /// Export the weights in GGUF format (not supported by wick)
    #[arg(long)]
    pub export_gguf: bool,
    /// Upload to a Hugging Face repo (not supported by wick: the hub is read-only here)
    #[arg(long)]
    pub upload_repo: Option<String>,
    /// Accepted for mlx_lm compatibility; wick runs no remote code
    #[arg(long)]
    pub trust_remote_code: bool,
}

pub fn run(a: FuseArgs) -> Result<i32> {
    if a.export_gguf {
        bail!("--export-gguf: wick does not write GGUF files; fuse to a folder and use llama.cpp's convert script");
    }
    if a.upload_repo.is_some() {
        bail!("--upload-repo: wick does not upload to the Hugging Face hub; upload --save-path with `huggingface-cli upload`");
    }
    let src = crate::hub::ModelSource::resolve(a.model.as_deref(), a.revision.as_deref(), None)?;
    eprintln!("Loading pretrained model from {}", src.dir.display());
    let opts = ConvertOptions {
        dequantize: a.dequantize,
        force: a.force,
        adapter: Some(a.adapter_path.clone()),
        ..Default::default()
    };
    let out = convert(&src.dir, &a.save_path, &opts)?;
    eprintln!("Fused {} into {}", a.adapter_path.display(), out.display());
    Ok(0)
}
