//! From the scheduler's token events to OpenAI responses: detokenize, filter (stop sequences,
//! tool calls), and shape as a whole `chat.completion` / `text_completion` or as SSE chunks
//! (`data: {...}` lines, then `data: [DONE]`).

use super::api::ApiError;
use super::scheduler::{Event, Finish};
use super::text::{format_tool_calls, TextFilter};
use super::{log_line, random_id, unix_time, App, Kind, Prepared};
use crate::tokenizer::DetokenizerState;
use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// What one event adds to the response.
#[derive(Default)]
struct Delta {
    text: String,
    tool_calls: Vec<Value>,
    /// chat: `logprobs.content` entries; text: (token, logprob, top) per token
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
}

struct TokenLogprob {
    token: String,
    logprob: f32,
    top: Vec<(String, f32)>,
}

pub struct Responder {
    app: Arc<App>,
    kind: Kind,
    p: Prepared,
    id: String,
    created: u64,
    detok: DetokenizerState,
    filter: TextFilter,
    completion_tokens: usize,
    cached: usize,
    tool_index: usize,
    tic: Instant,
}

impl Responder {
    pub fn new(app: Arc<App>, kind: Kind, p: Prepared) -> Self {
        let tools = if p.tools { app.tools.clone() } else { None };
        let filter = TextFilter::new(p.gen.stop.clone(), tools);
        let id = match kind {
            Kind::Chat => format!("chatcmpl-{}", random_id(24)),
            Kind::Text => format!("cmpl-{}", random_id(24)),
        };
        Self {
            app,
            kind,
            p,
            id,
            created: unix_time(),
            detok: DetokenizerState::default(),
            filter,
            completion_tokens: 0,
            cached: 0,
            tool_index: 0,
            tic: Instant::now(),
        }
    }

    pub fn streaming(&self) -> bool {
        self.p.gen.stream
    }

    fn token_text(&self, id: u32) -> String {
        self.app.tok.decode(&[id]).unwrap_or_default()
    }

    /// Applies one event; `Err` for a model failure.
    fn on_event(&mut self, ev: Event) -> Result<Option<Delta>, String> {
        let (id, logprob, top, finish) = match ev {
            Event::Started { cached } => {
                self.cached = cached;
                return Ok(None);
            }
            Event::Error(e) => return Err(e),
            Event::Token { id, logprob, top, finish } => (id, logprob, top, finish),
        };
        self.completion_tokens += 1;
        let tok = self.app.tok.inner();
        let mut piece = String::new();
        if finish != Some(Finish::Stop) {
            piece = self.detok.add_token(tok, id);
        }
        if finish.is_some() {
            piece += &self.detok.finalize(tok);
        }
        let mut out = self.filter.push(&piece);
        if finish.is_some() && !out.stopped {
            let rest = self.filter.finish();
            out.text += &rest.text;
            out.tool_calls.extend(rest.tool_calls);
        }
        let mut d = Delta { text: out.text, ..Default::default() };
        if !out.tool_calls.is_empty() {
            let (calls, text) = format_tool_calls(&out.tool_calls, self.tool_index);
            self.tool_index += calls.len();
            d.tool_calls = calls;
            d.text += &text;
        }
        if let (Some(lp), false) = (logprob, finish == Some(Finish::Stop)) {
            let top = top.into_iter().map(|(t, l)| (self.token_text(t), l)).collect();
            d.logprobs.push(TokenLogprob { token: self.token_text(id), logprob: lp, top });
        }
        d.finish = match (out.stopped, finish) {
            (true, _) | (false, Some(Finish::Stop)) => Some(if self.tool_index > 0 { "tool_calls" } else { "stop" }),
            (false, Some(Finish::Length)) => Some("length"),
            (false, None) => None,
        };
        Ok(Some(d))
    }

    fn usage(&self) -> Value {
        let prompt = self.p.prompt.len();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.p.model,
            "system_fingerprint": concat!("wick-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }

    /// OpenAI's `logprobs` of a choice for these tokens (`null` when not asked for).
    fn logprobs(&self, lps: &[TokenLogprob], text_offset: usize) -> Value {
        if self.p.gen.logprobs.is_none() {
            return Value::Null;
        }
        let bytes = |s: &str| s.as_bytes().to_vec();
        match self.kind {
            Kind::Chat => json!({"content": lps.iter().map(|t| json!({
                "token": t.token,
                "logprob": t.logprob,
                "bytes": bytes(&t.token),
                "top_logprobs": t.top.iter().map(|(s, l)| json!({"token": s, "logprob": l, "bytes": bytes(s)})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}),
            Kind::Text => {
                let mut offset = text_offset;
                let mut offsets = vec![];
                for t in lps {
                    offsets.push(offset);
                    offset += t.token.len();
                }
                json!({
                    "tokens": lps.iter().map(|t| &t.token).collect::<Vec<_>>(),
                    "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": lps.iter().map(|t| t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    fn log_done(&self, finish: &str) {
        if self.app.log_requests {
            let secs = self.tic.elapsed().as_secs_f64();
            log_line(json!({
                "event": "completion",
                "id": self.id,
                "prompt_tokens": self.p.prompt.len(),
                "cached_tokens": self.cached,
                "completion_tokens": self.completion_tokens,
                "finish_reason": finish,
                "seconds": (secs * 1e3).round() / 1e3,
            }));
        }
    }

    /// Waits for the whole response.
    pub async fn collect(mut self, mut rx: UnboundedReceiver<Event>) -> Response {
        let (mut text, mut calls, mut lps) = (String::new(), vec![], vec![]);
        let finish = loop {
            let Some(ev) = rx.recv().await else { return model_error("the model stopped".into()) };
            match self.on_event(ev) {
                Err(e) => return model_error(e),
                Ok(None) => {}
                Ok(Some(d)) => {
                    text += &d.text;
                    calls.extend(d.tool_calls);
                    lps.extend(d.logprobs);
                    if let Some(f) = d.finish {
                        break f;
                    }
                }
            }
        };
        drop(rx);
        self.log_done(finish);
        let logprobs = self.logprobs(&lps, 0);
        let choice = match self.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
                if !calls.is_empty() {
                    for c in calls.iter_mut() {
                        c.as_object_mut().map(|o| o.remove("index"));
                    }
                    message["tool_calls"] = json!(calls);
                }
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Text => json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        };
        let mut body = self.envelope(false, json!([choice]));
        body["usage"] = self.usage();
        axum::Json(body).into_response()
    }

    fn chunk(&self, d: &Delta, text_offset: usize) -> Value {
        let logprobs = if d.logprobs.is_empty() { Value::Null } else { self.logprobs(&d.logprobs, text_offset) };
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if !d.text.is_empty() {
                    delta["content"] = json!(d.text);
                }
                if !d.tool_calls.is_empty() {
                    delta["tool_calls"] = json!(d.tool_calls);
                }
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish})
            }
            Kind::Text => json!({"index": 0, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish}),
        };
        self.envelope(true, json!([choice]))
    }

    /// Streams the response as server-sent events; ends the generation when the client leaves.
    pub fn stream(mut self, mut rx: UnboundedReceiver<Event>) -> Response {
        let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            let sse = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
            let mut text_offset = 0;
            let finish = loop {
                let Some(ev) = rx.recv().await else {
                    let err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model stopped");
                    let _ = tx.send(sse(&err.body())).await;
                    return;
                };
                let d = match self.on_event(ev) {
                    Err(e) => {
                        let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
                        let _ = tx.send(sse(&err.body())).await;
                        return;
                    }
                    Ok(None) => {
                        if self.kind == Kind::Chat {
                            // the first chunk names the role, as OpenAI's do
                            let first = self.envelope(
                                true,
                                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                            );
                            if tx.send(sse(&first)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Ok(Some(d)) => d,
                };
                if d.text.is_empty() && d.tool_calls.is_empty() && d.logprobs.is_empty() && d.finish.is_none() {
                    continue;
                }
                if tx.send(sse(&self.chunk(&d, text_offset))).await.is_err() {
                    return;
                }
                text_offset += d.text.len();
                if let Some(f) = d.finish {
                    break f;
                }
            };
            drop(rx);
            self.log_done(finish);
            if self.p.gen.include_usage {
                let mut u = self.envelope(true, json!([]));
                u["usage"] = self.usage();
                if tx.send(sse(&u)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

fn model_error(e: String) -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("generation failed: {e}")).into_response()
}
