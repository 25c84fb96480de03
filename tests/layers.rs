//! The library's layers import only downward. Each top-level module of `src/` has a rank in
//! [`LAYERS`]; a file may name (`crate::m`, `use crate::{m, ..}`) only modules of a lower rank or
//! its own. So no import cycle can form, and a new module must be placed in the order before it
//! builds green. (docs/ARCHITECTURE.md draws the same order.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom to top.
const LAYERS: &[&str] = &[
    "quant",
    "backend",
    "io",
    "tokenizer",
    "ops",
    "cache",
    "nn",
    "models",
    "engine",
    "lora",
    "convert",
    "hub",
    "server",
    "cli",
];

/// Source text without comments, string literals and char literals (so that doc comments and
/// messages naming a module are not imports).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3; // 'x'
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            i += 2;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
        } else {
            let c = src[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a file names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(p) = rest.find("crate::") {
        let after = &rest[p + "crate::".len()..];
        let word_start = p == 0 || !rest[..p].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        if word_start {
            if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name = ident_at(item.trim());
                    if !name.is_empty() {
                        found.insert(name.to_string());
                    }
                }
            } else {
                let name = ident_at(after);
                if !name.is_empty() {
                    found.insert(name.to_string());
                }
            }
        }
        rest = after;
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src/") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn layers_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a path").as_os_str().to_string_lossy().to_string();
        if first == "bin" || first == "lib.rs" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let Some(own) = rank(&module) else {
            bad.push(format!("src/{}: module `{module}` has no place in tests/layers.rs's LAYERS", rel.display()));
            continue;
        };
        seen.insert(module.clone());
        let code = code_only(&std::fs::read_to_string(f).expect("read a source file"));
        if rel.components().count() == 1 && code.contains("super::") {
            bad.push(format!("src/{}: a top-level file names `super::` (write `crate::`)", rel.display()));
        }
        for dep in imports(&code) {
            match rank(&dep) {
                Some(r) if r > own => {
                    bad.push(format!("src/{}: `{module}` imports `crate::{dep}`, a higher layer", rel.display()))
                }
                _ => {}
            }
        }
    }
    for l in LAYERS {
        assert!(seen.contains(*l), "LAYERS names `{l}`, which src/ does not have");
    }
    assert!(bad.is_empty(), "layering violations (order: {}):\n{}", LAYERS.join(" → "), bad.join("\n"));
}

#[test]
fn the_import_scan_reads_groups_and_skips_comments_and_strings() {
    let code = code_only(
        "use crate::{a::X, b};\n// crate::c\n/* crate::d */\nlet s = \"crate::e\";\nlet r = r#\"crate::f\"#;\nlet q = '\"'; crate::g::h();\nnotcrate::i",
    );
    let got: Vec<String> = imports(&code).into_iter().collect();
    assert_eq!(got, ["a", "b", "g"]);
}
