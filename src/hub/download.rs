//! Fetching a model repo into the cache through hf-hub: only the files a model needs, one
//! progress bar per file, partial blobs (`blobs/<etag>.part`) resumed from where they stopped.

use super::{cached_commit, cached_snapshot, check_revision, is_commit_hash, is_model_file, HubEnv};
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Attempts per file before a download fails (each one resumes where the last stopped).
const RETRIES: usize = 3;

/// A repo id at a revision (default `main`) as a snapshot folder: the cached one when it is
/// complete (no request is made), else downloaded. `HF_HUB_OFFLINE` forbids downloading.
pub fn resolve_repo(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let env = HubEnv::from_env();
    let revision = revision.unwrap_or("main");
    check_revision(revision)?;
    if let Some(snap) = cached_snapshot(&env, repo_id, revision) {
        return Ok(snap);
    }
    if env.offline {
        bail!(
            "model '{repo_id}' (revision {revision}) is not in the Hugging Face cache at {} and \
             HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it once, or pass a local folder with --model",
            env.cache_dir.display()
        );
    }
    download_model(&env, repo_id, revision)
}

/// One indicatif bar per file, in bytes (hidden when stderr is not a terminal).
struct FileBar(ProgressBar);

impl Progress for FileBar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {}
}

/// Turns hf-hub's errors into messages that say what to do.
fn explain(e: ApiError, env: &HubEnv, repo_id: &str, what: &str) -> anyhow::Error {
    let status = match &e {
        ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(t) => {
                return anyhow!(
                    "cannot reach the Hugging Face hub at {} for {what} of '{repo_id}': {t} \
                     (set HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=1 to use only the cache)",
                    env.endpoint
                )
            }
        },
        _ => None,
    };
    match status {
        Some(401) | Some(403) => anyhow!(
            "the hub at {} refused {what} of '{repo_id}' (HTTP {}): the repo is private or gated; \
             set HF_TOKEN to a token that has access",
            env.endpoint,
            status.unwrap()
        ),
        Some(404) => anyhow!(
            "'{repo_id}' not found on the hub at {} ({what}: HTTP 404); check the repo id and --revision",
            env.endpoint
        ),
        _ => anyhow!("downloading {what} of '{repo_id}' from {} failed: {e}", env.endpoint),
    }
}

fn download_model(env: &HubEnv, repo_id: &str, revision: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(&env.cache_dir)
        .with_context(|| format!("cannot create the Hugging Face cache folder {}", env.cache_dir.display()))?;
    let api = ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_retries(RETRIES)
        .with_progress(false)
        .build()
        .map_err(|e| anyhow!("cannot set up downloads from {}: {e}", env.endpoint))?;
    let repo = api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string()));
    let info = repo.info().map_err(|e| explain(e, env, repo_id, "the file list"))?;

    let mut files: Vec<String> =
        info.siblings.iter().map(|s| s.rfilename.clone()).filter(|f| is_model_file(f)).collect();
    if !files.iter().any(|f| f == "config.json") {
        bail!("'{repo_id}' (revision {revision}) has no config.json: it is not a model wick can load");
    }
    // config.json last: its presence in a snapshot marks a finished download
    files.sort_by_key(|f| (f == "config.json", f.clone()));

    let repo_dir = env.repo_dir(repo_id);
    let snapshot = repo_dir.join("snapshots").join(&info.sha);
    let style = ProgressStyle::with_template("{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})")
        .expect("valid template")
        .progress_chars("=> ");
    let todo: Vec<&String> = files.iter().filter(|f| !snapshot.join(f).is_file()).collect();
    if !todo.is_empty() {
        eprintln!("Fetching {} file(s) of {repo_id} into {}", todo.len(), env.cache_dir.display());
    }
    for f in todo {
        let bar = ProgressBar::new(0).with_style(style.clone());
        repo.download_with_progress(f, FileBar(bar.clone())).map_err(|e| explain(e, env, repo_id, f))?;
        bar.finish_and_clear();
    }
    // hf-hub writes refs/<revision> even when the revision is a commit hash; huggingface_hub
    // keeps refs for branch and tag names only
    if is_commit_hash(revision) {
        let _ = std::fs::remove_file(repo_dir.join("refs").join(revision));
    }
    clean_locks(&repo_dir);
    let commit = cached_commit(&repo_dir, revision).unwrap_or(info.sha);
    Ok(repo_dir.join("snapshots").join(commit))
}

/// Removes the lock files hf-hub leaves next to finished blobs.
fn clean_locks(repo_dir: &std::path::Path) {
    if let Ok(rd) = std::fs::read_dir(repo_dir.join("blobs")) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "lock") && p.with_extension("part").symlink_metadata().is_err() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
