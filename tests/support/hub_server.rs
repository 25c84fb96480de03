//! A stand-in for the Hugging Face hub on loopback, serving the routes that hf-hub and
//! huggingface_hub download through, from files held in memory:
//!
//! - `GET /api/{models,datasets}/{id}[/revision/{rev}]` → `{"id", "sha", "siblings": [{"rfilename"}]}`
//! - `HEAD|GET /[datasets/]{id}/resolve/{rev}/{file}` → the file, with `X-Repo-Commit`, `ETag`
//!   (its sha256), `Content-Length`, and `Range` requests answered `206` with `Content-Range`.
//!
//! Every request is logged. Faults: `require_token` answers 401 without `Authorization: Bearer
//! <token>`; `cut` ends a file's body at a byte offset and drops the connection.

#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

pub struct ServedRepo {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Default)]
pub struct State {
    /// key: `model/org/name` or `dataset/org/name`
    pub repos: BTreeMap<String, ServedRepo>,
    pub log: Vec<Request>,
    pub require_token: Option<String>,
    /// (file name, offset): bodies of that file stop at the offset and the connection drops
    pub cut: Option<(String, usize)>,
}

pub struct HubServer {
    pub endpoint: String,
    pub state: Arc<Mutex<State>>,
}

impl HubServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        Self { endpoint, state }
    }

    /// Adds a repo (`kind` model or dataset); the commit hash is derived from its id.
    pub fn add_repo(&self, kind: &str, id: &str, files: &[(&str, Vec<u8>)]) -> String {
        let commit = hex(&Sha256::digest(format!("{kind}/{id}").as_bytes()))[..40].to_string();
        let files = files.iter().map(|(n, d)| (n.to_string(), d.clone())).collect();
        self.state.lock().unwrap().repos.insert(format!("{kind}/{id}"), ServedRepo { commit: commit.clone(), files });
        commit
    }

    pub fn take_log(&self) -> Vec<Request> {
        std::mem::take(&mut self.state.lock().unwrap().log)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    head: bool,
) -> std::io::Result<()> {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        h += &format!("{k}: {v}\r\n");
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        h += &format!("Content-Length: {}\r\n", body.len());
    }
    h += "\r\n";
    conn.write_all(h.as_bytes())?;
    if !head {
        conn.write_all(body)?;
    }
    conn.flush()
}

fn error(conn: &mut TcpStream, status: &str, code: &str, head: bool) -> std::io::Result<()> {
    let body = format!("{{\"error\":\"{code}\"}}");
    let headers =
        vec![("X-Error-Code".to_string(), code.to_string()), ("Content-Type".into(), "application/json".into())];
    respond(conn, status, &headers, body.as_bytes(), head)
}

fn serve(mut conn: TcpStream, st: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let head = method == "HEAD";
    let mut s = st.lock().unwrap();
    s.log.push(Request { method: method.clone(), path: path.clone(), range: range.clone(), auth: auth.clone() });
    if let Some(t) = &s.require_token {
        if auth.as_deref() != Some(&format!("Bearer {t}")) {
            drop(s);
            return error(&mut conn, "401 Unauthorized", "GatedRepo", head);
        }
    }

    // /api/models/{org}/{name}[/revision/{rev}]
    if let Some(rest) = path.strip_prefix("/api/") {
        let (kind, rest) = rest.split_once('/').unwrap_or(("", ""));
        let kind = kind.trim_end_matches('s');
        let id = rest.split("/revision/").next().unwrap_or("");
        let Some(repo) = s.repos.get(&format!("{kind}/{id}")) else {
            drop(s);
            return error(&mut conn, "404 Not Found", "RepoNotFound", head);
        };
        let siblings: Vec<serde_json::Value> =
            repo.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": id, "sha": repo.commit, "siblings": siblings }).to_string();
        drop(s);
        return respond(
            &mut conn,
            "200 OK",
            &[("Content-Type".into(), "application/json".into())],
            body.as_bytes(),
            head,
        );
    }

    // /[datasets/]{org}/{name}/resolve/{rev}/{file}
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(r) => ("dataset", r.to_string()),
        None => ("model", path.trim_start_matches('/').to_string()),
    };
    let Some((id, after)) = rest.split_once("/resolve/") else {
        drop(s);
        return error(&mut conn, "404 Not Found", "RepoNotFound", head);
    };
    let (rev, file) = after.split_once('/').unwrap_or((after, ""));
    let (rev, file) = (pct_decode(rev), pct_decode(file));
    let Some(repo) = s.repos.get(&format!("{kind}/{id}")) else {
        drop(s);
        return error(&mut conn, "404 Not Found", "RepoNotFound", head);
    };
    if rev != "main" && rev != repo.commit {
        drop(s);
        return error(&mut conn, "404 Not Found", "RevisionNotFound", head);
    }
    let Some(data) = repo.files.get(&file).cloned() else {
        drop(s);
        return error(&mut conn, "404 Not Found", "EntryNotFound", head);
    };
    let commit = repo.commit.clone();
    let cut = s.cut.clone().filter(|(f, _)| *f == file).map(|(_, at)| at);
    drop(s);

    let total = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() { total.saturating_sub(1) } else { b.parse().unwrap_or(total - 1) };
            (a.min(total), (b + 1).min(total))
        }
        None => (0, total),
    };
    let mut headers = vec![
        ("X-Repo-Commit".to_string(), commit),
        ("ETag".to_string(), format!("\"{}\"", hex(&Sha256::digest(&data)))),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
        ("Content-Type".to_string(), "application/octet-stream".to_string()),
        ("Content-Length".to_string(), (end - start).to_string()),
    ];
    let status = if range.is_some() {
        headers.push(("Content-Range".to_string(), format!("bytes {start}-{}/{total}", end.saturating_sub(1))));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    match cut {
        Some(at) if !head && end > at => {
            // promise the whole range, send up to the cut, hang up
            let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            for (k, v) in &headers {
                h += &format!("{k}: {v}\r\n");
            }
            conn.write_all(format!("{h}\r\n").as_bytes())?;
            conn.write_all(&data[start..at.max(start)])?;
            conn.flush()?;
            conn.shutdown(std::net::Shutdown::Both)
        }
        _ => respond(&mut conn, status, &headers, &data[start..end], head),
    }
}
