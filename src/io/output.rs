//! Writing model folders atomically: everything goes into a temporary folder beside the target,
//! which is renamed into place only when complete. An existing target is refused unless forced.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct AtomicFolder {
    target: PathBuf,
    tmp: Option<tempfile::TempDir>,
    force: bool,
}

impl AtomicFolder {
    /// Prepares to write `target`; fails at once if it exists and `force` is not set.
    pub fn create(target: &Path, force: bool, flag: &str) -> Result<Self> {
        if target.exists() && !force {
            bail!("{flag} {} already exists; pass --force to replace it", target.display());
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.wick-tmp-"))
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
        Ok(Self { target: target.to_path_buf(), tmp: Some(tmp), force })
    }

    /// Path of a file inside the folder being written.
    pub fn path(&self, file: &str) -> PathBuf {
        self.tmp.as_ref().expect("not committed").path().join(file)
    }

    /// Writes a JSON file, pretty-printed as mlx_lm writes them.
    pub fn write_json(&self, file: &str, v: &serde_json::Value) -> Result<()> {
        let s = serde_json::to_string_pretty(v)?;
        std::fs::write(self.path(file), s + "\n").with_context(|| format!("cannot write {file}"))
    }

    /// Moves the finished folder into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let tmp = self.tmp.take().expect("not committed").keep();
        make_readable(&tmp)?;
        if self.target.exists() {
            if !self.force {
                bail!("{} appeared while writing; not replacing it", self.target.display());
            }
            let old = tmp.with_extension("old");
            std::fs::rename(&self.target, &old)?;
            std::fs::rename(&tmp, &self.target)?;
            if old.is_dir() {
                std::fs::remove_dir_all(&old)?;
            } else {
                std::fs::remove_file(&old)?;
            }
        } else {
            std::fs::rename(&tmp, &self.target)
                .with_context(|| format!("cannot move the finished folder to {}", self.target.display()))?;
        }
        Ok(self.target.clone())
    }
}

/// Copies the tokenizer and generation files of a model folder into `out`.
pub fn copy_tokenizer_files(src: &Path, out: &AtomicFolder) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
    ] {
        let p = src.join(f);
        if p.is_file() {
            std::fs::copy(&p, out.path(f)).with_context(|| format!("cannot copy {}", p.display()))?;
        }
    }
    Ok(())
}

/// Temporary folders and files are created private (0700/0600); a model folder is shared like
/// any other output (0755/0644, less the umask's bits as usual).
fn make_readable(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644))?;
            }
        }
    }
    let _ = dir;
    Ok(())
}

/// Writes the file `path` atomically: `write` fills a temporary file beside it, which is then
/// renamed into place, so a reader never sees a half-written file.
pub fn write_file_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".wick-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    write(tmp.path()).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).map_err(|e| anyhow::anyhow!("cannot write {}: {}", path.display(), e.error))?;
    Ok(())
}
