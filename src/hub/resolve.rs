//! Resolving `--model` to a folder: the default model, a folder, a `.gguf` file (imported for the
//! run) or a Hugging Face repo id (from the cache or downloaded).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where the default model lives, relative to the repository (see `models/README.md`).
pub const DEFAULT_MODEL_DIR: &str = "models/SmolLM2-135M-Instruct";

/// Finds the default model folder: `$WICK_DEFAULT_MODEL`, else `models/SmolLM2-135M-Instruct`
/// under the current directory or next to the executable's repository.
pub fn default_model_dir() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("WICK_DEFAULT_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = vec![PathBuf::from(DEFAULT_MODEL_DIR)];
    if let Ok(exe) = std::env::current_exe() {
        // target/{release,debug}/wick → repository root
        for anc in exe.ancestors().skip(1).take(4) {
            candidates.push(anc.join(DEFAULT_MODEL_DIR));
        }
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL_DIR));
    for c in &candidates {
        if c.join("config.json").is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "no --model given and the default model is not installed at {DEFAULT_MODEL_DIR}; \
         run `models/fetch-default.sh` (see models/README.md) or pass --model PATH"
    )
}

/// Resolves `--model`: the default model when `None`; else an existing folder; else a Hugging
/// Face repo id (`org/name`), from the cache or downloaded (see [`crate::hub`]).
pub fn resolve_model(model: Option<&str>, revision: Option<&str>) -> Result<PathBuf> {
    let Some(m) = model else {
        return default_model_dir();
    };
    let p = PathBuf::from(m);
    if p.is_dir() {
        if !p.join("config.json").is_file() {
            bail!("model folder {} has no config.json", p.display());
        }
        return Ok(p);
    }
    if p.is_file() {
        if is_gguf(&p) {
            bail!("{m} is a GGUF file: import it with `wick convert --gguf {m} --mlx-path DIR`, then pass --model DIR");
        }
        bail!("--model {m} is a file; expected a model folder with config.json and *.safetensors, a .gguf file or a repo id");
    }
    if crate::hub::is_repo_id(m) && !m.starts_with('.') {
        return crate::hub::resolve_repo(m, revision)
            .with_context(|| format!("there is no folder `{m}`, so it was taken as a Hugging Face repo id"));
    }
    bail!("model '{m}' not found: no such folder, and not a Hugging Face repo id (expected org/name)")
}

fn is_gguf(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A model to load: a folder, or a GGUF file imported into a temporary folder that lives as
/// long as this value (the weights stay readable after it goes: they are memory-mapped).
pub struct ModelSource {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl ModelSource {
    /// Like [`resolve_model`], but a `.gguf` file is imported (dequantized to `dtype`, by default
    /// the architecture's: bf16 for gemma, else f16).
    pub fn resolve(model: Option<&str>, revision: Option<&str>, dtype: Option<candle_core::DType>) -> Result<Self> {
        if let Some(m) = model.map(Path::new).filter(|p| p.is_file() && is_gguf(p)) {
            let tmp = tempfile::Builder::new().prefix("wick-gguf-").tempdir()?;
            eprintln!("[INFO] Importing {} (GGUF) for this run", m.display());
            let dir = crate::convert::gguf::import(m, &tmp.path().join("model"), dtype, false)?;
            return Ok(Self { dir, _tmp: Some(tmp) });
        }
        Ok(Self { dir: resolve_model(model, revision)?, _tmp: None })
    }
}
