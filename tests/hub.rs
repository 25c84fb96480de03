//! Hub downloads and `wick manage`, against a loopback stand-in for the Hugging Face hub
//! (tests/support/hub_server.rs) and checked with Python's huggingface_hub (tests/hub_cache.py):
//! the cache wick writes is the cache huggingface_hub reads, and the reverse.

mod common;
#[path = "support/hub_server.rs"]
mod hub_server;

use common::*;
use hub_server::HubServer;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const REPO: &str = "wick-test/tiny-llama";
const TOKEN: &str = "hf_test_token";

/// A WordLevel tokenizer over the tiny model's 128 ids: `t0` … `t127`.
fn tiny_tokenizer() -> Vec<u8> {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..128).map(|i| (format!("t{i}"), i.into())).collect();
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    }))
    .unwrap()
}

/// The tiny golden llama as a hub repo, with files a model does not need next to the ones it does.
fn tiny_repo_files() -> Vec<(&'static str, Vec<u8>)> {
    let g = golden("tiny_llama3");
    vec![
        ("config.json", std::fs::read(g.join("config.json")).unwrap()),
        ("model.safetensors", std::fs::read(g.join("model.safetensors")).unwrap()),
        ("tokenizer.json", tiny_tokenizer()),
        ("tokenizer_config.json", br#"{"eos_token": "t127"}"#.to_vec()),
        ("README.md", b"# tiny\n".to_vec()),
        ("pytorch_model.bin", vec![7u8; 4096]),
        ("original/consolidated.00.pth", vec![9u8; 2048]),
    ]
}

const NEEDED: &[&str] = &["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];

fn python() -> String {
    std::env::var("WICK_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs tests/hub_cache.py; fails (never skips) when huggingface_hub is missing.
fn hub_py(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests/hub_cache.py"))
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env_remove("HF_TOKEN")
        .output()
        .expect("python3 runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'huggingface_hub'"),
        "huggingface_hub is missing: python3 -m pip install -r tests/requirements.txt"
    );
    assert!(out.status.success(), "hub_cache.py {args:?} failed: {err}");
    String::from_utf8(out.stdout).unwrap()
}

fn py_scan(cache: &Path) -> serde_json::Value {
    serde_json::from_str(&hub_py("http://127.0.0.1:9", &["scan", cache.to_str().unwrap()])).unwrap()
}

/// wick with only the hub variables this test sets.
fn wick_hub(server: &HubServer, cache: &Path) -> Command {
    let mut c = wick();
    for v in
        ["HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"]
    {
        c.env_remove(v);
    }
    c.env("HF_ENDPOINT", &server.endpoint).env("HF_HUB_CACHE", cache);
    c
}

fn generate(c: &mut Command, model: &str) -> Output {
    c.args(["generate", "--model", model, "-p", "t5 t9 t3", "-m", "6", "--ignore-chat-template"]).output().unwrap()
}

/// The generated text and token counts, without the timing lines.
fn text_of(out: &Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wick failed: {}", String::from_utf8_lossy(&out.stderr));
    s.lines().filter(|l| !l.contains("tokens-per-sec") && !l.starts_with("Peak memory")).collect::<Vec<_>>().join("\n")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn snapshot_dir(cache: &Path, repo: &str, commit: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--"))).join("snapshots").join(commit)
}

#[test]
fn downloads_what_a_model_needs_into_the_hf_cache_then_needs_no_network() {
    let server = HubServer::start();
    let files = tiny_repo_files();
    let commit = server.add_repo("model", REPO, &files);
    server.state.lock().unwrap().require_token = Some(TOKEN.into());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");

    let first = generate(wick_hub(&server, &cache).env("HF_TOKEN", TOKEN), REPO);
    let text = text_of(&first);
    let log = server.take_log();
    assert!(!log.is_empty());
    assert!(log.iter().all(|r| r.auth.as_deref() == Some("Bearer hf_test_token")), "token not sent: {log:?}");
    let fetched: BTreeSet<String> = log
        .iter()
        .filter(|r| r.method == "GET" && r.range.as_deref() != Some("bytes=0-0") && r.path.contains("/resolve/"))
        .map(|r| r.path.rsplit("/main/").next().unwrap().to_string())
        .collect();
    assert_eq!(fetched, NEEDED.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(), "files fetched");

    // the layout, as huggingface_hub reads it
    let scan = py_scan(&cache);
    assert_eq!(scan["warnings"], serde_json::json!([]), "{scan}");
    let repos = scan["repos"].as_array().unwrap();
    assert_eq!(repos.len(), 1, "{scan}");
    let r = &repos[0];
    assert_eq!(r["repo_id"], REPO);
    assert_eq!(r["repo_type"], "model");
    assert_eq!(r["refs"], serde_json::json!(["main"]));
    assert_eq!(r["revisions"], serde_json::json!([commit]));
    let mut want: Vec<&str> = NEEDED.to_vec();
    want.sort();
    assert_eq!(r["files"], serde_json::json!(want));
    let size: usize = files.iter().filter(|(n, _)| NEEDED.contains(n)).map(|(_, d)| d.len()).sum();
    assert_eq!(r["size_on_disk"], size);
    assert_eq!(r["nb_files"], NEEDED.len());
    let snap = snapshot_dir(&cache, REPO, &commit);
    for (name, data) in files.iter().filter(|(n, _)| NEEDED.contains(n)) {
        assert!(snap.join(name).symlink_metadata().unwrap().file_type().is_symlink(), "{name} is not a link to a blob");
        assert_eq!(&std::fs::read(snap.join(name)).unwrap(), data, "{name} differs from the served file");
    }

    // same text as the same files in a plain folder
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    for (name, data) in files.iter().filter(|(n, _)| NEEDED.contains(n)) {
        std::fs::write(local.join(name), data).unwrap();
    }
    assert_eq!(text_of(&generate(&mut wick(), local.to_str().unwrap())), text);

    // a second run, and an offline one, make no request
    assert_eq!(text_of(&generate(wick_hub(&server, &cache).env("HF_TOKEN", TOKEN), REPO)), text);
    assert_eq!(text_of(&generate(wick_hub(&server, &cache).env("HF_HUB_OFFLINE", "1"), REPO)), text);
    let by_commit = generate(&mut wick_hub(&server, &cache), REPO);
    let mut c = wick_hub(&server, &cache);
    c.args(["generate", "--model", REPO, "--revision", &commit, "-p", "t5 t9 t3", "-m", "6", "--ignore-chat-template"]);
    assert_eq!(text_of(&c.output().unwrap()), text_of(&by_commit));
    assert!(server.take_log().is_empty(), "a cached model was fetched again");
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let server = HubServer::start();
    let files = tiny_repo_files();
    let commit = server.add_repo("model", REPO, &files);
    let weights = files.iter().find(|(n, _)| *n == "model.safetensors").unwrap().1.clone();
    let cut = 60_000;
    assert!(weights.len() > 2 * cut);
    server.state.lock().unwrap().cut = Some(("model.safetensors".into(), cut));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");

    let failed = generate(&mut wick_hub(&server, &cache), REPO);
    assert!(!failed.status.success(), "download should have failed: {}", stderr(&failed));
    let err = stderr(&failed);
    assert!(err.contains("model.safetensors") && err.contains(REPO) && !err.contains("panicked"), "{err}");
    let blobs = cache.join("models--wick-test--tiny-llama/blobs");
    let part: Vec<PathBuf> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .collect();
    assert_eq!(part.len(), 1, "one partial blob expected in {}", blobs.display());
    let have = std::fs::metadata(&part[0]).unwrap().len() as usize;
    assert_eq!(have, cut, "the partial blob keeps the bytes received");
    assert!(!snapshot_dir(&cache, REPO, &commit).join("config.json").exists(), "config.json marks a whole download");

    server.state.lock().unwrap().cut = None;
    server.take_log();
    let ok = generate(&mut wick_hub(&server, &cache), REPO);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let ranges: Vec<Option<String>> = server
        .take_log()
        .into_iter()
        .filter(|r| {
            r.method == "GET" && r.path.ends_with("/model.safetensors") && r.range.as_deref() != Some("bytes=0-0")
        })
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, vec![Some(format!("bytes={cut}-"))], "the second run asks only for the missing bytes");
    assert_eq!(std::fs::read(snapshot_dir(&cache, REPO, &commit).join("model.safetensors")).unwrap(), weights);
    let leftovers: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "part" || x == "lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn hub_errors_say_what_to_do() {
    let server = HubServer::start();
    server.add_repo("model", REPO, &tiny_repo_files());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");

    // offline and not cached
    let out = generate(wick_hub(&server, &cache).env("HF_HUB_OFFLINE", "1"), REPO);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(REPO) && err.contains("HF_HUB_OFFLINE") && err.contains("not in the Hugging Face cache"),
        "{err}"
    );
    assert!(server.take_log().is_empty(), "offline mode made a request");

    // unknown repo
    let err = stderr(&generate(&mut wick_hub(&server, &cache), "nobody/nothing"));
    assert!(err.contains("'nobody/nothing' not found on the hub") && err.contains(&server.endpoint), "{err}");

    // gated repo without a token
    server.state.lock().unwrap().require_token = Some(TOKEN.into());
    let err = stderr(&generate(&mut wick_hub(&server, &cache), REPO));
    assert!(err.contains("HF_TOKEN") && err.contains(REPO), "{err}");

    // a repo that is not a model
    server.state.lock().unwrap().require_token = None;
    server.add_repo("model", "wick-test/no-config", &[("README.md", b"hi".to_vec())]);
    let err = stderr(&generate(&mut wick_hub(&server, &cache), "wick-test/no-config"));
    assert!(err.contains("has no config.json"), "{err}");

    // a bad revision
    let mut c = wick_hub(&server, &cache);
    let out = c.args(["generate", "--model", REPO, "--revision", "../x", "-m", "1"]).output().unwrap();
    assert!(stderr(&out).contains("--revision"), "{}", stderr(&out));
}

/// Every path under `dirs` with what it is: file size, link target, or folder.
fn tree(dirs: &[&Path]) -> BTreeMap<PathBuf, String> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let md = std::fs::symlink_metadata(p).unwrap();
        if md.file_type().is_symlink() {
            out.insert(p.to_path_buf(), format!("link {}", std::fs::read_link(p).unwrap().display()));
        } else if md.is_dir() {
            out.insert(p.to_path_buf(), "dir".into());
            for e in std::fs::read_dir(p).unwrap().flatten() {
                walk(&e.path(), out);
            }
        } else {
            out.insert(p.to_path_buf(), format!("file {}", md.len()));
        }
    }
    let mut out = BTreeMap::new();
    for d in dirs {
        walk(d, &mut out);
    }
    out
}

/// Rows of a `wick manage` table, cut at the widths of its dashes line.
fn table_rows(stdout: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = stdout.lines().collect();
    let Some(dash) = lines.iter().position(|l| l.starts_with('-')) else {
        return vec![];
    };
    let widths: Vec<usize> = lines[dash].split_whitespace().map(|d| d.len()).collect();
    lines[dash + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let mut cells = vec![];
            let mut at = 0;
            for w in &widths {
                let end = (at + w).min(l.len());
                cells.push(l[at..end].trim().to_string());
                at = end + 1;
            }
            cells
        })
        .collect()
}

fn manage(server: &HubServer, cache: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut c = wick_hub(server, cache);
    let mut child =
        c.arg("manage").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "wick manage {args:?}: {}", stderr(&out));
    out
}

#[test]
fn manage_lists_and_deletes_what_huggingface_hub_sees() {
    let server = HubServer::start();
    let tiny = tiny_repo_files();
    let needed: Vec<(&str, Vec<u8>)> = tiny.iter().filter(|(n, _)| NEEDED.contains(n)).cloned().collect();
    server.add_repo("model", "mlx-community/tiny-4bit", &needed);
    // two files with the same content share one blob: counted once
    let same = b"{}".to_vec();
    server.add_repo(
        "model",
        "other-org/kept-model",
        &[("config.json", same.clone()), ("copy.json", same), ("weights.bin", vec![1u8; 1500])],
    );
    server.add_repo("dataset", "other-org/some-data", &[("train.jsonl", vec![b'x'; 2500])]);
    server.add_repo("model", REPO, &tiny);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    std::fs::create_dir_all(&cache).unwrap();
    let cache = cache.canonicalize().unwrap();
    let c = cache.to_str().unwrap();

    // a cache made by huggingface_hub, plus one repo fetched by wick, plus damage
    hub_py(
        &server.endpoint,
        &["download", c, "model", "mlx-community/tiny-4bit", "config.json", "model.safetensors", "tokenizer.json"],
    );
    hub_py(
        &server.endpoint,
        &["download", c, "model", "other-org/kept-model", "config.json", "copy.json", "weights.bin"],
    );
    hub_py(&server.endpoint, &["download", c, "dataset", "other-org/some-data", "train.jsonl"]);
    assert!(generate(&mut wick_hub(&server, &cache), REPO).status.success());
    let broken = cache.join("models--broken--repo/snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(&broken).unwrap();
    std::os::unix::fs::symlink("../../blobs/missing", broken.join("config.json")).unwrap();
    std::fs::write(cache.join("notes.txt"), b"not a repo").unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep.bin"), vec![3u8; 777]).unwrap();
    let mlx_snap = std::fs::read_dir(cache.join("models--mlx-community--tiny-4bit/snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::os::unix::fs::symlink(outside.join("keep.bin"), mlx_snap.join("extra.bin")).unwrap();

    // --scan: the same repos, sizes, file counts, refs and paths as scan_cache_dir
    let py = py_scan(&cache);
    assert_eq!(py["repos"].as_array().unwrap().len(), 4, "{py}");
    assert_eq!(py["warnings"].as_array().unwrap().len(), 2, "{py}"); // broken repo, notes.txt
    let want: BTreeSet<Vec<String>> = py["repos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let refs: Vec<String> =
                r["refs"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
            vec![
                r["repo_id"].as_str().unwrap().to_string(),
                r["repo_type"].as_str().unwrap().to_string(),
                r["size_on_disk_str"].as_str().unwrap().to_string(),
                r["nb_files"].to_string(),
                refs.join(", "),
                r["repo_path"].as_str().unwrap().to_string(),
            ]
        })
        .collect();
    let out = manage(&server, &cache, &["--scan"], "");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let got: BTreeSet<Vec<String>> = table_rows(&stdout)
        .into_iter()
        .map(|r| vec![r[0].clone(), r[1].clone(), r[2].clone(), r[3].clone(), r[6].clone(), r[7].clone()])
        .collect();
    assert_eq!(got, want, "{stdout}");
    assert!(stderr(&out).contains("models--broken--repo"), "the damaged repo is reported: {}", stderr(&out));
    let mlx_only =
        table_rows(&String::from_utf8_lossy(&manage(&server, &cache, &["--scan", "--pattern", "mlx"], "").stdout));
    assert_eq!(mlx_only.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["mlx-community/tiny-4bit"]);

    // --delete: "n" changes nothing; "y" removes exactly the matching repos
    let before = tree(&[&cache, &outside]);
    let out = manage(&server, &cache, &["--delete", "--pattern", "tiny"], "n\n");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    assert_eq!(tree(&[&cache, &outside]), before);
    let out = manage(&server, &cache, &["--delete", "--pattern", "tiny"], "y\n");
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted successfully"));
    manage(&server, &cache, &["--delete", "--pattern", "broken", "-y"], "");
    let gone = ["models--mlx-community--tiny-4bit", "models--wick-test--tiny-llama", "models--broken--repo"];
    let expected: BTreeMap<PathBuf, String> =
        before.into_iter().filter(|(p, _)| !gone.iter().any(|g| p.starts_with(cache.join(g)))).collect();
    assert_eq!(tree(&[&cache, &outside]), expected, "only the matching repos are gone");
    let left: Vec<String> = py_scan(&cache)["repos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["repo_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, ["other-org/some-data", "other-org/kept-model"]);
}
