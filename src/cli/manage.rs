//! `wick manage`: mlx_lm.manage over the Hugging Face cache (`--scan`, `--delete`, `--pattern`).

use crate::hub::scan::{delete_repo, format_size, format_timesince, scan_cache, CachedRepo};
use crate::hub::HubEnv;
use anyhow::{bail, Result};
use clap::Args;
use std::io::{BufRead, Write};

#[derive(Args, Debug)]
pub struct ManageArgs {
    /// List the repos in the Hugging Face cache
    #[arg(long)]
    pub scan: bool,
    /// Delete the repos whose id contains --pattern (asks first)
    #[arg(long)]
    pub delete: bool,
    /// Only repos whose id contains this text (--scan: all repos when omitted; --delete: required)
    #[arg(long)]
    pub pattern: Option<String>,
    /// Delete without asking
    #[arg(short = 'y', long)]
    pub yes: bool,
}

/// mlx_lm's table: columns as wide as their widest cell, numbers right-aligned.
fn tabulate(headers: &[&str], rows: &[Vec<(String, bool)>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, (c, _)) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<(String, bool)>| {
        let mut s = String::new();
        for ((c, right), w) in cells.into_iter().zip(&widths) {
            if right {
                s += &format!("{c:>w$} ");
            } else {
                s += &format!("{c:<w$} ");
            }
        }
        s
    };
    let mut out = vec![line(headers.iter().map(|h| (h.to_string(), false)).collect())];
    out.push(line(widths.iter().map(|w| ("-".repeat(*w), false)).collect()));
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn text(s: impl Into<String>) -> (String, bool) {
    (s.into(), false)
}

fn scan_rows(repos: &[&CachedRepo]) -> Vec<Vec<(String, bool)>> {
    repos
        .iter()
        .map(|r| {
            vec![
                text(&r.repo_id),
                text(&r.repo_type),
                text(format!("{:>12}", format_size(r.size_on_disk))),
                (r.nb_files.to_string(), true),
                text(format_timesince(r.last_accessed)),
                text(format_timesince(r.last_modified)),
                text(r.refs.join(", ")),
                text(r.path.display().to_string()),
            ]
        })
        .collect()
}

/// Asks on stdin as mlx_lm does: y/yes/1 → true; n/no/0/empty/end of input → false.
fn confirm(message: &str) -> Result<bool> {
    let stdin = std::io::stdin();
    loop {
        print!("{message} (y/n) ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        if stdin.lock().read_line(&mut answer)? == 0 {
            println!();
            return Ok(false);
        }
        match answer.trim().to_lowercase().as_str() {
            "y" | "yes" | "1" => return Ok(true),
            "n" | "no" | "0" | "" => return Ok(false),
            _ => println!("Invalid input. Must be one of: yes/no/y/n or empty for no"),
        }
    }
}

pub fn run(a: ManageArgs) -> Result<i32> {
    if !a.scan && !a.delete {
        bail!("nothing to do: pass --scan to list the Hugging Face cache, or --delete --pattern TEXT");
    }
    let env = HubEnv::from_env();
    let cache = &env.cache_dir;
    if a.scan {
        let pattern = a.pattern.clone().unwrap_or_default();
        if pattern.is_empty() {
            println!("Scanning Hugging Face cache at {}.", cache.display());
        } else {
            println!("Scanning Hugging Face cache at {} for models with pattern \"{pattern}\".", cache.display());
        }
        let info = scan_cache(cache)?;
        let repos: Vec<&CachedRepo> = info.repos.iter().filter(|r| r.repo_id.contains(&pattern)).collect();
        let headers = [
            "REPO ID",
            "REPO TYPE",
            "SIZE ON DISK",
            "NB FILES",
            "LAST_ACCESSED",
            "LAST_MODIFIED",
            "REFS",
            "LOCAL PATH",
        ];
        println!("{}", tabulate(&headers, &scan_rows(&repos)));
        for c in &info.corrupt {
            eprintln!("warning: skipped {}: {}", c.path.display(), c.reason);
        }
    }
    if a.delete {
        let Some(pattern) = a.pattern.as_deref().filter(|p| !p.is_empty()) else {
            bail!("--delete needs --pattern TEXT: the repos whose id contains TEXT are deleted");
        };
        println!("Deleting models matching pattern \"{pattern}\"");
        let info = scan_cache(cache)?;
        // (id, size, path); unreadable repos can be deleted too, by the id their folder names
        let mut victims: Vec<(String, String, std::path::PathBuf)> = info
            .repos
            .iter()
            .filter(|r| r.repo_id.contains(pattern))
            .map(|r| (r.repo_id.clone(), format_size(r.size_on_disk), r.path.clone()))
            .collect();
        victims.extend(
            info.corrupt
                .iter()
                .filter(|c| c.repo_id.as_deref().is_some_and(|id| id.contains(pattern)))
                .map(|c| (c.repo_id.clone().unwrap_or_default(), "corrupt".to_string(), c.path.clone())),
        );
        if victims.is_empty() {
            println!("No models found matching pattern \"{pattern}\"");
            return Ok(0);
        }
        println!("\nFound the following models:");
        let rows: Vec<Vec<(String, bool)>> = victims
            .iter()
            .map(|(id, size, path)| vec![text(id), text(size), text(path.display().to_string())])
            .collect();
        println!("{}", tabulate(&["REPO ID", "SIZE", "LOCAL PATH"], &rows));
        if !a.yes && !confirm("\nAre you sure you want to delete these models?")? {
            println!("\nDeletion cancelled - no changes made.");
            return Ok(0);
        }
        for (id, _, path) in &victims {
            println!("\nDeleting {id}...");
            delete_repo(cache, path)?;
        }
        println!("\nModel(s) deleted successfully.");
    }
    Ok(0)
}
