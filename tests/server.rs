//! `wick server` started for real on a loopback port with the default model: the `openai`
//! Python client against `wick generate` (tests/server_client.py), and over a thousand
//! malformed or hostile requests that must each get a 4xx (or a clean close) without hurting
//! the next normal request.

mod common;

use common::{default_model, root, wick};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `wick server` on a free port and waits until it listens; its log is kept.
fn start(model: &Path, args: &[&str]) -> Server {
    let mut child = wick()
        .args(["server", "--port", "0", "--model"])
        .arg(model)
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start wick server");
    let stderr = child.stderr.take().expect("piped stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on http://").nth(1) {
                let port = addr.split([' ', ':']).nth(1).and_then(|p| p.parse::<u16>().ok());
                let _ = tx.send(port);
            }
            let mut l = keep.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let port = rx.recv_timeout(Duration::from_secs(120)).ok().flatten();
    let port = port.unwrap_or_else(|| panic!("the server did not start:\n{}", log.lock().unwrap()));
    Server { child, port, log }
}

/// The default model with a chat template that renders tools (tests/data/tool_template.jinja;
/// without tools it renders exactly as the model's own).
fn tool_model(dir: &Path) -> std::path::PathBuf {
    let src = default_model();
    let dst = dir.join("smollm2-tools");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::os::unix::fs::symlink(src.join(f), dst.join(f)).unwrap();
    }
    std::fs::copy(root().join("tests/data/tool_template.jinja"), dst.join("chat_template.jinja")).unwrap();
    dst
}

#[test]
fn openai_client_gets_what_wick_generate_gives() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tool_model(tmp.path());
    let server = start(&model, &["--api-key", "test-key"]);
    let out = std::process::Command::new("python3")
        .arg(root().join("tests/server_client.py"))
        .arg(format!("http://127.0.0.1:{}", server.port))
        .arg(env!("CARGO_BIN_EXE_wick"))
        .arg(&model)
        .arg("test-key")
        .output()
        .expect("run python3 tests/server_client.py (pip install -r tests/requirements.txt)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\nserver log (tail):\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&server.log.lock().unwrap(), 40)
    );
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 10, "{stdout}");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends raw bytes, reads until the server closes; returns the status (None: closed without
/// a response) and the body.
fn raw(port: u16, request: &[u8]) -> (Option<u16>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf) {
        assert!(
            buf.starts_with(b"HTTP/1.1"),
            "no answer within 60 s ({e}) to {:?}",
            String::from_utf8_lossy(&request[..request.len().min(300)])
        );
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)).and_then(|c| c.parse().ok());
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn post(path: &str, body: &[u8], key: Option<&str>) -> Vec<u8> {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Bodies that are not valid JSON objects, or carry a field of a wrong type or value.
fn hostile_bodies() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = vec![];
    for s in [
        "",
        " ",
        "{",
        "}",
        "[",
        "[]",
        "null",
        "true",
        "1",
        "\"s\"",
        "{\"messages\": [",
        "{'messages': []}",
        "{\"a\":1,}",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]",
        "{\"prompt\": \"x\" \"y\"}",
        "{\"max_tokens\": 1e400}",
        "{\"temperature\": NaN}",
        "{\"temperature\": Infinity}",
        "{\"x\": \"\\ud800\"}",
        "{\"x\": \"\\u12\"}",
        "\u{feff}{}",
        "{\"prompt\": \"hi\"}}",
        "[{\"prompt\": \"hi\"}]",
        "{\"a\": --1}",
        "{\"a\": 01}",
    ] {
        out.push(s.as_bytes().to_vec());
    }
    // invalid UTF-8, alone and inside strings
    for bad in [&b"\xff\xfe"[..], b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc", b"\x80"] {
        out.push(bad.to_vec());
        let mut b = b"{\"prompt\": \"".to_vec();
        b.extend_from_slice(bad);
        b.extend_from_slice(b"\", \"messages\": [{\"role\": \"user\", \"content\": \"");
        b.extend_from_slice(bad);
        b.extend_from_slice(b"\"}]}");
        out.push(b);
    }
    let ok_messages = r#""messages": [{"role": "user", "content": "hi"}], "prompt": "hi""#;
    let wrong: &[(&str, &[&str])] = &[
        (
            "max_tokens",
            &[
                "-1",
                "0",
                "\"10\"",
                "1.5",
                "true",
                "[]",
                "{}",
                "-99999999999999999999",
                "1e30",
                "99999999999999999999999",
            ],
        ),
        ("max_completion_tokens", &["-5", "0", "\"x\"", "2.5", "[1]"]),
        ("temperature", &["-0.1", "\"hot\"", "[]", "{}", "true", "1e300", "-1e300"]),
        ("top_p", &["-0.5", "1.5", "\"x\"", "[]", "2"]),
        ("top_k", &["-1", "1.5", "\"x\"", "1e12", "49152", "{}"]),
        ("min_p", &["-1", "2", "\"x\""]),
        ("repetition_penalty", &["-1", "\"x\"", "[]"]),
        ("repetition_context_size", &["-1", "\"x\"", "1e30"]),
        ("presence_penalty", &["-3", "3", "\"x\""]),
        ("frequency_penalty", &["-3", "3", "\"x\""]),
        (
            "logit_bias",
            &[
                "[]",
                "\"x\"",
                "1",
                "{\"x\": 1}",
                "{\"-1\": 1}",
                "{\"99999999\": 1}",
                "{\"5\": \"x\"}",
                "{\"5\": 1000}",
                "{\"5\": -1000}",
            ],
        ),
        ("seed", &["\"x\"", "1.5", "[]", "99999999999999999999"]),
        ("stop", &["1", "[1]", "{}", "[\"a\", 2]", "true"]),
        ("stream", &["\"yes\"", "1", "[]"]),
        ("stream_options", &["1", "\"x\"", "[]", "{\"include_usage\": \"x\"}"]),
        ("logprobs", &["\"x\"", "[]", "-1", "99"]),
        ("n", &["2", "0", "-1", "\"x\""]),
        ("model", &["1", "[]", "\"no-such-model\"", "{}"]),
        ("xtc_probability", &["-1", "2", "\"x\""]),
        ("xtc_threshold", &["-1", "0.9", "\"x\""]),
    ];
    for (field, values) in wrong {
        for v in *values {
            out.push(format!("{{{ok_messages}, \"{field}\": {v}}}").into_bytes());
        }
    }
    // chat-only fields, with a prompt that is wrong for completions
    for v in ["-1", "21", "\"x\"", "1.5"] {
        out.push(format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"logprobs\": true, \"top_logprobs\": {v}, \"prompt\": 5}}").into_bytes());
    }
    // every proper prefix of valid requests (none of them is a JSON object)
    for valid in [
        r#"{"model": "default_model", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, how are you?"}], "max_tokens": 3, "temperature": 0.0, "stop": ["\n"]}"#,
        r#"{"prompt": "Once upon a time", "max_tokens": 3, "logprobs": 2, "logit_bias": {"12": -1.5}, "stream": false}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "caf\u00e9 \u2603"}]}], "max_completion_tokens": 2, "top_p": 0.9, "seed": 7}"#,
    ] {
        for cut in 0..valid.len() {
            out.push(valid.as_bytes()[..cut].to_vec());
        }
    }
    // messages / prompt / tools of wrong shapes
    for m in [
        "1", "\"hi\"", "{}", "[]", "[1]", "[\"hi\"]", "[{}]", "[{\"role\": 1, \"content\": \"hi\"}]",
        "[{\"role\": \"wizard\", \"content\": \"hi\"}]", "[{\"role\": \"user\", \"content\": 5}]",
        "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {\"url\": \"x\"}}]}]",
        "[{\"role\": \"user\", \"content\": [{\"text\": \"hi\"}]}]", "[{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]",
        "[{\"role\": \"user\", \"content\": [5]}]", "[{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": 5}]",
        "[{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": \"{bad\"}}]}]",
    ] {
        out.push(format!("{{\"messages\": {m}, \"prompt\": 5}}").into_bytes());
    }
    for t in ["1", "\"x\"", "{}", "[1]", "[\"x\"]"] {
        out.push(format!("{{{ok_messages}, \"tools\": {t}, \"prompt\": []}}").into_bytes());
        out.push(format!("{{{ok_messages}, \"tool_choice\": {t}, \"prompt\": [\"a\", \"b\"]}}").into_bytes());
    }
    for p in ["[]", "[\"a\", \"b\"]", "[-1]", "[99999999]", "[1.5]", "[[1, 2]]", "{}", "true", "[1, \"a\"]"] {
        out.push(format!("{{\"prompt\": {p}, \"messages\": 7}}").into_bytes());
    }
    // deep nesting, long keys, many fields
    out.push(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes());
    out.push(format!("{{\"{}\": 1, {ok_messages}, \"max_tokens\": -1}}", "k".repeat(1 << 20)).into_bytes());
    let many: String = (0..20_000).map(|i| format!("\"f{i}\": {i}, ")).collect();
    out.push(format!("{{{many}{ok_messages}, \"temperature\": -1}}").into_bytes());
    out
}

#[test]
fn hostile_requests_get_4xx_and_the_server_keeps_serving() {
    let server = start(&default_model(), &["--api-key", "k", "--max-body-bytes", "4000000"]);
    let port = server.port;
    let mut count = 0;
    let mut expect_4xx = |req: Vec<u8>, what: &str| {
        let (status, body) = raw(port, &req);
        count += 1;
        if let Some(s) = status {
            assert!((400..500).contains(&s), "{what}: status {s}, body {body}");
        }
    };
    let bodies = hostile_bodies();
    for path in ["/v1/chat/completions", "/v1/completions"] {
        for b in &bodies {
            expect_4xx(
                post(path, b, Some("k")),
                &format!("{path} {:?}", String::from_utf8_lossy(&b[..b.len().min(200)])),
            );
        }
    }
    // every route but /health needs the key
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/nope"] {
        for key in [None, Some("wrong"), Some("")] {
            expect_4xx(post(path, br#"{"prompt": "hi"}"#, key), &format!("{path} key {key:?}"));
            let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
            expect_4xx(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").into_bytes(), path);
        }
    }
    // unknown routes and methods, broken HTTP
    for req in [
        "GET /v1/nothing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n",
        "DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n",
        "GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n",
        "GET /v1/models/other HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: abc\r\nConnection: close\r\n\r\n{}",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 99999999999\r\nConnection: close\r\n\r\n{}",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n",
        "BLAH\r\n\r\n",
        "\x00\x01\x02\r\n\r\n",
    ] {
        expect_4xx(req.as_bytes().to_vec(), req);
    }
    // too large: a 10 MB prompt (413), and a prompt longer than the context (400)
    let big = format!("{{\"prompt\": \"{}\"}}", "a ".repeat(5 << 20));
    let (status, _) = raw(port, &post("/v1/completions", big.as_bytes(), Some("k")));
    assert_eq!(status, Some(413));
    let long = format!("{{\"prompt\": \"{}\"}}", "word ".repeat(20_000));
    let (status, body) = raw(port, &post("/v1/completions", long.as_bytes(), Some("k")));
    assert_eq!(status, Some(400), "{body}");
    assert!(body.contains("context_length_exceeded"), "{body}");
    count += 2;
    // abrupt disconnects: mid-body, and mid-stream after the first bytes of the answer
    for i in 0..20 {
        let req = if i % 2 == 0 {
            let body = br#"{"messages": [{"role": "user", "content": "Count from one to fifty."}], "max_tokens": 4000, "stream": true}"#;
            post("/v1/chat/completions", body, Some("k"))
        } else {
            post("/v1/completions", br#"{"prompt": "One, two, three,", "max_tokens": 4000, "stream": true}"#, Some("k"))
        };
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        if i < 10 {
            s.write_all(&req[..req.len() - 20]).unwrap();
        } else {
            s.write_all(&req).unwrap();
            let mut first = [0u8; 64];
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let n = s.read(&mut first).unwrap();
            assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&first[..n]));
        }
        drop(s);
        count += 1;
    }
    assert!(count >= 1000, "only {count} hostile requests");
    // and a normal request still works, with the greedy answer
    let (status, body) = raw(
        port,
        &post(
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 20}"#,
            Some("k"),
        ),
    );
    assert_eq!(status, Some(200), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let out = wick()
        .args(["generate", "--model"])
        .arg(default_model())
        .args(["-p", "What is the capital of France?", "-m", "20", "--verbose", "False"])
        .output()
        .unwrap();
    let want = String::from_utf8(out.stdout).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), want.strip_suffix('\n').unwrap());
    // the cancelled streams left no requests behind (each 4,000 tokens long, had they run)
    let mut left = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, body) = raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(status, Some(200));
        left = serde_json::from_str::<serde_json::Value>(&body).unwrap()["requests"].clone();
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(left, 0, "requests still running after their clients left");
}
