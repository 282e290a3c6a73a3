//! A model's chat template, rendered as transformers' `apply_chat_template` renders it: Jinja with
//! `trim_blocks` and `lstrip_blocks`, Python's string and dict methods (`.strip()`, `.split()`,
//! `.items()`: minijinja-contrib's pycompat), loop controls, `raise_exception(message)`,
//! `strftime_now(format)`, a `tojson` that writes what Python's `json.dumps` writes, and the
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables.
use minijinja::{Environment, Error, ErrorKind, Value};
use std::collections::BTreeMap;

pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ... as tokenizer_config.json names them (transformers passes
    /// each special token's text to the template).
    special_tokens: BTreeMap<String, String>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; a syntax error is returned as its message (with the line).
    pub fn new(source: String, special_tokens: BTreeMap<String, String>) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        // jinja2's defaults in transformers: trim_blocks, lstrip_blocks, the trailing newline of
        // the source dropped (minijinja's default too).
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| e.to_string())?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| jiff::Timestamp::now().strftime(&format).to_string());
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source).map_err(|e| describe(&e))?;
        Ok(ChatTemplate { env, special_tokens })
    }

    /// The text of `messages` (a JSON list of {role, content, ...}); `add_generation_prompt`
    /// appends the header that opens the assistant's next turn. A template error (a role it
    /// rejects through `raise_exception`, a bad expression) is returned as its message.
    pub fn render(&self, messages: &serde_json::Value, add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        let mut context: BTreeMap<String, Value> =
            self.special_tokens.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        context.insert("messages".into(), Value::from(minijinja::value::Serde(messages)));
        context.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        template.render(Value::from(context)).map_err(|e| describe(&e))
    }
}

/// minijinja's message with its cause (raise_exception's text) and where in the template.
fn describe(e: &Error) -> String {
    let mut text = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !text.contains("line") {
            text = format!("{text} (chat template line {line})");
        }
    }
    text
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent)`,
/// so tool schemas render as the model saw them in training (", " and ": " separators, no HTML
/// escaping). Object keys come in sorted order (records are parsed into sorted maps).
fn tojson(value: Value, indent: Option<usize>, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(n) => Some(n),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (item_sep, key_sep) = if indent.is_some() { (",", ": ") } else { (", ", ": ") };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                out.push_str(key_sep);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let special = BTreeMap::from([("bos_token".to_string(), "<s>".to_string())]);
        ChatTemplate::new(source.into(), special).unwrap()
    }

    #[test]
    fn renders_with_python_methods_whitespace_control_and_special_tokens() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}\n{{ m.role.upper() }}: {{ m.content.strip() }}|\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}\n",
        );
        let messages =
            serde_json::json!([{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "yo"}]);
        assert_eq!(t.render(&messages, false).unwrap(), "<s>USER: hi|\nASSISTANT: yo|\n");
        assert_eq!(t.render(&messages, true).unwrap(), "<s>USER: hi|\nASSISTANT: yo|\nA:");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_messages() {
        let t = template(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with user') }}{% endif %}",
        );
        let err = t.render(&serde_json::json!([{"role": "tool", "content": ""}]), false).unwrap_err();
        assert!(err.contains("Conversations must start with user"), "{err}");
        let err = ChatTemplate::new("{% for m in messages %}".into(), BTreeMap::new()).err().unwrap();
        assert!(err.contains("line 1") || err.contains("unexpected end"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = template("{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}");
        let messages = serde_json::json!([{"a": [1, "é<"], "b": {}}]);
        // json.dumps({"a": [1, "é<"], "b": {}}, ensure_ascii=False) and with indent=2.
        let expected = "{\"a\": [1, \"é<\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    \"é<\"\n  ],\n  \"b\": {}\n}";
        assert_eq!(t.render(&messages, false).unwrap(), expected);
    }
}
