//! Chat templates: a checkpoint's Jinja template, compiled once with minijinja and rendered over
//! OpenAI chat `messages` into the prompt text, as transformers' `apply_chat_template` renders
//! it (the same Jinja settings and the same extra functions: `raise_exception`, `strftime_now`,
//! a `tojson` that writes what Python's `json.dumps` writes, Python's string and dict methods).

use std::fmt::Write as _;
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

/// The name the template has in its environment (it shows in render errors: `(in chat:3)`).
const NAME: &str = "chat";

/// What separates the text parts of one message's content when they are joined (as vLLM joins
/// them).
const PART_SEPARATOR: &str = "\n";

/// A checkpoint's chat template, compiled, with the special tokens it may print.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's text (what it shows of tools).
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// Why messages could not be rendered into a prompt: a client's error (a 400), with a message
/// that names it.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A message the template cannot be given: not an object, or content that is neither a
    /// string nor text parts.
    #[error("messages[{index}]: {reason}")]
    Message { index: usize, reason: String },
    /// The template refused the messages itself, with `raise_exception(message)`.
    #[error("the chat template rejected the messages: {0}")]
    Raised(String),
    /// Rendering failed (an undefined method, a type error, ...).
    #[error("the chat template failed to render: {0}")]
    Render(String),
}

/// The error `raise_exception` returns, kept as the source of minijinja's error so that a
/// render failure can tell it from the template's own mistakes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

impl ChatTemplate {
    /// From a checkpoint folder: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of `{name, template}`: the one named "default"),
    /// with `bos_token` / `eos_token` (a string or an AddedToken object `{content: ..}`) from
    /// tokenizer_config.json. `Ok(None)` when the checkpoint has no template; `Err` when one is
    /// present but cannot be read or does not compile.
    pub fn from_checkpoint(dir: &Path) -> Result<Option<ChatTemplate>, String> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| format!("{}: {e}", config_path.display()))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| format!("{}: {e}", config_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            std::fs::read_to_string(&jinja).map_err(|e| format!("{}: {e}", jinja.display()))?
        } else {
            match config.get("chat_template") {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(named)) => default_template(named)
                    .map_err(|e| format!("{}: chat_template {e}", config_path.display()))?,
                Some(_) => {
                    return Err(format!(
                        "{}: chat_template is neither a string nor a list of {{name, template}}",
                        config_path.display()
                    ))
                }
            }
        };
        let token = |key: &str| match config.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(added) => added.get("content")?.as_str().map(str::to_owned),
            _ => None,
        };
        ChatTemplate::new(source, token("bos_token"), token("eos_token")).map(Some)
    }

    /// Compiles `source` (Jinja, as transformers renders it: `trim_blocks`, `lstrip_blocks`,
    /// loop controls); the special tokens are given to the template when known.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| format!("chat template syntax: {e}"))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template takes `tools` (else the server describes them itself).
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders OpenAI chat `messages` (objects with a role and a content that is a string or an
    /// array of `{"type": "text", "text": ..}` parts, joined with a newline; any other part is
    /// refused) with `add_generation_prompt`, and `tools` as the template's `tools` (`none`
    /// when not given, as transformers passes it). Returns the prompt text.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let messages = messages
            .iter()
            .enumerate()
            .map(|(index, m)| {
                text_message(m).map_err(|reason| TemplateError::Message { index, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut context = vec![
            ("messages", Value::from(Serde(&messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            (
                "tools",
                tools.map_or(Value::from(()), |t| Value::from(Serde(t))),
            ),
            // as transformers passes it (retrieval templates test `documents is not none`)
            ("documents", Value::from(())),
        ];
        // an unknown token is left undefined (it prints as nothing), as transformers leaves it
        for (name, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(token) = token {
                context.push((name, Value::from(token.as_str())));
            }
        }
        let template = self
            .env
            .get_template(NAME)
            .expect("bug: the chat template is added when the environment is built");
        template
            .render(Value::from_pairs(context))
            .map_err(render_error)
    }
}

/// The template named "default" of a list of `{name, template}`.
fn default_template(named: &[serde_json::Value]) -> Result<String, String> {
    let name = |t: &serde_json::Value| t.get("name").and_then(|n| n.as_str()).map(str::to_owned);
    named
        .iter()
        .find(|t| name(t).as_deref() == Some("default"))
        .and_then(|t| t.get("template")?.as_str().map(str::to_owned))
        .ok_or_else(|| {
            let names: Vec<String> = named.iter().filter_map(name).collect();
            format!("lists templates {names:?} and none is named \"default\" with a template")
        })
}

/// The message with its content as one string: text parts joined, any other part refused.
fn text_message(message: &serde_json::Value) -> Result<serde_json::Value, String> {
    let serde_json::Value::Object(fields) = message else {
        return Err("a message is an object with a role and a content".to_string());
    };
    let mut fields = fields.clone();
    if let Some(content) = fields.get_mut("content") {
        match content {
            serde_json::Value::String(_) | serde_json::Value::Null => {}
            serde_json::Value::Array(parts) => {
                let texts = parts
                    .iter()
                    .enumerate()
                    .map(|(i, part)| part_text(part).map_err(|e| format!("content[{i}]: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                *content = serde_json::Value::String(texts.join(PART_SEPARATOR));
            }
            _ => return Err("content is a string or an array of content parts".to_string()),
        }
    }
    Ok(serde_json::Value::Object(fields))
}

/// The text of a `{"type": "text", "text": ..}` content part.
fn part_text(part: &serde_json::Value) -> Result<&str, String> {
    match part.get("type").and_then(|t| t.as_str()) {
        Some("text") => part
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| "a text part needs a string \"text\"".to_string()),
        Some(other) => Err(format!(
            "part type \"{other}\" is not supported (only \"text\")"
        )),
        None => Err("a content part needs a \"type\"".to_string()),
    }
}

fn render_error(e: Error) -> TemplateError {
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(Raised(message)) = s.downcast_ref::<Raised>() {
            return TemplateError::Raised(message.clone());
        }
        source = s.source();
    }
    TemplateError::Render(e.to_string())
}

/// `raise_exception(message)`: templates refuse messages they cannot take (roles that do not
/// alternate, a system message where none is allowed).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// `strftime_now(format)`: the local time now, formatted as Python's `strftime` formats it
/// (Llama 3's templates print today's date).
fn strftime_now(format: String) -> Result<String, Error> {
    jiff::fmt::strtime::format(&format, &jiff::ZonedDateTime::now()).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now({format:?}): {e}"),
        )
    })
}

/// The `tojson` filter as transformers defines it: Python's `json.dumps(value,
/// ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, not HTML-escaped as
/// Jinja's own is. Keyword arguments `indent`, `separators`, `sort_keys`, `ensure_ascii`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(i64::try_from(v)?.max(0)).unwrap_or(0)),
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let pair: Vec<String> = v
                .try_iter()?
                .map(|s| s.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators is a pair of strings",
                    )
                })?;
            let [item, key] = <[String; 2]>::try_from(pair).expect("checked: two strings");
            (item, key)
        }
        // json.dumps: ", " on one line, "," before a newline
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let json = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    json.write(value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` options.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, value: &Value, level: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&number(value)?),
            ValueKind::String => self.string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(out, level, '[', ']', &items, |item, level, out| {
                    self.write(item, level, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((self.key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(out, level, '{', '}', &entries, |(key, item), level, out| {
                    self.string(key, out);
                    out.push_str(&self.key_sep);
                    self.write(item, level, out)
                })?;
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// `[...]` or `{...}`: on one line, or one item a line when indenting (empty: `[]`, `{}`).
    fn container<T>(
        &self,
        out: &mut String,
        level: usize,
        open: char,
        close: char,
        items: &[T],
        mut write_item: impl FnMut(&T, usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(level + 1));
            }
            write_item(item, level + 1, out)?;
        }
        if let (Some(indent), false) = (&self.indent, items.is_empty()) {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
        out.push(close);
        Ok(())
    }

    /// A key as Python writes it: strings as they are, numbers, booleans and None as text.
    fn key(&self, key: &Value) -> Result<String, Error> {
        Ok(match key.kind() {
            ValueKind::String => key.as_str().unwrap_or_default().to_string(),
            ValueKind::None => "null".to_string(),
            ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
            ValueKind::Number => number(key)?,
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
                ))
            }
        })
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c < ' ' || (self.ensure_ascii && c > '~') => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A number as Python's `json.dumps` writes it: integers as they are, floats as `repr` does
/// (shortest round trip; an exponent below 1e-4 and from 1e16), NaN and infinities by name.
fn number(value: &Value) -> Result<String, Error> {
    if value.is_integer() {
        return Ok(value.to_string());
    }
    let f = f64::try_from(value.clone())?;
    if f.is_nan() {
        return Ok("NaN".to_string());
    }
    if f.is_infinite() {
        return Ok((if f > 0.0 { "Infinity" } else { "-Infinity" }).to_string());
    }
    let shortest = format!("{f:e}");
    let (mantissa, exponent) = shortest
        .split_once('e')
        .expect("bug: {:e} writes an exponent");
    let exponent: i32 = exponent
        .parse()
        .expect("bug: {:e} writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    Ok(match exponent {
        0..=15 => {
            let whole = exponent as usize + 1;
            if digits.len() <= whole {
                format!("{sign}{digits}{}.0", "0".repeat(whole - digits.len()))
            } else {
                format!("{sign}{}.{}", &digits[..whole], &digits[whole..])
            }
        }
        -4..=-1 => format!("{sign}0.{}{digits}", "0".repeat((-exponent - 1) as usize)),
        _ => {
            let (first, rest) = digits.split_at(1);
            let dot = if rest.is_empty() { "" } else { "." };
            let esign = if exponent < 0 { '-' } else { '+' };
            format!("{sign}{first}{dot}{rest}e{esign}{:02}", exponent.abs())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    /// The fixtures folder: `AIAAS_LLM_FIXTURES`, else `.fixtures/llm` (as tests/decoder.rs).
    fn fixtures() -> PathBuf {
        let dir = std::env::var_os("AIAAS_LLM_FIXTURES").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join(".fixtures/llm"),
            PathBuf::from,
        );
        assert!(
            dir.join("smollm2-135m-instruct/reference.json").is_file(),
            "LLM fixtures missing in {}: run `make llm-fixtures`",
            dir.display()
        );
        dir
    }

    /// A fresh empty folder for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("aiaas-template-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.to_string(), Some("<s>".into()), Some("</s>".into())).unwrap()
    }

    /// Every fixture checkpoint's "chat" prompt, rendered from its messages and tokenized as
    /// apply_chat_template tokenizes it (no special tokens added), gives transformers' ids.
    #[test]
    fn fixture_templates_give_transformers_prompt_ids() {
        let root = fixtures();
        let mut checked = Vec::new();
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|d| d.join("reference.json").is_file())
            .collect();
        dirs.sort();
        for dir in dirs {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            let reference: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                    .unwrap();
            let chat = reference["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "chat")
                .unwrap();
            let template = ChatTemplate::from_checkpoint(&dir)
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: no chat template found"));
            let text = template
                .render(chat["messages"].as_array().unwrap(), true, None)
                .unwrap();
            assert_eq!(
                text,
                chat["text"].as_str().unwrap(),
                "{name}: rendered text"
            );
            let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
            let ids = tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            let want: Vec<u32> = serde_json::from_value(chat["input_ids"].clone()).unwrap();
            assert_eq!(ids, want, "{name}: prompt ids");
            let source = if dir.join("chat_template.jinja").is_file() {
                "chat_template.jinja"
            } else {
                "tokenizer_config.json"
            };
            checked.push(format!("{name} ({source})"));
        }
        // the families the brief names, with the template in each of its two places
        for want in [
            "smollm2-135m-instruct (chat_template.jinja)",
            "mistral (tokenizer_config.json)",
            "qwen2 (tokenizer_config.json)",
            "qwen3 (chat_template.jinja)",
        ] {
            assert!(
                checked.iter().any(|c| c == want),
                "{want} not checked: {checked:?}"
            );
        }
    }

    const PYTHON_LIKE: &str = r#"{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0]['role'] == 'system' %}
    {{- messages[0]['content'].strip() }}
{%- else %}
    {{- 'You are helpful.' }}
{%- endif %}
{{- "\n\n# Tools\n<tools>" }}
{%- for tool in tools %}
    {{- "\n" }}
    {{- tool | tojson }}
{%- endfor %}
{{- "\n</tools><|im_end|>\n" }}
{%- endif %}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message.role == 'system' and tools %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    <|{{ message.role.upper() }}|>{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
{{ ns.n }} {{ bos_token }}|{{ 'a,b'.split(',') | join('+') }}
{{ {'k': [1, 2.5, none, true, 1e-05, 1e16, 123.25], 'é': 'a"b\n\t\\<>&'} | tojson(indent=2) }}
{{ {'z': 1, 'a': {}} | tojson(sort_keys=true, separators=(',', ':')) }}
{{ [] | tojson(indent=4) }} {{ 'ü' | tojson(ensure_ascii=true) }}
{{ messages[2].content | tojson }} {{ strftime_now('%Y') | length }}
"#;

    // What transformers 5.24 (jinja2, its own environment and functions) renders from
    // PYTHON_LIKE for the messages below.
    const WITH_TOOLS: &str = "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n{\"function\": {\"description\": \"Weather\", \"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"], \"type\": \"object\"}}, \"type\": \"function\"}\n</tools><|im_end|>\n    <|USER|>Hi</s>\n    <|ASSISTANT|>Hello\u{1} ☃</s>\n<|assistant|>\n2 |a+b\n{\n  \"k\": [\n    1,\n    2.5,\n    null,\n    true,\n    1e-05,\n    1e+16,\n    123.25\n  ],\n  \"é\": \"a\\\"b\\n\\t\\\\<>&\"\n}\n{\"a\":{},\"z\":1}\n[] \"\\u00fc\"\n\"Hello\\u0001 ☃\" 4";
    const WITHOUT_TOOLS: &str = "    <|SYSTEM|>Be brief.</s>\n    <|USER|>Hi</s>\n    <|ASSISTANT|>Hello\u{1} ☃</s>\n3 <s>|a+b\n{\n  \"k\": [\n    1,\n    2.5,\n    null,\n    true,\n    1e-05,\n    1e+16,\n    123.25\n  ],\n  \"é\": \"a\\\"b\\n\\t\\\\<>&\"\n}\n{\"a\":{},\"z\":1}\n[] \"\\u00fc\"\n\"Hello\\u0001 ☃\" 4";

    /// Jinja as transformers configures it (trim_blocks, lstrip_blocks, loop controls,
    /// namespace), Python's string methods, and tojson as Python's json.dumps writes it.
    #[test]
    fn renders_what_transformers_renders() {
        let messages = [
            json!({"role": "system", "content": "  Be brief.  "}),
            json!({"role": "user", "content": " Hi "}),
            json!({"role": "assistant", "content": "Hello\u{1} ☃"}),
        ];
        let tools = json!([{"function": {"description": "Weather", "name": "get_weather",
            "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"],
            "type": "object"}}, "type": "function"}]);
        let eos_only =
            ChatTemplate::new(PYTHON_LIKE.to_string(), None, Some("</s>".into())).unwrap();
        assert_eq!(
            eos_only.render(&messages, true, Some(&tools)).unwrap(),
            WITH_TOOLS
        );
        assert_eq!(
            template(PYTHON_LIKE)
                .render(&messages, false, None)
                .unwrap(),
            WITHOUT_TOOLS
        );
    }

    #[test]
    fn raise_exception_is_an_error_carrying_its_message() {
        let t = template(
            "{% for m in messages %}{% if m.role == 'system' %}\
             {{ raise_exception('System role not supported') }}{% endif %}{% endfor %}ok",
        );
        assert_eq!(
            t.render(&[json!({"role": "user", "content": "x"})], true, None)
                .unwrap(),
            "ok"
        );
        let err = t
            .render(&[json!({"role": "system", "content": "x"})], true, None)
            .unwrap_err();
        assert!(
            matches!(&err, TemplateError::Raised(m) if m == "System role not supported"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("System role not supported"),
            "{err}"
        );
    }

    #[test]
    fn a_render_failure_names_the_template_error() {
        let t = template("{{ messages[0].content.no_such_method() }}");
        let err = t
            .render(&[json!({"role": "user", "content": "x"})], true, None)
            .unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err:?}");
        assert!(err.to_string().contains("no_such_method"), "{err}");
    }

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let t = template("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}");
        let parts = json!({"role": "user", "content": [
            {"type": "text", "text": "first"}, {"type": "text", "text": "second"}]});
        let plain = json!({"role": "assistant", "content": "plain"});
        assert_eq!(
            t.render(&[parts.clone(), plain], false, None).unwrap(),
            "[user:first\nsecond][assistant:plain]"
        );
        let image = json!({"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]});
        let err = t.render(&[parts, image], false, None).unwrap_err();
        assert!(
            matches!(err, TemplateError::Message { index: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"image_url\""), "{err}");
        for bad in [json!("text"), json!({"role": "user", "content": 3})] {
            let err = t.render(&[bad], false, None).unwrap_err();
            assert!(
                matches!(err, TemplateError::Message { index: 0, .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn tools_are_none_unless_given() {
        // booleans print as Python prints them, as in jinja2
        let t = template("{{ tools is none }} {{ tools | length if tools is not none }}");
        assert_eq!(t.render(&[], false, None).unwrap(), "True ");
        assert_eq!(
            t.render(&[], false, Some(&json!([{}, {}]))).unwrap(),
            "False 2"
        );
    }

    #[test]
    fn no_template_is_none() {
        let empty = scratch("empty");
        assert!(ChatTemplate::from_checkpoint(&empty).unwrap().is_none());
        let config_only = scratch("config-only");
        std::fs::write(
            config_only.join("tokenizer_config.json"),
            r#"{"bos_token": "<s>"}"#,
        )
        .unwrap();
        assert!(ChatTemplate::from_checkpoint(&config_only)
            .unwrap()
            .is_none());
        let null = scratch("null");
        std::fs::write(
            null.join("tokenizer_config.json"),
            r#"{"chat_template": null}"#,
        )
        .unwrap();
        assert!(ChatTemplate::from_checkpoint(&null).unwrap().is_none());
        for dir in [empty, config_only, null] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn named_templates_and_added_token_objects() {
        let dir = scratch("named");
        let config = json!({
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"},
            ],
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::from_checkpoint(&dir).unwrap().unwrap();
        assert_eq!(
            t.render(&[json!({"role": "user", "content": "hi"})], false, None)
                .unwrap(),
            "<s>hi</s>"
        );
        // chat_template.jinja comes first
        std::fs::write(dir.join("chat_template.jinja"), "jinja {{ eos_token }}").unwrap();
        let t = ChatTemplate::from_checkpoint(&dir).unwrap().unwrap();
        assert_eq!(t.render(&[], false, None).unwrap(), "jinja </s>");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_present_template_that_cannot_be_used_is_an_error() {
        let dir = scratch("broken");
        std::fs::write(
            dir.join("chat_template.jinja"),
            "{% for m in messages %}unclosed",
        )
        .unwrap();
        let err = ChatTemplate::from_checkpoint(&dir).unwrap_err();
        assert!(err.contains("does not compile"), "{err}");
        std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
        let config = json!({"chat_template": [{"name": "tool_use", "template": "x"}]});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let err = ChatTemplate::from_checkpoint(&dir).unwrap_err();
        assert!(err.contains("tool_use") && err.contains("default"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn floats_are_written_as_python_writes_them() {
        for (f, python) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-4, "0.0001"),
            (1.5e-5, "1.5e-05"),
            (123456789012345.6, "123456789012345.6"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.25e100, "1.25e+100"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(number(&Value::from(f)).unwrap(), python, "{f:e}");
        }
    }
}
