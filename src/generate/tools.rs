//! Tool calling: the formats model families write their calls in, the grammar that forces a
//! call (`tool_choice` "required" or a named function), and a parser that turns the streamed
//! text into content and tool calls without letting call markup leak into the content.
//!
//! Formats:
//! - `hermes` (Qwen 2.5/3, Hermes, and this server's fallback): `<tool_call>\n{"name": ..,
//!   "arguments": {..}}\n</tool_call>`, one block per call;
//! - `llama3_json` (Llama 3.1+): the answer is `{"name": .., "parameters": {..}}` (after an
//!   optional `<|python_tag|>`), calls separated by `;`;
//! - `mistral`: `[TOOL_CALLS]` then a JSON array of `{"name": .., "arguments": {..}}`.

use serde_json::{json, Map, Value};

use super::constraint::{with_layout, GrammarSpec};

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    Hermes,
    #[serde(rename = "llama3_json")]
    Llama3Json,
    Mistral,
}

const HERMES_START: &str = "<tool_call>";
const HERMES_END: &str = "</tool_call>";
const MISTRAL_START: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The format a chat template writes, from its text: `None` when it shows none.
    pub fn detect(template: &str) -> Option<ToolFormat> {
        if template.contains(HERMES_START) {
            Some(ToolFormat::Hermes)
        } else if template.contains(MISTRAL_START) {
            Some(ToolFormat::Mistral)
        } else if template.contains(PYTHON_TAG) || template.contains("ipython") {
            Some(ToolFormat::Llama3Json)
        } else {
            None
        }
    }

    /// The key a call's arguments are under.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3Json => "parameters",
            _ => "arguments",
        }
    }

    /// A new call id (Mistral's templates take 9 letters and digits).
    pub fn call_id(self) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        match self {
            ToolFormat::Mistral => id[..9].to_string(),
            _ => format!("call_{}", &id[..24]),
        }
    }
}

/// A function the client offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The JSON schema of its arguments (an object).
    pub parameters: Value,
}

/// The most tools one request may give.
pub const MAX_TOOLS: usize = 128;

/// The request's `tools`, checked: `[{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}]`.
pub fn parse_tools(tools: &Value) -> Result<Vec<Tool>, String> {
    let list = tools
        .as_array()
        .ok_or("'tools' is an array of {\"type\": \"function\", \"function\": {...}}")?;
    if list.is_empty() {
        return Err("'tools' is a non-empty array of functions".into());
    }
    if list.len() > MAX_TOOLS {
        return Err(format!("{} tools; at most {MAX_TOOLS}", list.len()));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t["type"] != "function" {
            return Err(format!("tools[{i}].type is \"function\""));
        }
        let f = &t["function"];
        let Some(name) = f["name"].as_str().filter(|n| !n.is_empty()) else {
            return Err(format!("tools[{i}].function.name is a non-empty string"));
        };
        if out.iter().any(|o| o.name == name) {
            return Err(format!(
                "tools[{i}]: the function name '{name}' is given twice"
            ));
        }
        let parameters = match &f["parameters"] {
            Value::Null => json!({"type": "object"}),
            p @ Value::Object(_) => p.clone(),
            _ => {
                return Err(format!(
                    "tools[{i}].function.parameters is a JSON schema object"
                ))
            }
        };
        if let Some(k) = f.as_object().and_then(|m| {
            m.keys()
                .find(|k| !matches!(k.as_str(), "name" | "description" | "parameters" | "strict"))
        }) {
            return Err(format!(
                "tools[{i}].function.{k} is not a field this server supports"
            ));
        }
        out.push(Tool {
            name: name.to_string(),
            parameters,
        });
    }
    Ok(out)
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (parsed from what it writes).
    Auto,
    /// No call: the tools are not shown to the model.
    None,
    /// At least one call, enforced by the grammar.
    Required,
    /// A call of this function, enforced by the grammar.
    Function(String),
}

/// The request's `tool_choice` over its `tools` (default: "auto" with tools, else "none").
pub fn parse_choice(choice: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, String> {
    let c = match choice {
        None | Some(Value::Null) => {
            return Ok(if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            })
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(format!(
                    "'tool_choice' is \"auto\", \"none\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ..}}}}, got \"{other}\""
                ))
            }
        },
        Some(v) => match (v["type"].as_str(), v["function"]["name"].as_str()) {
            (Some("function"), Some(name)) => ToolChoice::Function(name.to_string()),
            _ => {
                return Err(
                    "'tool_choice' is \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ..}}".into(),
                )
            }
        },
    };
    match &c {
        ToolChoice::Function(name) if !tools.iter().any(|t| &t.name == name) => Err(format!(
            "'tool_choice' names the function '{name}', which 'tools' does not give"
        )),
        ToolChoice::Required | ToolChoice::Function(_) if tools.is_empty() => {
            Err("'tool_choice' asks for a call but 'tools' gives no function".into())
        }
        _ => Ok(c),
    }
}

/// How a marker is written in a Lark grammar: a special token by its id, else its text.
fn lark_marker(text: &str, special: &dyn Fn(&str) -> Option<u32>) -> String {
    match special(text) {
        Some(id) => format!("<[{id}]>"),
        None => serde_json::to_string(text).expect("a string"),
    }
}

/// The grammar that forces a call of one of `tools` (`parallel`: one or more calls) in
/// `format`; `special` gives a marker's token id when it is one special token.
pub fn forced_grammar(
    format: ToolFormat,
    tools: &[Tool],
    parallel: bool,
    special: &dyn Fn(&str) -> Option<u32>,
) -> GrammarSpec {
    let key = format.arguments_key();
    let one: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, key: t.parameters},
                "required": ["name", key],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = if one.len() == 1 {
        one[0].clone()
    } else {
        json!({"anyOf": one})
    };
    let lark = match format {
        ToolFormat::Hermes => {
            let open = lark_marker(HERMES_START, special);
            let close = lark_marker(HERMES_END, special);
            let call = format!(
                "call: {open} \"\\n\" %json {} \"\\n\" {close}",
                with_layout(&call)
            );
            let start = if parallel {
                "start: call (\"\\n\" call)*"
            } else {
                "start: call"
            };
            format!("{start}\n{call}\n")
        }
        ToolFormat::Llama3Json => {
            let start = if parallel {
                "start: call (\"; \" call)*"
            } else {
                "start: call"
            };
            format!("{start}\ncall: %json {}\n", with_layout(&call))
        }
        ToolFormat::Mistral => {
            let mut items = json!({"type": "array", "items": call, "minItems": 1});
            if !parallel {
                items["maxItems"] = json!(1);
            }
            let open = lark_marker(MISTRAL_START, special);
            format!("start: {open} %json {}\n", with_layout(&items))
        }
    };
    GrammarSpec::Lark(lark)
}

/// The block the fallback adds to the system prompt when the chat template does not take
/// `tools` (Hermes' wording; the model answers in the hermes format).
pub fn fallback_system_prompt(tools: &Value) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools.as_array().into_iter().flatten() {
        s.push('\n');
        s.push_str(&t.to_string());
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
         <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// Messages for a template that does not take `tools`: the tools described in the system
/// message, earlier calls written as hermes blocks in the assistant's content, and tool
/// results as `<tool_response>` blocks in a user message.
pub fn fallback_messages(messages: &[Value], tools: Option<&Value>) -> Vec<Value> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let block = tools.map(fallback_system_prompt);
    let mut placed = block.is_none();
    for m in messages {
        let mut m = m.clone();
        let role = m["role"].as_str().unwrap_or_default().to_string();
        if role == "system" && !placed {
            let content = m["content"].as_str().unwrap_or_default();
            m["content"] = json!(format!("{content}\n\n{}", block.as_deref().unwrap_or("")));
            placed = true;
        } else if role == "assistant" && m["tool_calls"].is_array() {
            let mut text = m["content"].as_str().unwrap_or_default().to_string();
            for call in m["tool_calls"].as_array().into_iter().flatten() {
                let f = &call["function"];
                let args = match &f["arguments"] {
                    Value::String(s) => serde_json::from_str(s).unwrap_or(json!(s)),
                    v => v.clone(),
                };
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!(
                    "{HERMES_START}\n{}\n{HERMES_END}",
                    json!({"name": f["name"], "arguments": args})
                ));
            }
            if let Some(o) = m.as_object_mut() {
                o.remove("tool_calls");
            }
            m["content"] = json!(text);
        } else if role == "tool" {
            let content = m["content"].as_str().unwrap_or_default();
            m = json!({"role": "user", "content": format!("<tool_response>\n{content}\n</tool_response>")});
        }
        out.push(m);
    }
    if !placed {
        out.insert(
            0,
            json!({"role": "system", "content": block.unwrap_or_default()}),
        );
    }
    out
}

/// What the parser gives as text streams in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Content text.
    Text(String),
    /// A call begins: its index among the answer's calls and its function's name.
    Start { index: usize, name: String },
    /// A piece of call `index`'s arguments (a JSON text once all pieces are joined).
    Args { index: usize, text: String },
}

/// Where the parser stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Plain text (a tail that may begin a marker is held).
    Text,
    /// Inside a hermes block.
    Call {
        /// The name is sent.
        named: bool,
        /// Where the arguments begin in the block, once seen.
        args_from: Option<usize>,
        /// Bytes of the block sent as arguments.
        args_sent: usize,
    },
    /// A sequence of JSON calls (llama3_json, mistral): `at` is where the unread text begins
    /// in the buffer; `open`, the progress of the call being written.
    Seq { at: usize, open: Option<Progress> },
    /// The answer is text (llama3_json after a non-JSON start).
    Plain,
}

/// What is sent of the call being written: its name, where its arguments begin in its text,
/// and how much of its text was sent as arguments.
type Progress = (bool, Option<usize>, usize);

/// The length of the JSON object at the start of `text` (string-aware brace matching), if it
/// is complete.
fn object_end(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut in_string, mut i) = (0usize, false, 0);
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (true, b'\\') => i += 1,
            (true, b'"') => in_string = false,
            (false, b'"') => in_string = true,
            (false, b'{') | (false, b'[') => depth += 1,
            (false, b'}') | (false, b']') => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Splits an answer's text into content and tool calls as it streams.
#[derive(Debug, Clone)]
pub struct ToolParser {
    format: ToolFormat,
    /// The functions offered: a call names one of them (empty: any name).
    names: Vec<String>,
    state: State,
    buf: String,
    /// Calls started.
    calls: usize,
}

/// The longest suffix of `text` that is a proper beginning of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// A call's name and arguments (as a JSON text) from its JSON.
fn call_of(v: &Value, key: &str) -> Option<(String, String)> {
    let name = v["name"].as_str()?.to_string();
    let args = match v
        .get(key)
        .or_else(|| v.get("arguments"))
        .or_else(|| v.get("parameters"))
    {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(_) => return None,
    };
    Some((name, args))
}

impl ToolParser {
    /// A parser taking calls of any name.
    pub fn new(format: ToolFormat) -> Self {
        Self::offering(format, Vec::new())
    }

    /// A parser taking calls of the functions `names` only (what else looks like a call stays
    /// content).
    pub fn offering(format: ToolFormat, names: Vec<String>) -> Self {
        Self {
            format,
            names,
            state: State::Text,
            buf: String::new(),
            calls: 0,
        }
    }

    fn offers(&self, name: &str) -> bool {
        self.names.is_empty() || self.names.iter().any(|n| n == name)
    }

    /// Calls started so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The next piece of text.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.advance(&mut out, false);
        out
    }

    /// The end of the answer: what is held is given out.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.advance(&mut out, true);
        out
    }

    fn text(out: &mut Vec<ToolEvent>, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(ToolEvent::Text(t)) = out.last_mut() {
            t.push_str(text);
        } else {
            out.push(ToolEvent::Text(text.to_string()));
        }
    }

    fn advance(&mut self, out: &mut Vec<ToolEvent>, end: bool) {
        loop {
            match self.state.clone() {
                State::Plain => {
                    let text = std::mem::take(&mut self.buf);
                    Self::text(out, &text);
                    return;
                }
                State::Text => match self.format {
                    ToolFormat::Hermes | ToolFormat::Mistral => {
                        let marker = if self.format == ToolFormat::Hermes {
                            HERMES_START
                        } else {
                            MISTRAL_START
                        };
                        if let Some(at) = self.buf.find(marker) {
                            let before = self.buf[..at].to_string();
                            // content before a call loses the blank it ends with
                            Self::text(out, before.trim_end());
                            self.buf.drain(..at + marker.len());
                            self.state = if self.format == ToolFormat::Hermes {
                                State::Call {
                                    named: false,
                                    args_from: None,
                                    args_sent: 0,
                                }
                            } else {
                                State::Seq { at: 0, open: None }
                            };
                            continue;
                        }
                        // held: what may begin a marker, and the blanks before it (content
                        // before a call loses its trailing blanks)
                        let keep = if end {
                            0
                        } else {
                            let partial = self.buf.len() - partial_suffix(&self.buf, marker);
                            self.buf.len() - self.buf[..partial].trim_end().len()
                        };
                        let emit: String = self.buf.drain(..self.buf.len() - keep).collect();
                        Self::text(out, &emit);
                        return;
                    }
                    ToolFormat::Llama3Json => {
                        let trimmed = self.buf.trim_start();
                        if trimmed.is_empty() {
                            if end {
                                let text = std::mem::take(&mut self.buf);
                                Self::text(out, &text);
                            }
                            return;
                        }
                        if trimmed.starts_with('{') || trimmed.starts_with(PYTHON_TAG) {
                            let trimmed = trimmed.strip_prefix(PYTHON_TAG).unwrap_or(trimmed);
                            self.buf = trimmed.to_string();
                            self.state = State::Seq { at: 0, open: None };
                        } else if PYTHON_TAG.starts_with(trimmed) && !end {
                            return;
                        } else {
                            self.state = State::Plain;
                        }
                    }
                },
                State::Seq { at, open } => {
                    if self.seq(out, at, open, end) {
                        return;
                    }
                }
                State::Call {
                    named,
                    args_from,
                    args_sent,
                } => {
                    let close = self.buf.find(HERMES_END);
                    if close.is_none() && !end {
                        let body = std::mem::take(&mut self.buf);
                        let (named, args_from, args_sent) = self.stream_object(
                            out,
                            &body,
                            HERMES_END,
                            (named, args_from, args_sent),
                        );
                        self.buf = body;
                        self.state = State::Call {
                            named,
                            args_from,
                            args_sent,
                        };
                        return;
                    }
                    let body_end = close.unwrap_or(self.buf.len());
                    let body = self.buf[..body_end].to_string();
                    let rest = close.map_or(String::new(), |c| {
                        self.buf[c + HERMES_END.len()..].to_string()
                    });
                    let wrap = if close.is_some() { HERMES_END } else { "" };
                    self.close_call(
                        out,
                        &body,
                        (HERMES_START, wrap),
                        (named, args_from, args_sent),
                    );
                    self.buf = rest.trim_start_matches('\n').to_string();
                    self.state = State::Text;
                    if close.is_none() {
                        return;
                    }
                }
            }
        }
    }

    /// Steps a sequence of JSON calls (`[{..}, {..}]` after `[TOOL_CALLS]`, or `{..}; {..}`):
    /// each call streamed as it is written. Returns whether to wait for more text.
    fn seq(
        &mut self,
        out: &mut Vec<ToolEvent>,
        at: usize,
        open: Option<Progress>,
        end: bool,
    ) -> bool {
        let seps: &[char] = match self.format {
            ToolFormat::Mistral => &['[', ','],
            _ => &[';'],
        };
        let rest = &self.buf[at..];
        let skipped = rest.len()
            - rest
                .trim_start_matches(|c: char| {
                    c.is_whitespace() || (open.is_none() && seps.contains(&c))
                })
                .len();
        let at = if open.is_some() { at } else { at + skipped };
        let rest = self.buf[at..].to_string();
        if rest.is_empty() {
            if end {
                self.state = State::Plain;
            } else {
                self.state = State::Seq { at, open };
            }
            return true;
        }
        if !rest.starts_with('{') {
            // the end of the calls (`]`), or text that is not one
            let text = rest.strip_prefix(']').unwrap_or(&rest).to_string();
            if self.calls == 0 && at == skipped {
                // nothing was a call: the text as written
                let prefix = if self.format == ToolFormat::Mistral {
                    MISTRAL_START
                } else {
                    ""
                };
                let whole = std::mem::take(&mut self.buf);
                Self::text(out, &format!("{prefix}{whole}"));
            } else {
                Self::text(out, text.trim_start());
                self.buf.clear();
            }
            self.state = State::Plain;
            return true;
        }
        match object_end(&rest) {
            Some(len) => {
                let body = &rest[..len];
                self.close_call(out, body, ("", ""), open.unwrap_or((false, None, 0)));
                self.state = State::Seq {
                    at: at + len,
                    open: None,
                };
                false
            }
            None if end => {
                self.close_call(out, &rest, ("", ""), open.unwrap_or((false, None, 0)));
                self.buf.clear();
                self.state = State::Plain;
                true
            }
            None => {
                let progress = self.stream_object(out, &rest, "", open.unwrap_or((false, None, 0)));
                self.state = State::Seq {
                    at,
                    open: Some(progress),
                };
                true
            }
        }
    }

    /// Sends what is known of a call being written (`body`, its text so far): its name once
    /// seen, then its arguments' text as it comes, holding back what may be the object's
    /// closing brace (and a partial `marker` after it).
    fn stream_object(
        &mut self,
        out: &mut Vec<ToolEvent>,
        body: &str,
        marker: &str,
        (named, args_from, args_sent): Progress,
    ) -> Progress {
        let (mut named, mut args_from, mut args_sent) = (named, args_from, args_sent);
        if !named {
            let Some((name, after)) = leading_name(body).filter(|(n, _)| self.offers(n)) else {
                return (named, args_from, args_sent);
            };
            out.push(ToolEvent::Start {
                index: self.calls,
                name,
            });
            self.calls += 1;
            named = true;
            args_from = arguments_start(&body[after..]).map(|a| after + a);
            args_sent = args_from.unwrap_or(0);
        } else if args_from.is_none() {
            // the name came; the arguments' key may follow
            if let Some((_, after)) = leading_name(body) {
                args_from = arguments_start(&body[after..]).map(|a| after + a);
                args_sent = args_from.unwrap_or(0);
            }
        }
        if args_from.is_some() {
            // hold back: a partial closing marker, blanks, the object's closing brace, blanks
            let mut safe = body.len()
                - if marker.is_empty() {
                    0
                } else {
                    partial_suffix(body, marker)
                };
            safe = body[..safe].trim_end().len();
            if body[..safe].ends_with('}') {
                safe -= 1;
            }
            safe = body[..safe].trim_end().len();
            if safe > args_sent {
                out.push(ToolEvent::Args {
                    index: self.calls - 1,
                    text: body[args_sent..safe].to_string(),
                });
                args_sent = safe;
            }
        }
        (named, args_from, args_sent)
    }

    /// A call's text ends (`body`: the object, or a hermes block's text between the markers);
    /// `wrap`: what surrounds it, given back with it when it is not a call.
    fn close_call(
        &mut self,
        out: &mut Vec<ToolEvent>,
        body: &str,
        wrap: (&str, &str),
        (named, args_from, args_sent): Progress,
    ) {
        let parsed = serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| call_of(&v, "arguments"))
            .filter(|(name, _)| named || self.offers(name));
        // the arguments not begun: where they are written, if they are
        let (args_from, args_sent) = match args_from {
            Some(from) => (Some(from), args_sent),
            None => {
                let from = leading_name(body)
                    .and_then(|(_, after)| arguments_start(&body[after..]).map(|a| after + a));
                (from, from.unwrap_or(0))
            }
        };
        match (parsed, named) {
            (Some((name, args)), false) => {
                let index = self.calls;
                self.calls += 1;
                out.push(ToolEvent::Start { index, name });
                // the arguments as written when they are (as a stream sends them), else as
                // parsed
                let raw = leading_name(body)
                    .and_then(|(_, after)| arguments_start(&body[after..]).map(|a| after + a))
                    .map(|from| {
                        let raw = body[from..].trim_end();
                        raw.strip_suffix('}').unwrap_or(raw).trim_end()
                    })
                    .filter(|raw| serde_json::from_str::<Value>(raw).is_ok_and(|v| v.is_object()));
                let text = raw.map_or(args, str::to_string);
                out.push(ToolEvent::Args { index, text });
            }
            (Some((_, args)), true) => {
                let index = self.calls - 1;
                match args_from {
                    // the rest of the arguments' text as written
                    Some(from) => rest_of_args(out, index, body, from, args_sent),
                    None => out.push(ToolEvent::Args { index, text: args }),
                }
            }
            (None, false) => {
                // not a call after all: the text as written
                Self::text(out, &format!("{}{body}{}", wrap.0, wrap.1));
            }
            (None, true) => {
                // a broken call whose name was sent: its arguments' text as written
                let index = self.calls - 1;
                if let Some(from) = args_from {
                    rest_of_args(out, index, body, from, args_sent);
                }
            }
        }
    }
}

/// `{"name": "<name>"` at the start of a block (blanks allowed): the name and where it ends.
fn leading_name(text: &str) -> Option<(String, usize)> {
    let t2 = text.trim_start().strip_prefix('{')?.trim_start();
    let t3 = t2.strip_prefix("\"name\"")?.trim_start();
    let t4 = t3.strip_prefix(':')?.trim_start();
    let start = text.len() - t4.len();
    if !t4.starts_with('"') {
        return None;
    }
    // the string's end: a quote not escaped
    let bytes = t4.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => {
                let name: String = serde_json::from_str(&t4[..=i]).ok()?;
                return Some((name, start + i + 1));
            }
            _ => i += 1,
        }
    }
    None
}

/// `, "arguments": ` (or "parameters") at the start of `text`: where the value begins.
fn arguments_start(text: &str) -> Option<usize> {
    let t = text.trim_start().strip_prefix(',')?.trim_start();
    let t = t
        .strip_prefix("\"arguments\"")
        .or_else(|| t.strip_prefix("\"parameters\""))?
        .trim_start();
    let t = t.strip_prefix(':')?.trim_start();
    if t.is_empty() {
        return None;
    }
    Some(text.len() - t.len())
}

/// Call `index`'s arguments as written in `body` from `from` (the closing brace of the call
/// object left out), less the `args_sent` bytes already sent.
fn rest_of_args(out: &mut Vec<ToolEvent>, index: usize, body: &str, from: usize, args_sent: usize) {
    let raw = body[from..].trim_end();
    let raw = raw.strip_suffix('}').unwrap_or(raw).trim_end();
    if args_sent < from + raw.len() {
        out.push(ToolEvent::Args {
            index,
            text: body[args_sent.max(from)..from + raw.len()].to_string(),
        });
    }
}

/// A whole answer split into content and calls (name, arguments).
pub fn parse_all(format: ToolFormat, text: &str) -> (String, Vec<(String, String)>) {
    split_answer(ToolParser::new(format), text)
}

/// A whole answer split by `parser` into content and calls (name, arguments).
pub fn split_answer(mut parser: ToolParser, text: &str) -> (String, Vec<(String, String)>) {
    let mut events = parser.push(text);
    events.extend(parser.finish());
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Text(t) => content.push_str(&t),
            ToolEvent::Start { name, .. } => calls.push((name, String::new())),
            ToolEvent::Args { index, text } => {
                if let Some(c) = calls.get_mut(index) {
                    c.1.push_str(&text);
                }
            }
        }
    }
    (content, calls)
}

/// Checks the names of the given functions (a call names one the request offered).
pub fn offered(tools: &[Tool], name: &str) -> bool {
    tools.iter().any(|t| t.name == name)
}

/// An OpenAI `tool_calls` entry.
pub fn call_json(id: &str, name: &str, arguments: &str) -> Value {
    let mut f = Map::new();
    f.insert("name".into(), json!(name));
    f.insert("arguments".into(), json!(arguments));
    json!({"id": id, "type": "function", "function": f})
}

#[cfg(test)]
mod tests;
