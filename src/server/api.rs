//! The OpenAI request fields wick reads, checked one by one: a wrong type or value is a 400 that
//! names the field; unknown fields are ignored; `null` counts as absent.

use crate::engine::sample::{LogitsProcessors, SamplerConfig};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code: None }
    }

    /// A 400 about request field `param`.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if matches!(self.status.as_u16(), 429 | 503) {
            r.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// The request body, a JSON object.
pub struct Body(pub Map<String, Value>);

impl Body {
    pub fn parse(bytes: &[u8]) -> ApiResult<Self> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the request body is not UTF-8: {e}")))?;
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(_) => Err(ApiError::new(StatusCode::BAD_REQUEST, "the request body must be a JSON object")),
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the request body is not valid JSON: {e}"))),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        self.get(name)
            .map(|v| v.as_bool().ok_or_else(|| ApiError::field(name, format!("{name} must be a boolean"))))
            .transpose()
    }

    /// A number in `[min, max]`.
    pub fn number(&self, name: &str, min: f64, max: f64) -> ApiResult<Option<f64>> {
        self.get(name).map(|v| number(v, name, min, max)).transpose()
    }

    /// An integer in `[min, max]`.
    pub fn int(&self, name: &str, min: i64, max: i64) -> ApiResult<Option<i64>> {
        self.get(name).map(|v| int(v, name, min, max)).transpose()
    }

    pub fn string(&self, name: &str) -> ApiResult<Option<&str>> {
        self.get(name)
            .map(|v| v.as_str().ok_or_else(|| ApiError::field(name, format!("{name} must be a string"))))
            .transpose()
    }

    pub fn object(&self, name: &str) -> ApiResult<Option<&Map<String, Value>>> {
        self.get(name)
            .map(|v| v.as_object().ok_or_else(|| ApiError::field(name, format!("{name} must be a JSON object"))))
            .transpose()
    }
}

fn number(v: &Value, name: &str, min: f64, max: f64) -> ApiResult<f64> {
    let x = v
        .as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| ApiError::field(name, format!("{name} must be a number")))?;
    if x < min || x > max {
        return Err(ApiError::field(name, format!("{name} must be between {min} and {max}, got {x}")));
    }
    Ok(x)
}

fn int(v: &Value, name: &str, min: i64, max: i64) -> ApiResult<i64> {
    let x = match v {
        Value::Number(n) => {
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
        }
        _ => None,
    };
    let x = x.ok_or_else(|| {
        if v.is_number() {
            ApiError::field(name, format!("{name} must be an integer between {min} and {max}"))
        } else {
            ApiError::field(name, format!("{name} must be an integer"))
        }
    })?;
    if x < min || x > max {
        return Err(ApiError::field(name, format!("{name} must be between {min} and {max}, got {x}")));
    }
    Ok(x)
}

/// The server's defaults for what a request leaves out (its sampler flags).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub sampler: SamplerConfig,
    pub max_tokens: usize,
}

/// How to generate, from the request's fields.
#[derive(Debug, Clone)]
pub struct Generation {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub processors: LogitsProcessors,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(n)`: token log-probabilities with the `n` most likely alternatives
    pub logprobs: Option<usize>,
}

/// The most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

impl Generation {
    /// Reads the generation fields; `chat` selects chat's `logprobs` (a boolean with
    /// `top_logprobs`) over completions' (an integer count).
    pub fn parse(body: &Body, defaults: &Defaults, vocab: usize, chat: bool) -> ApiResult<Self> {
        if let Some(n) = body.int("n", 1, i64::MAX)? {
            if n != 1 {
                return Err(ApiError::field("n", "only n = 1 is supported"));
            }
        }
        let max_tokens = match body.int("max_completion_tokens", 1, i64::MAX)? {
            Some(m) => Some(m),
            None => body.int("max_tokens", 1, i64::MAX)?,
        }
        .map_or(defaults.max_tokens, |m| m as usize);
        let mut sampler = defaults.sampler.clone();
        if let Some(t) = body.number("temperature", 0.0, 100.0)? {
            sampler.temp = t as f32;
        }
        if let Some(p) = body.number("top_p", 0.0, 1.0)? {
            sampler.top_p = p as f32;
        }
        if let Some(k) = body.int("top_k", 0, vocab as i64 - 1)? {
            sampler.top_k = k as usize;
        }
        if let Some(p) = body.number("min_p", 0.0, 1.0)? {
            sampler.min_p = p as f32;
        }
        if let Some(p) = body.number("xtc_probability", 0.0, 1.0)? {
            sampler.xtc_probability = p as f32;
        }
        if let Some(p) = body.number("xtc_threshold", 0.0, 0.5)? {
            sampler.xtc_threshold = p as f32;
        }
        sampler.seed = body.int("seed", i64::MIN, i64::MAX)?.map(|s| s as u64);

        // mlx_lm's penalties look at the last 20 tokens unless told otherwise
        let context = |name: &str| -> ApiResult<usize> { Ok(body.int(name, 0, 1 << 20)?.unwrap_or(20) as usize) };
        let (rep, pres, freq) = (
            context("repetition_context_size")?,
            context("presence_context_size")?,
            context("frequency_context_size")?,
        );
        let mut processors = LogitsProcessors::default();
        if let Some(p) = body.number("repetition_penalty", 0.0, 1e6)? {
            processors.repetition_penalty = Some((p as f32, rep));
        }
        if let Some(p) = body.number("presence_penalty", -2.0, 2.0)? {
            processors.presence_penalty = Some((p as f32, pres));
        }
        if let Some(p) = body.number("frequency_penalty", -2.0, 2.0)? {
            processors.frequency_penalty = Some((p as f32, freq));
        }
        if let Some(bias) = body.object("logit_bias")? {
            for (k, v) in bias {
                let id: u32 = k.parse().ok().filter(|&id: &u32| (id as usize) < vocab).ok_or_else(|| {
                    ApiError::field("logit_bias", format!("logit_bias key {k:?} is not a token id below {vocab}"))
                })?;
                let b = number(v, "logit_bias", -100.0, 100.0)?;
                processors.logit_bias.push((id, b as f32));
            }
        }

        let stop = match body.get("stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(String::from)
                        .ok_or_else(|| ApiError::field("stop", "stop must be a string or a list of strings"))
                })
                .collect::<ApiResult<_>>()?,
            Some(_) => return Err(ApiError::field("stop", "stop must be a string or a list of strings")),
        };
        if stop.len() > 16 {
            return Err(ApiError::field("stop", "at most 16 stop sequences"));
        }
        let stream = body.bool("stream")?.unwrap_or(false);
        let include_usage = match body.object("stream_options")? {
            Some(o) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::field("stream_options", "stream_options.include_usage must be a boolean"))
                }
            },
            None => false,
        };
        let logprobs = if chat {
            let top = body.int("top_logprobs", 0, MAX_TOP_LOGPROBS)?;
            match body.bool("logprobs")? {
                Some(true) => Some(top.unwrap_or(0) as usize),
                _ if top.is_some_and(|t| t > 0) => {
                    return Err(ApiError::field("top_logprobs", "top_logprobs needs logprobs set to true"))
                }
                _ => None,
            }
        } else {
            match body.get("logprobs") {
                None | Some(Value::Bool(false)) => None,
                Some(Value::Bool(true)) => Some(0),
                Some(v) => Some(int(v, "logprobs", 0, MAX_TOP_LOGPROBS)? as usize),
            }
        };
        Ok(Self { max_tokens, sampler, processors, stop, stream, include_usage, logprobs })
    }
}

/// Chat messages ready for the template: content parts joined into a string, `null` content
/// as "", assistant tool-call arguments given as JSON strings parsed into objects (templates
/// iterate over them), as mlx_lm.server prepares them.
pub fn chat_messages(body: &Body) -> ApiResult<Vec<Value>> {
    let msgs = body.get("messages").ok_or_else(|| ApiError::field("messages", "messages is required"))?;
    let msgs = msgs.as_array().ok_or_else(|| ApiError::field("messages", "messages must be a list"))?;
    if msgs.is_empty() {
        return Err(ApiError::field("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let at = |what: &str| ApiError::field("messages", format!("messages[{i}]: {what}"));
        let mut m = m.as_object().cloned().ok_or_else(|| at("must be an object"))?;
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| at("role must be a string"))?;
        let role = match role {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            r => return Err(at(&format!("unknown role {r:?} (system, user, assistant or tool)"))),
        }
        .to_string();
        m.insert("role".into(), Value::String(role));
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (Some("text"), None) => return Err(at("a text content part needs a string `text`")),
                        (Some(t), _) => {
                            return Err(at(&format!("content parts of type {t:?} are not supported (only text)")))
                        }
                        (None, _) => return Err(at("each content part needs a `type`")),
                    }
                }
                text
            }
            Some(_) => return Err(at("content must be a string, a list of content parts or null")),
        };
        m.insert("content".into(), Value::String(content));
        if let Some(calls) = m.get_mut("tool_calls") {
            let calls = calls.as_array_mut().ok_or_else(|| at("tool_calls must be a list"))?;
            for c in calls {
                if let Some(Value::String(args)) = c.get("function").and_then(|f| f.get("arguments")).cloned() {
                    let parsed = serde_json::from_str::<Value>(&args)
                        .map_err(|e| at(&format!("tool call arguments are not JSON: {e}")))?;
                    c["function"]["arguments"] = parsed;
                }
            }
        }
        out.push(Value::Object(m));
    }
    Ok(out)
}

/// The tools a chat request offers (`None` when absent, empty or `tool_choice` is "none").
pub fn chat_tools(body: &Body) -> ApiResult<Option<Value>> {
    match body.get("tool_choice") {
        None => {}
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "auto" || s == "required" => {}
        Some(Value::Object(o)) if o.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string) => {}
        Some(_) => return Err(ApiError::field("tool_choice", "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}")),
    }
    match body.get("tools") {
        None => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(a)) => {
            if a.iter().any(|t| !t.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string)) {
                return Err(ApiError::field("tools", "each tool must be an object with function.name"));
            }
            Ok(Some(Value::Array(a.clone())))
        }
        Some(_) => Err(ApiError::field("tools", "tools must be a list")),
    }
}

/// A completions prompt: a string, a list holding one string, or a list of token ids.
pub enum TextPrompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn text_prompt(body: &Body, vocab: usize) -> ApiResult<TextPrompt> {
    let bad = || ApiError::field("prompt", "prompt must be a string, a list of one string, or a list of token ids");
    match body.get("prompt").ok_or_else(|| ApiError::field("prompt", "prompt is required"))? {
        Value::String(s) => Ok(TextPrompt::Text(s.clone())),
        Value::Array(a) => match a.as_slice() {
            [Value::String(s)] => Ok(TextPrompt::Text(s.clone())),
            [] => Err(ApiError::field("prompt", "prompt must not be empty")),
            items if items.iter().all(Value::is_number) => items
                .iter()
                .map(|v| v.as_u64().filter(|&t| (t as usize) < vocab).map(|t| t as u32))
                .collect::<Option<Vec<u32>>>()
                .map(TextPrompt::Tokens)
                .ok_or_else(|| {
                    ApiError::field("prompt", format!("token ids in prompt must be integers below {vocab}"))
                }),
            items if items.iter().all(Value::is_string) => {
                Err(ApiError::field("prompt", "only one prompt per request is supported"))
            }
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}
