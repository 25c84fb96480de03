//! `wick convert` (mlx_lm.convert's flags) and `wick quantize` (its short form for a folder):
//! a GGUF file (`--gguf`) or a model folder (`--hf-path`) to an mlx-style folder, optionally
//! cast (`--dtype`), quantized (`-q`) or dequantized (`-d`).

use crate::convert::{convert, ConvertOptions, QuantizeOptions, QUANT_RECIPES};
use crate::quant::{Mode, QuantParams};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

/// Quantization flags shared by `convert` and `quantize`.
#[derive(Args, Debug, Clone)]
pub struct QuantFlags {
    /// Bits per weight (affine: 2, 3, 4, 5, 6, 8; mxfp4 / nvfp4: 4; mxfp8: 8); default: the mode's
    #[arg(long)]
    pub q_bits: Option<usize>,
    /// Group size (affine: 32, 64, 128; mxfp4 / mxfp8: 32; nvfp4: 16); default: the mode's (affine 64)
    #[arg(long)]
    pub q_group_size: Option<usize>,
    /// Quantization mode: affine, mxfp4, nvfp4 or mxfp8
    #[arg(long, default_value = "affine", value_parser = ["affine", "mxfp4", "nvfp4", "mxfp8"])]
    pub q_mode: String,
    /// Mixed-precision recipe: mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6
    #[arg(long)]
    pub quant_predicate: Option<String>,
    /// Weight dtype of the output: float16, bfloat16 or float32 (default: config.json's torch_dtype)
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace --mlx-path if it exists
    #[arg(long)]
    pub force: bool,
}

impl QuantFlags {
    fn options(&self, quantize: bool, dequantize: bool) -> Result<ConvertOptions> {
        let dtype = self
            .dtype
            .as_deref()
            .map(crate::backend::device::parse_dtype)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
        let mode = Mode::parse(&self.q_mode).map_err(|e| anyhow::anyhow!("--q-mode: {e}"))?;
        if let Some(r) = &self.quant_predicate {
            if !QUANT_RECIPES.contains(&r.as_str()) {
                bail!("--quant-predicate {r}: expected one of {}", QUANT_RECIPES.join(", "));
            }
            if mode != Mode::Affine {
                bail!(
                    "--quant-predicate {r} with --q-mode {mode}: Quant predicates only support 'affine' quantization."
                );
            }
        }
        let quantize = if quantize {
            let params = QuantParams::with_mode(mode, self.q_group_size, self.q_bits, "--q-group-size/--q-bits")?;
            Some(QuantizeOptions { params, recipe: self.quant_predicate.clone() })
        } else {
            if self.q_bits.is_some() || self.q_group_size.is_some() || self.quant_predicate.is_some() {
                bail!("--q-bits, --q-group-size and --quant-predicate need -q/--quantize");
            }
            None
        };
        Ok(ConvertOptions { dtype, quantize, dequantize, force: self.force, adapter: None })
    }
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A llama.cpp GGUF file to import
    #[arg(long, conflicts_with = "hf_path")]
    pub gguf: Option<PathBuf>,
    /// A Hugging Face / mlx model folder, or a Hugging Face repo id, to convert
    #[arg(long)]
    pub hf_path: Option<String>,
    /// Branch, tag or commit of the repo id given to --hf-path
    #[arg(long)]
    pub revision: Option<String>,
    /// Where to write the mlx-style folder
    #[arg(long, default_value = "mlx_model")]
    pub mlx_path: PathBuf,
    /// Quantize the model
    #[arg(short = 'q', long)]
    pub quantize: bool,
    /// Dequantize a quantized model
    #[arg(short = 'd', long)]
    pub dequantize: bool,
    #[command(flatten)]
    pub flags: QuantFlags,
}

pub fn run(a: ConvertArgs) -> Result<i32> {
    if let Some(g) = &a.gguf {
        // without --dtype: the architecture's (bfloat16 for gemma, else float16)
        let dtype = match &a.flags.dtype {
            Some(d) => Some(crate::backend::device::parse_dtype(d).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?),
            None => None,
        };
        if a.dequantize {
            bail!("--gguf imports to float already; -d/--dequantize applies to quantized mlx folders");
        }
        if !a.quantize {
            a.flags.options(false, false)?; // refuses --q-bits & co. without -q
            let out = crate::convert::gguf::import(g, &a.mlx_path, dtype, a.flags.force)?;
            println!("[INFO] Imported {} to {}", g.display(), out.display());
            return Ok(0);
        }
        // -q: import to float beside the output, then quantize as --hf-path does
        let opts = a.flags.options(true, false)?;
        let parent = a.mlx_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = tempfile::Builder::new().prefix(".wick-gguf-").tempdir_in(parent)?;
        let float = crate::convert::gguf::import(g, &tmp.path().join("float"), dtype, false)?;
        let out = convert(&float, &a.mlx_path, &opts)?;
        println!("[INFO] Imported {} and quantized it to {}", g.display(), out.display());
        return Ok(0);
    }
    let Some(src) = &a.hf_path else {
        bail!("nothing to convert: pass --hf-path FOLDER or --gguf FILE");
    };
    let src = crate::hub::resolve_model(Some(src), a.revision.as_deref())?;
    let opts = a.flags.options(a.quantize, a.dequantize)?;
    let out = convert(&src, &a.mlx_path, &opts)?;
    println!("[INFO] Saved to {}", out.display());
    Ok(0)
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The float model folder or repo id to quantize (the default model when omitted)
    #[arg(long)]
    pub model: Option<String>,
    /// Branch, tag or commit of the repo id given to --model
    #[arg(long)]
    pub revision: Option<String>,
    /// Where to write the quantized folder
    #[arg(long)]
    pub mlx_path: PathBuf,
    #[command(flatten)]
    pub flags: QuantFlags,
}

pub fn run_quantize(a: QuantizeArgs) -> Result<i32> {
    let src = crate::hub::resolve_model(a.model.as_deref(), a.revision.as_deref())?;
    let opts = a.flags.options(true, false)?;
    let out = convert(&src, &a.mlx_path, &opts)?;
    println!("[INFO] Saved to {}", out.display());
    Ok(0)
}
