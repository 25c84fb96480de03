//! `wick chat`: mlx_lm.chat's REPL. `q` quits, `r` resets the conversation, `h` shows help; the
//! KV cache is kept between turns. Reads turns line by line when stdin is not a terminal.

use super::{ModelOpts, SamplerFlags};
use crate::engine::chat::ChatSession;
use crate::engine::generate::GenerateOptions;
use anyhow::Result;
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub sampler: SamplerFlags,
    /// PRNG seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Maximum number of tokens to generate per turn
    #[arg(long, short = 'm', default_value_t = 256)]
    pub max_tokens: usize,
    /// System prompt to be used for the chat template
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Keep at most this many positions in the KV cache (the first 4 and the most recent ones)
    #[arg(long)]
    pub max_kv_size: Option<usize>,
    /// Number of prompt tokens to process at a time
    #[arg(long, default_value_t = 2048)]
    pub prefill_step_size: usize,
}

const HELP: &str = "Type a message and press Enter. Commands: q quit, r reset the conversation, h help.";

pub fn run(a: ChatArgs) -> Result<i32> {
    let (loaded, tok) = a.model.load()?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        prefill_step_size: a.prefill_step_size,
        sampler: a.sampler.config(Some(a.seed), &tok)?,
        max_kv_size: a.max_kv_size,
        ..Default::default()
    };
    let mut chat = ChatSession::new(loaded.model.as_ref(), &tok, opts, a.system_prompt.clone())?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        println!("wick chat · {} · max tokens {}", a.model.model.as_deref().unwrap_or("default model"), a.max_tokens);
        println!("{HELP}");
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let query = line?;
        match query.trim() {
            "q" => break,
            "r" => {
                chat.reset();
                eprintln!("  reset: context cleared");
                continue;
            }
            "h" => {
                println!("{HELP}");
                continue;
            }
            _ => {}
        }
        let mut detok = tok.streaming_detokenizer();
        let stdout = std::io::stdout();
        let result = chat.turn(&query, |t| {
            let piece = detok.add_token(t);
            let mut out = stdout.lock();
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            Ok(true)
        });
        println!("{}", detok.finalize());
        match result {
            Ok(s) => eprintln!(
                "  {} tokens · {:.1} tok/s · prompt {:.1} tok/s · peak {:.2} GB",
                s.generation_tokens, s.generation_tps, s.prompt_tps, s.peak_memory_gb
            ),
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    if interactive {
        println!("bye");
    }
    Ok(0)
}
