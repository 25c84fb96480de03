//! Chat templates: the model's Jinja template rendered with minijinja, configured like
//! transformers' sandboxed environment (trim_blocks, lstrip_blocks, `raise_exception`,
//! `strftime_now`, Python string methods through minijinja-contrib's pycompat).

use anyhow::Result;
use minijinja::{Environment, ErrorKind, Value as JValue};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

fn raise_exception(msg: String) -> std::result::Result<JValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    // Templates use this for a "today's date" line; UTC civil date from the system clock.
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let days = secs.div_euclid(86400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const MON: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", MON[(m - 1) as usize])
}

/// transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=…,
/// separators=…, sort_keys=…)`, so that tool schemas render as Hugging Face renders them
/// (`{"a": 1, "b": [2, 3]}`, not minijinja's compact, HTML-escaped form).
fn tojson(value: JValue, kwargs: minijinja::value::Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item, key) = match separators.as_deref() {
        Some([i, k]) => (i.clone(), k.clone()),
        _ => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    py_dumps(&v, &PyJson { indent, sort_keys: sort_keys.unwrap_or(false), item, key }, 0, &mut out);
    Ok(out)
}

struct PyJson {
    indent: Option<usize>,
    sort_keys: bool,
    item: String,
    key: String,
}

fn py_dumps(v: &Value, f: &PyJson, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = f.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item);
                }
                newline(out, depth + 1);
                py_dumps(x, f, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            let mut items: Vec<(&String, &Value)> = o.iter().collect();
            if f.sort_keys {
                items.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(&f.key);
                py_dumps(x, f, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        // Python writes integral floats with ".0" too, and serde_json does the same
        other => out.push_str(&other.to_string()),
    }
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow::anyhow!("the chat template does not parse: {e}"))?;
        Ok(Self { env, source: source.to_string() })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (each a [`Message`] or a JSON object with tool calls and the like).
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        special_tokens: &[(String, String)],
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        for (k, v) in special_tokens {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        ctx.insert("messages".into(), serde_json::to_value(messages)?);
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(JValue::from_serialize(&ctx)).map_err(|e| anyhow::anyhow!("chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap();
        let x =
            serde_json::json!({"name": "f", "p": {"type": "object", "e": [], "d": {}}, "b": [2, "é", 1.5, null, true]});
        let mut extra = serde_json::Map::new();
        extra.insert("x".into(), x);
        let out = t.render::<Message>(&[], false, &[], &extra).unwrap();
        // both strings are Python's json.dumps(x, ensure_ascii=False[, indent=2])
        let compact = r#"{"name": "f", "p": {"type": "object", "e": [], "d": {}}, "b": [2, "é", 1.5, null, true]}"#;
        let indented = "{\n  \"name\": \"f\",\n  \"p\": {\n    \"type\": \"object\",\n    \"e\": [],\n    \"d\": {}\n  },\n  \"b\": [\n    2,\n    \"é\",\n    1.5,\n    null,\n    true\n  ]\n}";
        assert_eq!(out, format!("{compact}|{indented}"));
    }
}
