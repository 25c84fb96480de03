//! A model folder's `config.json` (errors name the file and key) and `generation_config.json`.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// config.json, parsed to JSON with its path kept for error messages.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub value: Value,
}

/// `text` with the bare `Infinity`, `-Infinity` and `NaN` that Python's json writes (outside
/// strings) as `{"__float__": "…"}` objects.
fn tag_bare_floats(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|w| rest.starts_with(w)) {
            out.push_str(&format!("{{\"__float__\": \"{word}\"}}"));
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl ConfigFile {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        // Python's json (Hugging Face configs) writes ±Infinity and NaN bare; read them as
        // mlx_lm's loader reads them tagged, `{"__float__": "Infinity"}`
        let value: Value = serde_json::from_str(&text)
            .or_else(|e| serde_json::from_str(&tag_bare_floats(&text)).map_err(|_| e))
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if !value.is_object() {
            bail!("{}: expected a JSON object", path.display());
        }
        Ok(Self { path, value })
    }

    /// `model_type`, required.
    pub fn model_type(&self) -> Result<&str> {
        match self.value.get("model_type") {
            Some(Value::String(s)) => Ok(s),
            Some(_) => bail!("{}: field `model_type` must be a string", self.path.display()),
            None => bail!("{}: missing required field `model_type`", self.path.display()),
        }
    }

    /// Deserializes the whole config into an architecture's argument struct; serde's
    /// message names the missing or mistyped key.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.value.clone()).map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))
    }
}

/// eos ids from `generation_config.json` (`eos_token_id`: int or list), when present.
pub fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(vec![]);
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(match v.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn bare_python_floats_become_tagged_outside_strings() {
        let text = r#"{"a": [0.0, Infinity], "b": -Infinity, "c": NaN, "s": "Infinity \" NaN"}"#;
        let v: serde_json::Value = serde_json::from_str(&super::tag_bare_floats(text)).unwrap();
        assert_eq!(v["a"][1]["__float__"], "Infinity");
        assert_eq!(v["b"]["__float__"], "-Infinity");
        assert_eq!(v["c"]["__float__"], "NaN");
        assert_eq!(v["s"], "Infinity \" NaN");
    }
}
