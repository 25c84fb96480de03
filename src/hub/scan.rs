//! Reading the cache as huggingface_hub's `scan_cache_dir` does (same repos, sizes, file counts,
//! times and refs), and deleting whole repos from it without ever leaving it.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One repo of the cache.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    pub repo_id: String,
    /// model, dataset or space
    pub repo_type: String,
    pub path: PathBuf,
    /// sum of the sizes of the distinct blobs its snapshots point to
    pub size_on_disk: u64,
    /// number of distinct blobs
    pub nb_files: usize,
    pub last_accessed: SystemTime,
    pub last_modified: SystemTime,
    /// ref names (e.g. `main`), over all revisions, sorted
    pub refs: Vec<String>,
    /// commit hashes of the cached snapshots, sorted
    pub revisions: Vec<String>,
}

/// A folder of the cache that looks like a repo but could not be read; it is reported, not listed.
#[derive(Debug, Clone)]
pub struct CorruptRepo {
    pub path: PathBuf,
    /// the repo id its folder name says, when it says one
    pub repo_id: Option<String>,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct CacheInfo {
    /// sorted by path, as mlx_lm.manage lists them
    pub repos: Vec<CachedRepo>,
    pub corrupt: Vec<CorruptRepo>,
}

/// Entries of the cache folder that are not repos.
const NOT_REPOS: &[&str] = &[".locks", "CACHEDIR.TAG", "blobs"];

/// Files operating systems leave in folders (huggingface_hub's `FILES_TO_IGNORE`).
const OS_FILES: &[&str] = &[".DS_Store", "Thumbs.db", "desktop.ini"];

/// `models--org--name` → (`model`, `org/name`).
pub fn parse_repo_folder(name: &str) -> Option<(String, String)> {
    let (prefix, id) = name.split_once("--")?;
    let kind = match prefix {
        "models" => "model",
        "datasets" => "dataset",
        "spaces" => "space",
        _ => return None,
    };
    Some((kind.to_string(), id.replace("--", "/")))
}

/// Scans a cache folder; a missing folder is an empty cache.
pub fn scan_cache(cache_dir: &Path) -> Result<CacheInfo> {
    let mut info = CacheInfo::default();
    if !cache_dir.exists() {
        return Ok(info);
    }
    if !cache_dir.is_dir() {
        bail!("the Hugging Face cache {} is a file, expected a folder", cache_dir.display());
    }
    let rd = std::fs::read_dir(cache_dir).with_context(|| format!("cannot read {}", cache_dir.display()))?;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if NOT_REPOS.contains(&name.as_str()) || OS_FILES.contains(&name.as_str()) {
            continue;
        }
        let path = entry.path();
        match scan_repo(&path) {
            Ok(r) => info.repos.push(r),
            Err(reason) => {
                info.corrupt.push(CorruptRepo { repo_id: parse_repo_folder(&name).map(|(_, id)| id), path, reason })
            }
        }
    }
    info.repos.sort_by(|a, b| a.path.cmp(&b.path));
    info.corrupt.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(info)
}

/// Every file under `dir` (following no symlinks to folders), as paths.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            files_under(&p, out)?;
        } else if !p.is_dir() {
            out.push(p);
        }
    }
    Ok(())
}

fn scan_repo(repo_path: &Path) -> std::result::Result<CachedRepo, String> {
    if !repo_path.is_dir() {
        return Err("not a folder".into());
    }
    let name = repo_path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let (repo_type, repo_id) =
        parse_repo_folder(&name).ok_or("not a repo folder (expected models--, datasets-- or spaces--)")?;
    let snapshots = repo_path.join("snapshots");
    if !snapshots.is_dir() {
        return Err("no snapshots folder".into());
    }

    let refs_dir = repo_path.join("refs");
    let mut refs_by_commit: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if refs_dir.exists() {
        if !refs_dir.is_dir() {
            return Err("refs is a file".into());
        }
        let mut refs = vec![];
        files_under(&refs_dir, &mut refs).map_err(|e| format!("cannot read refs: {e}"))?;
        for r in refs {
            let commit = std::fs::read_to_string(&r).map_err(|e| format!("cannot read {}: {e}", r.display()))?;
            let ref_name = r.strip_prefix(&refs_dir).unwrap_or(&r).to_string_lossy().replace('\\', "/");
            refs_by_commit.entry(commit).or_default().insert(ref_name);
        }
    }

    // blob path → (size, atime, mtime)
    let mut blobs: BTreeMap<PathBuf, (u64, SystemTime, SystemTime)> = BTreeMap::new();
    let mut revisions = vec![];
    let mut refs = BTreeSet::new();
    let rd = std::fs::read_dir(&snapshots).map_err(|e| format!("cannot read snapshots: {e}"))?;
    for rev in rd.flatten() {
        let rev_name = rev.file_name().to_string_lossy().into_owned();
        if OS_FILES.contains(&rev_name.as_str()) {
            continue;
        }
        let rev_path = rev.path();
        if !rev_path.is_dir() {
            return Err(format!("snapshots folder holds a file: {rev_name}"));
        }
        let mut files = vec![];
        files_under(&rev_path, &mut files).map_err(|e| format!("cannot read snapshot {rev_name}: {e}"))?;
        for f in files {
            // the first symlink hop is the blob, as huggingface_hub counts it
            let blob = match std::fs::read_link(&f) {
                Ok(target) => normalize(&f.parent().unwrap_or(Path::new("")).join(target)),
                Err(_) => f.clone(),
            };
            if blobs.contains_key(&blob) {
                continue;
            }
            let md =
                std::fs::metadata(&blob).map_err(|_| format!("blob missing (broken symlink): {}", blob.display()))?;
            let atime = md.accessed().unwrap_or(SystemTime::UNIX_EPOCH);
            let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            blobs.insert(blob, (md.len(), atime, mtime));
        }
        if let Some(r) = refs_by_commit.remove(&rev_name) {
            refs.extend(r);
        }
        revisions.push(rev_name);
    }
    if !refs_by_commit.is_empty() {
        let missing: Vec<&String> = refs_by_commit.keys().collect();
        return Err(format!("refs point to commits with no snapshot: {missing:?}"));
    }
    let (last_accessed, last_modified) = if blobs.is_empty() {
        let md = std::fs::metadata(repo_path).map_err(|e| e.to_string())?;
        (md.accessed().unwrap_or(SystemTime::UNIX_EPOCH), md.modified().unwrap_or(SystemTime::UNIX_EPOCH))
    } else {
        (blobs.values().map(|b| b.1).max().unwrap(), blobs.values().map(|b| b.2).max().unwrap())
    };
    revisions.sort();
    Ok(CachedRepo {
        repo_id,
        repo_type,
        path: repo_path.to_path_buf(),
        size_on_disk: blobs.values().map(|b| b.0).sum(),
        nb_files: blobs.len(),
        last_accessed,
        last_modified,
        refs: refs.into_iter().collect(),
        revisions,
    })
}

/// Removes `.` and `..` components without touching the file system (Python's `os.path.abspath`).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Deletes one repo folder of the cache. Refuses any path that is not a direct child of
/// `cache_dir`; a repo folder that is a symlink loses the link only, and symlinks inside are
/// removed, never followed.
pub fn delete_repo(cache_dir: &Path, repo_path: &Path) -> Result<()> {
    let parent_ok = repo_path.parent().is_some_and(|p| p == cache_dir);
    let name = repo_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !parent_ok || parse_repo_folder(&name).is_none() {
        bail!("refusing to delete {}: not a repo folder of the cache {}", repo_path.display(), cache_dir.display());
    }
    let md = std::fs::symlink_metadata(repo_path).with_context(|| format!("cannot read {}", repo_path.display()))?;
    if md.is_dir() { std::fs::remove_dir_all(repo_path) } else { std::fs::remove_file(repo_path) }
        .with_context(|| format!("cannot delete {}", repo_path.display()))
}

/// huggingface_hub's `_format_size`: `"{:3.1f}{unit}"` in powers of 1000.
pub fn format_size(num: u64) -> String {
    let mut n = num as f64;
    for unit in ["", "K", "M", "G", "T", "P", "E", "Z"] {
        if n.abs() < 1000.0 {
            return format!("{n:3.1}{unit}");
        }
        n /= 1000.0;
    }
    format!("{n:.1}Y")
}

/// huggingface_hub's `format_timesince`: "a few seconds ago", "3 hours ago", ...
pub fn format_timesince(t: SystemTime) -> String {
    let delta = SystemTime::now().duration_since(t).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    if delta < 20.0 {
        return "a few seconds ago".into();
    }
    let chunks: [(&str, f64, Option<f64>); 7] = [
        ("second", 1.0, Some(59.0)),
        ("minute", 60.0, Some(59.0)),
        ("hour", 3600.0, Some(23.0)),
        ("day", 86400.0, Some(6.0)),
        ("week", 604800.0, Some(6.0)),
        ("month", 2592000.0, Some(11.0)),
        ("year", 31536000.0, None),
    ];
    let mut out = (0.0, "year");
    for (label, divider, max) in chunks {
        // Python's round(): half to even
        let v = (delta / divider).round_ties_even();
        out = (v, label);
        if max.is_some_and(|m| v <= m) {
            break;
        }
    }
    let (v, label) = out;
    format!("{v} {label}{} ago", if v > 1.0 { "s" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_huggingface_hub() {
        // values from huggingface_hub.utils._cache_manager._format_size
        assert_eq!(format_size(0), "0.0");
        assert_eq!(format_size(999), "999.0");
        assert_eq!(format_size(1000), "1.0K");
        assert_eq!(format_size(161_234), "161.2K");
        assert_eq!(format_size(269_060_248), "269.1M");
        assert_eq!(format_size(8_030_000_000), "8.0G");
    }

    #[test]
    fn repo_folders() {
        assert_eq!(parse_repo_folder("models--org--name"), Some(("model".into(), "org/name".into())));
        assert_eq!(parse_repo_folder("datasets--x"), Some(("dataset".into(), "x".into())));
        assert_eq!(parse_repo_folder("random"), None);
        assert_eq!(parse_repo_folder("foo--bar"), None);
    }
}
