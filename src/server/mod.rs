//! `wick server`: an OpenAI-compatible HTTP API (mlx_lm.server's routes and fields) on axum and
//! tokio. Handlers check and tokenize requests and turn the scheduler's token events into
//! responses (text, stop sequences, tool calls, log-probabilities, SSE streaming); the
//! [`scheduler`] thread owns the model and batches every live request.

pub mod api;
pub mod prefix_cache;
pub mod respond;
pub mod scheduler;
pub mod text;

use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use api::{ApiError, ApiResult, Body, Defaults, Generation};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use rand::Rng;
use scheduler::{Job, Refused, Scheduler};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use text::ToolFormat;

/// How long a client may take to send its request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the handlers share.
pub struct App {
    pub tok: Arc<Tokenizer>,
    pub scheduler: Scheduler,
    /// the id `/v1/models` lists
    pub model_id: String,
    /// names a request's `model` may use for this model
    pub model_names: Vec<String>,
    pub defaults: Defaults,
    /// `--chat-template-args`
    pub template_args: Map<String, Value>,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub context: Option<usize>,
    pub vocab: usize,
    pub tools: Option<ToolFormat>,
    pub created: u64,
    /// one JSON line per request on stderr
    pub log_requests: bool,
}

pub fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `n` random lowercase hex/alphanumeric characters for ids.
pub fn random_id(n: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// The routes, with authentication, request logs and JSON errors for unknown routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "unknown route").with_code("not_found") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(middleware::from_fn_with_state(app.clone(), log_request))
        .with_state(app)
}

/// Serves on `listener` until ctrl-c.
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>) -> Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("the HTTP server stopped")
}

async fn authenticate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.strip_prefix("Bearer "));
            let ok = given.is_some_and(|g| {
                g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0
            });
            if !ok {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong API key (Authorization: Bearer <key>)",
                )
                .with_code("invalid_api_key")
                .into_response();
            }
        }
    }
    next.run(req).await
}

async fn log_request(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let tic = Instant::now();
    let mut resp = next.run(req).await;
    resp.headers_mut().insert("x-wick-version", HeaderValue::from_static(env!("CARGO_PKG_VERSION")));
    if app.log_requests {
        log_line(json!({
            "event": "request",
            "method": method.as_str(),
            "path": path,
            "status": resp.status().as_u16(),
            "ms": (tic.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        }));
    }
    resp
}

/// One structured log line on stderr.
pub fn log_line(mut v: Value) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    v["ts"] = json!((now * 1e3).round() / 1e3);
    eprintln!("{v}");
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.scheduler.is_alive() {
        Json(json!({"status": "ok", "requests": app.scheduler.in_flight()})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable"}))).into_response()
    }
}

fn model_card(app: &App) -> Value {
    json!({"id": app.model_id, "object": "model", "created": app.created, "owned_by": "wick"})
}

async fn models(State(app): State<Arc<App>>) -> Response {
    Json(json!({"object": "list", "data": [model_card(&app)]})).into_response()
}

async fn model(State(app): State<Arc<App>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    if app.model_names.contains(&id) {
        Json(model_card(&app)).into_response()
    } else {
        ApiError::new(StatusCode::NOT_FOUND, format!("the model {id:?} does not exist on this server"))
            .with_code("model_not_found")
            .into_response()
    }
}

/// Reads the body: at most `limit` bytes (413 beyond), within [`BODY_TIMEOUT`].
async fn read_body(req: Request, limit: usize) -> ApiResult<Vec<u8>> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    };
    if let Some(n) =
        req.headers().get("content-length").and_then(|h| h.to_str().ok()).and_then(|h| h.parse::<u64>().ok())
    {
        if n > limit as u64 {
            return Err(too_large());
        }
    }
    let mut stream = req.into_body().into_data_stream();
    let mut out = Vec::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")))?;
            if out.len() + chunk.len() > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"))??;
    Ok(out)
}

/// Whether a request is a chat or a text completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// A checked, tokenized request.
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub gen: Generation,
    pub model: String,
    pub tools: bool,
}

/// Checks and tokenizes a request body (blocking work: runs off the async threads).
fn prepare(app: &App, bytes: &[u8], kind: Kind) -> ApiResult<Prepared> {
    let body = Body::parse(bytes)?;
    let model = match body.string("model")? {
        Some(m) if !app.model_names.iter().any(|n| n == m) && m != "default_model" => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("the model {m:?} does not exist on this server; it serves {:?}", app.model_id),
            )
            .with_code("model_not_found"))
        }
        Some(m) => m.to_string(),
        None => app.model_id.clone(),
    };
    let mut gen = Generation::parse(&body, &app.defaults, app.vocab, kind == Kind::Chat)?;
    let internal = |e: anyhow::Error| ApiError::new(StatusCode::BAD_REQUEST, format!("{e:#}"));
    let (prompt, tools) = match kind {
        Kind::Chat => {
            let messages = api::chat_messages(&body)?;
            let tools = api::chat_tools(&body)?;
            let mut extra = app.template_args.clone();
            if let Some(kw) = body.object("chat_template_kwargs")? {
                extra.extend(kw.clone());
            }
            let has_tools = tools.is_some();
            if let Some(t) = tools {
                extra.insert("tools".into(), t);
            }
            if app.tok.has_chat_template() {
                let text = app.tok.apply_chat_template(&messages, true, &extra).map_err(internal)?;
                (app.tok.encode(&text, false).map_err(internal)?, has_tools)
            } else {
                // mlx_lm.server's plain "USER: …" rendering for models without a template
                let mut text = String::from(
                    "A chat between a curious user and an artificial intelligence assistant. \
                     The assistant follows the given rules no matter what.\n",
                );
                for m in &messages {
                    let prefix = match m["role"].as_str() {
                        Some("system") => "ASSISTANT's RULE: ",
                        Some("user") => "USER: ",
                        Some("assistant") => "ASSISTANT: ",
                        _ => "",
                    };
                    text += &format!("{prefix}{}\n", m["content"].as_str().unwrap_or(""));
                }
                text += "ASSISTANT:";
                (app.tok.encode(&text, true).map_err(internal)?, false)
            }
        }
        Kind::Text => match api::text_prompt(&body, app.vocab)? {
            api::TextPrompt::Text(t) => (app.tok.encode(&t, true).map_err(internal)?, false),
            api::TextPrompt::Tokens(t) => (t, false),
        },
    };
    if prompt.is_empty() {
        return Err(ApiError::field(
            if kind == Kind::Chat { "messages" } else { "prompt" },
            "the prompt has no tokens",
        ));
    }
    if let Some(ctx) = app.context {
        if prompt.len() >= ctx {
            return Err(ApiError::field(
                if kind == Kind::Chat { "messages" } else { "prompt" },
                format!("the prompt has {} tokens; this model's context is {ctx} tokens", prompt.len()),
            )
            .with_code("context_length_exceeded"));
        }
        gen.max_tokens = gen.max_tokens.min(ctx - prompt.len());
    }
    // the sampler's own checks, so that a bad combination is a 400 here, not a failure later
    crate::engine::sample::Sampler::new(gen.sampler.clone())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    Ok(Prepared { prompt, gen, model, tools: tools && app.tools.is_some() })
}

async fn chat_completions(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, req, Kind::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, req, Kind::Text).await.unwrap_or_else(IntoResponse::into_response)
}

async fn handle(app: Arc<App>, req: Request, kind: Kind) -> ApiResult<Response> {
    debug_assert_eq!(req.method(), Method::POST);
    let bytes = read_body(req, app.max_body_bytes).await?;
    let a = app.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&a, &bytes, kind))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("request preparation failed: {e}")))??;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt: prepared.prompt.clone(),
        max_tokens: prepared.gen.max_tokens,
        sampler: prepared.gen.sampler.clone(),
        processors: prepared.gen.processors.clone(),
        logprobs: prepared.gen.logprobs,
        events: tx,
    };
    app.scheduler.submit(job).map_err(|r| match r {
        Refused::Full => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the server is busy: every slot and queue place is taken; retry later",
        )
        .with_code("server_busy"),
        Refused::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is not running").with_code("unavailable")
        }
    })?;
    let responder = respond::Responder::new(app, kind, prepared);
    Ok(if responder.streaming() { responder.stream(rx) } else { responder.collect(rx).await })
}
