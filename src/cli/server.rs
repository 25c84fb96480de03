//! `wick server`: mlx_lm.server's flags, plus an API key, limits and request logs.

use super::{ModelOpts, SamplerFlags};
use crate::server::api::Defaults;
use crate::server::scheduler::{Scheduler, SchedulerConfig};
use crate::server::text::ToolFormat;
use crate::server::{unix_time, App};
use anyhow::{Context, Result};
use clap::Args;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub model: ModelOpts,
    /// Host for the HTTP server
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port for the HTTP server (0 picks a free one)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Default maximum number of tokens to generate
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampler: SamplerFlags,
    /// Arguments for the chat template, as a JSON object (e.g. '{"enable_thinking": false}')
    #[arg(long)]
    pub chat_template_args: Option<String>,
    /// Requests decoded together in one batch (mlx_lm's --decode-concurrency)
    #[arg(long, alias = "decode-concurrency", default_value_t = 32)]
    pub max_concurrency: usize,
    /// Requests that may wait for a batch place; beyond it requests get 429
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Number of prompt tokens to process at a time
    #[arg(long, default_value_t = 2048)]
    pub prefill_step_size: usize,
    /// Maximum number of distinct KV caches kept for prompt-prefix reuse
    #[arg(long, default_value_t = 10)]
    pub prompt_cache_size: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health (or set WICK_API_KEY)
    #[arg(long, env = "WICK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes (413 beyond)
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// DEBUG or INFO log every request as a JSON line on stderr; WARNING and above do not
    #[arg(long, default_value = "INFO", value_parser = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])]
    pub log_level: String,
}

pub fn run(a: ServerArgs) -> Result<i32> {
    let template_args = super::generate::template_config(a.chat_template_args.as_deref())
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("--chat-template-config", "--chat-template-args")))?;
    let (loaded, tok) = a.model.load()?;
    let model_id = match &a.model.model {
        Some(m) => m.clone(),
        None => crate::hub::default_model_dir()?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default_model".into()),
    };
    let mut model_names = vec![model_id.clone()];
    if let Some(m) = &a.model.model {
        if let Ok(c) = std::fs::canonicalize(m) {
            model_names.push(c.to_string_lossy().into_owned());
        }
        if let Some(n) = std::path::Path::new(m).file_name() {
            model_names.push(n.to_string_lossy().into_owned());
        }
    }
    let sampler = a.sampler.config(None, &tok)?;
    let model = loaded.model;
    let context = model.max_context();
    let vocab = model.vocab_size();
    let tools = tok.chat_template.as_ref().and_then(|t| ToolFormat::infer(t.source()));
    let (scheduler, worker) = Scheduler::new(
        model,
        SchedulerConfig {
            max_batch: a.max_concurrency,
            max_queue: a.max_queue,
            prefill_step_size: a.prefill_step_size,
            prompt_cache_size: a.prompt_cache_size,
            eos_token_ids: tok.eos_token_ids.clone(),
        },
    )?;
    let app = Arc::new(App {
        tok: Arc::new(tok),
        scheduler,
        model_id,
        model_names,
        defaults: Defaults { sampler, max_tokens: a.max_tokens },
        template_args,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_bytes,
        context,
        vocab,
        tools,
        created: unix_time(),
        log_requests: matches!(a.log_level.as_str(), "DEBUG" | "INFO"),
    });
    // the HTTP side on threads of its own; the model on this one (a rayon worker, see main)
    let (host, port) = (a.host, a.port);
    let http = std::thread::Builder::new().name("wick-http".into()).spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                .await
                .with_context(|| format!("cannot listen on {host}:{port} (--host/--port)"))?;
            let addr = listener.local_addr()?;
            eprintln!("[INFO] wick server listening on http://{addr} (model {})", app.model_id);
            crate::server::serve(listener, app).await
        })
    })?;
    // returns once the HTTP side has dropped every scheduler handle
    worker.run();
    http.join().map_err(|_| anyhow::anyhow!("the HTTP server thread panicked"))??;
    Ok(0)
}
