//! The Hugging Face hub and its local cache, shared with Python's huggingface_hub:
//! `$HF_HUB_CACHE/models--org--name/{blobs,refs,snapshots}`.
//!
//! - [`HubEnv`]: where the cache is and how to reach the hub (`HF_HUB_CACHE`, `HF_HOME`,
//!   `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`), read the way huggingface_hub reads them.
//! - [`resolve_repo`]: a repo id to a snapshot folder, from the cache when it holds a complete
//!   snapshot (no request at all), else downloaded through hf-hub with progress bars and resume.
//! - [`scan`]: reading and deleting cache entries, for `wick manage`.

mod download;
mod resolve;
pub mod scan;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub use download::resolve_repo;
pub use resolve::{default_model_dir, resolve_model, ModelSource, DEFAULT_MODEL_DIR};

/// The files mlx_lm fetches for a model (its `DEFAULT_ALLOW_PATTERNS`), matched like fnmatch.
pub const MODEL_FILE_PATTERNS: &[&str] = &[
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
];

/// The public hub, when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the hub and where its cache is, from the environment.
#[derive(Debug, Clone)]
pub struct HubEnv {
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `~` at the start of a path, as Python's `expanduser`.
fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~"), env_nonempty("HOME")) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => PathBuf::from(format!("{home}{rest}")),
        _ => PathBuf::from(p),
    }
}

/// huggingface_hub's truthy values for boolean variables.
fn env_true(name: &str) -> bool {
    env_nonempty(name).is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

impl HubEnv {
    pub fn from_env() -> Self {
        let hf_home = env_nonempty("HF_HOME").map(|p| expand_home(&p)).unwrap_or_else(|| {
            let xdg =
                env_nonempty("XDG_CACHE_HOME").map(|p| expand_home(&p)).unwrap_or_else(|| expand_home("~/.cache"));
            xdg.join("huggingface")
        });
        let cache_dir = env_nonempty("HF_HUB_CACHE")
            .or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
            .map(|p| expand_home(&p))
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = env_nonempty("HF_TOKEN").or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = env_nonempty("HF_TOKEN_PATH").map(|p| expand_home(&p)).unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE");
        Self { cache_dir, endpoint: endpoint.trim_end_matches('/').to_string(), token, offline }
    }

    /// The cache folder of a model repo: `models--org--name`.
    pub fn repo_dir(&self, repo_id: &str) -> PathBuf {
        self.cache_dir.join(repo_folder_name("model", repo_id))
    }
}

/// huggingface_hub's folder name for a repo: `{type}s--{id with / as --}`.
pub fn repo_folder_name(repo_type: &str, repo_id: &str) -> String {
    format!("{repo_type}s--{}", repo_id.replace('/', "--"))
}

/// Whether `s` can be a hub repo id (`name` or `org/name`, the hub's allowed characters).
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.is_empty() || parts.len() > 2 || s.len() > 96 || s.contains("--") || s.contains("..") {
        return false;
    }
    parts.iter().all(|p| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    })
}

/// Whether a revision is a full commit hash (then it names a snapshot folder directly).
pub fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Shell-style match where `*` matches any run of characters (also `/`) and `?` one character,
/// as Python's fnmatch, which huggingface_hub's `allow_patterns` use.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether a repo file is one a model needs ([`MODEL_FILE_PATTERNS`]).
pub fn is_model_file(name: &str) -> bool {
    MODEL_FILE_PATTERNS.iter().any(|p| fnmatch(p, name))
}

/// Whether a snapshot folder holds a whole model: config.json (which wick fetches last, so it
/// marks a finished download), the weights (every shard the index lists, or a `model*.safetensors`)
/// and a tokenizer.
pub fn snapshot_is_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    let index = dir.join("model.safetensors.index.json");
    let weights_ok = if index.is_file() {
        let shards = std::fs::read_to_string(&index)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("weight_map").and_then(|m| m.as_object()).cloned());
        match shards {
            Some(map) => map.values().filter_map(|f| f.as_str()).all(|f| dir.join(f).is_file()),
            None => false,
        }
    } else {
        std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                fnmatch("model*.safetensors", &n) && e.path().is_file()
            })
        })
    };
    let tokenizer_ok =
        ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"].iter().any(|f| dir.join(f).is_file());
    weights_ok && tokenizer_ok
}

/// The commit a revision points to in a cached repo: the revision itself when it is a commit
/// hash, else the content of `refs/{revision}`.
pub fn cached_commit(repo_dir: &Path, revision: &str) -> Option<String> {
    if is_commit_hash(revision) {
        return Some(revision.to_string());
    }
    let c = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let c = c.trim().to_string();
    (!c.is_empty()).then_some(c)
}

/// A complete cached snapshot of `repo_id` at `revision`, if there is one.
pub fn cached_snapshot(env: &HubEnv, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = env.repo_dir(repo_id);
    let commit = cached_commit(&repo_dir, revision)?;
    let snap = repo_dir.join("snapshots").join(commit);
    snapshot_is_complete(&snap).then_some(snap)
}

/// Checks a `--revision` value before it becomes part of a path or URL.
pub fn check_revision(rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && !rev.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        && rev.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if !ok {
        bail!("--revision `{rev}`: expected a branch, tag or commit hash");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_as_python() {
        assert!(fnmatch("*.json", "config.json"));
        assert!(fnmatch("*.json", "sub/dir/config.json"));
        assert!(fnmatch("model*.safetensors", "model-00001-of-00002.safetensors"));
        assert!(!fnmatch("model*.safetensors", "consolidated.safetensors"));
        assert!(!fnmatch("*.json", "config.json.bak"));
        assert!(fnmatch("tokenizer.model", "tokenizer.model"));
        assert!(!fnmatch("tokenizer.model", "tokenizer_model"));
        assert!(fnmatch("t?k", "tok"));
    }

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("mlx-community/Llama-3.2-1B-Instruct-4bit"));
        assert!(is_repo_id("gpt2"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("./rel"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("org/../x"));
        assert!(!is_repo_id("org--x/y"));
        assert_eq!(repo_folder_name("model", "org/name"), "models--org--name");
    }
}
