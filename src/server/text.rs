//! What a response's text goes through before the client sees it: stop sequences (cut, never
//! sent, even when split across tokens: text that could still become one is held back) and
//! tool calls (text between the model's tool-call markers becomes `tool_calls`, as
//! mlx_lm.server's text state machine does).

use serde_json::{json, Value};

/// The markers around a tool call and how its text is read; from the chat template as
/// mlx_lm infers it (`<tool_call>` … `</tool_call>` holding JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFormat {
    pub start: String,
    pub end: String,
}

impl ToolFormat {
    /// mlx_lm's `json_tools` parser, chosen when the template writes `<tool_call>` and
    /// `tool_call.name`.
    pub fn infer(template_source: &str) -> Option<Self> {
        (template_source.contains("<tool_call>") && template_source.contains("tool_call.name"))
            .then(|| Self { start: "<tool_call>".into(), end: "</tool_call>".into() })
    }
}

/// Output of [`TextFilter::push`]: text for the client, finished tool calls (their raw text),
/// and whether a stop sequence ended the response.
#[derive(Debug, Default, PartialEq)]
pub struct Filtered {
    pub text: String,
    pub tool_calls: Vec<String>,
    pub stopped: bool,
}

pub struct TextFilter {
    stops: Vec<String>,
    tools: Option<ToolFormat>,
    /// text not yet released: it may be the start of a stop sequence or a marker
    held: String,
    in_tool: bool,
    stopped: bool,
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `needles`.
fn partial_suffix(text: &str, needles: &[&str]) -> usize {
    let mut best = 0;
    for n in needles {
        for (i, _) in text.char_indices().filter(|&(i, _)| text.len() - i < n.len()) {
            if n.starts_with(&text[i..]) {
                best = best.max(text.len() - i);
                break;
            }
        }
    }
    best
}

impl TextFilter {
    pub fn new(stops: Vec<String>, tools: Option<ToolFormat>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops, tools, held: String::new(), in_tool: false, stopped: false }
    }

    /// Takes the next piece of generated text.
    pub fn push(&mut self, piece: &str) -> Filtered {
        let mut out = Filtered::default();
        if self.stopped {
            out.stopped = true;
            return out;
        }
        self.held.push_str(piece);
        loop {
            if self.in_tool {
                let end = &self.tools.as_ref().expect("in a tool call").end;
                let Some(at) = self.held.find(end.as_str()) else { return out };
                out.tool_calls.push(self.held[..at].to_string());
                self.held.drain(..at + end.len());
                self.in_tool = false;
                continue;
            }
            let stop = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
            let tool = self.tools.as_ref().and_then(|t| self.held.find(t.start.as_str()).map(|at| (at, t.start.len())));
            match (stop, tool) {
                (Some(s), t) if t.is_none_or(|(at, _)| s <= at) => {
                    out.text.push_str(&self.held[..s]);
                    self.held.clear();
                    self.stopped = true;
                    out.stopped = true;
                    return out;
                }
                (_, Some((at, len))) => {
                    out.text.push_str(&self.held[..at]);
                    self.held.drain(..at + len);
                    self.in_tool = true;
                }
                _ => {
                    let mut needles: Vec<&str> = self.stops.iter().map(String::as_str).collect();
                    needles.extend(self.tools.as_ref().map(|t| t.start.as_str()));
                    let keep = partial_suffix(&self.held, &needles);
                    let cut = self.held.len() - keep;
                    out.text.push_str(&self.held[..cut]);
                    self.held.drain(..cut);
                    return out;
                }
            }
        }
    }

    /// Releases what is held at the end of the response: held text, and an unfinished tool
    /// call (kept as a call; [`format_tool_calls`] turns unreadable ones back into text).
    pub fn finish(&mut self) -> Filtered {
        let mut out = Filtered { stopped: self.stopped, ..Default::default() };
        let rest = std::mem::take(&mut self.held);
        if self.in_tool {
            if !rest.trim().is_empty() {
                out.tool_calls.push(rest);
            }
        } else {
            out.text = rest;
        }
        self.in_tool = false;
        out
    }
}

/// OpenAI `tool_calls` entries from raw tool-call texts (each JSON `{"name", "arguments"}` or a
/// list of them); a text that does not read as one is returned as plain text instead.
pub fn format_tool_calls(raw: &[String], first_index: usize) -> (Vec<Value>, String) {
    let mut calls = vec![];
    let mut text = String::new();
    for r in raw {
        let parsed = serde_json::from_str::<Value>(r.trim()).ok();
        let items = match parsed {
            Some(Value::Array(a)) => a,
            Some(v) => vec![v],
            None => vec![],
        };
        let ok = !items.is_empty() && items.iter().all(|v| v.get("name").and_then(Value::as_str).is_some());
        if !ok {
            text.push_str(r);
            continue;
        }
        for v in items {
            let args = match v.get("arguments").or_else(|| v.get("parameters")) {
                Some(Value::String(s)) => s.clone(),
                Some(a) => a.to_string(),
                None => "{}".into(),
            };
            calls.push(json!({
                "index": first_index + calls.len(),
                "id": format!("call_{}", super::random_id(24)),
                "type": "function",
                "function": {"name": v["name"], "arguments": args},
            }));
        }
    }
    (calls, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], tools: bool, pieces: &[&str]) -> (String, Vec<String>, bool) {
        let tools = tools.then(|| ToolFormat { start: "<tool_call>".into(), end: "</tool_call>".into() });
        let mut f = TextFilter::new(stops.iter().map(|s| s.to_string()).collect(), tools);
        let (mut text, mut calls, mut stopped) = (String::new(), vec![], false);
        for p in pieces {
            let o = f.push(p);
            text += &o.text;
            calls.extend(o.tool_calls);
            stopped |= o.stopped;
        }
        let o = f.finish();
        text += &o.text;
        calls.extend(o.tool_calls);
        (text, calls, stopped || o.stopped)
    }

    #[test]
    fn stop_split_across_pieces_is_cut_and_never_sent() {
        assert_eq!(run(&["END"], false, &["hello E", "N", "D more"]), ("hello ".into(), vec![], true));
        // a held prefix that does not become the stop is released
        assert_eq!(run(&["END"], false, &["a E", "NX", " b"]), ("a ENX b".into(), vec![], false));
        // the earliest of several stops wins
        assert_eq!(run(&["yz", "xy"], false, &["wxyz"]), ("w".into(), vec![], true));
        // held text at the end is released
        assert_eq!(run(&["END"], false, &["tail EN"]), ("tail EN".into(), vec![], false));
        // multi-byte text next to a stop
        assert_eq!(run(&["é!"], false, &["café", "!x"]), ("caf".into(), vec![], true));
    }

    #[test]
    fn tool_calls_are_taken_out_of_the_text() {
        let (text, calls, stopped) =
            run(&[], true, &["Sure.<tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>"]);
        assert_eq!(text, "Sure.");
        assert_eq!(calls, vec!["\n{\"name\": \"f\", \"arguments\": {}}\n".to_string()]);
        assert!(!stopped);
        let (calls, rest) = format_tool_calls(&calls, 0);
        assert_eq!(rest, "");
        assert_eq!(calls[0]["function"]["name"], "f");
        assert_eq!(calls[0]["function"]["arguments"], "{}");
        // an unreadable call comes back as text
        let (calls, rest) = format_tool_calls(&["not json".to_string()], 0);
        assert!(calls.is_empty());
        assert_eq!(rest, "not json");
    }
}
