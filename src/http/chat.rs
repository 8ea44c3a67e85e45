//! `POST /v1/chat/completions` and `POST /v1/completions`: OpenAI's generation APIs, served by
//! `text-generation` models, with streaming as Server-Sent Events.
//!
//! Request and answer shapes are OpenAI's. Every parameter a request gives is either honoured
//! or refused with a 400 naming it (never ignored, never clamped): the accepted ones are listed
//! in [`COMMON_PARAMS`], [`CHAT_PARAMS`] and [`COMPLETION_PARAMS`]. A stream is `data: {chunk}` events and
//! `data: [DONE]`; with `stream_options.include_usage`, every chunk carries `"usage": null` and
//! a last chunk with no choices carries the counts. A client that leaves ends its sequences
//! within a step (their receivers drop); a client that stops reading pauses them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::inference::{
    blocking_if_large, client_timeout, count_outcome, generation_deadline, take_model,
};
use super::middleware::Streaming;
use super::openai::OpenAiError;
use super::v1::body_error;
use super::{ApiError, AppState};
use crate::codec::instance::json_type;
use crate::registry::generate::{
    call_json, forced_grammar, parse_choice, parse_tools, split_answer, Event, Finish,
    GenerateError, GenerateParams, Generator, GrammarError, GrammarSpec, ParamError, SequenceError,
    SubmitError, TokenInfo, Tool, ToolChoice, ToolEvent, ToolFormat, ToolParser, MAX_TOP_LOGPROBS,
};
use crate::registry::ModelLease;

/// The parameters both routes accept.
const COMMON_PARAMS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "n",
    "logprobs",
    "stream",
    "stream_options",
    "user",
    "ignore_eos",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
];

/// The parameters only `/v1/chat/completions` accepts.
pub const CHAT_PARAMS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// The parameters only `/v1/completions` accepts.
pub const COMPLETION_PARAMS: &[&str] = &["prompt", "echo"];

/// Prompts one completions request may give.
const MAX_PROMPTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completions,
}

impl Api {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completions, _) => "text_completion",
        }
    }

    fn prompt_param(self) -> &'static str {
        match self {
            Api::Chat => "messages",
            Api::Completions => "prompt",
        }
    }
}

/// An invalid value of parameter `param`: 400, as OpenAI answers it.
fn invalid(param: &'static str, message: impl Into<String>) -> OpenAiError {
    OpenAiError::on(param, ApiError::BadRequest(message.into()))
}

impl From<ParamError> for OpenAiError {
    fn from(e: ParamError) -> Self {
        invalid(e.param, e.to_string())
    }
}

fn generate_error(e: GenerateError, api: Api) -> OpenAiError {
    let message = e.to_string();
    match e {
        GenerateError::Param(p) => p.into(),
        GenerateError::ContextLength { .. } => invalid("max_tokens", message),
        GenerateError::PromptTooLong { .. } => invalid(api.prompt_param(), message),
        GenerateError::Template(_) | GenerateError::NoTemplate => {
            OpenAiError::on("messages", ApiError::BadRequest(message))
        }
        GenerateError::EmptyPrompt | GenerateError::Tokenize(_) => {
            invalid(api.prompt_param(), message)
        }
        GenerateError::Submit(SubmitError::QueueFull { .. }) => {
            ApiError::Overloaded(message).into()
        }
        GenerateError::Submit(SubmitError::Closed) => ApiError::ModelNotReady(message).into(),
    }
}

fn sequence_error(e: SequenceError) -> ApiError {
    match e {
        SequenceError::TimedOut { .. } => ApiError::Timeout(e.to_string()),
        SequenceError::Model(_) | SequenceError::Grammar(_) => ApiError::Internal(e.to_string()),
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    generate(state, headers, body, Api::Chat).await
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    generate(state, headers, body, Api::Completions).await
}

/// What a request asked for besides its prompt.
struct Asked {
    params: GenerateParams,
    stream: bool,
    include_usage: bool,
    echo: bool,
    /// The grammar the answer follows, and the parameter that gave it.
    grammar: Option<(&'static str, GrammarSpec)>,
    /// Tools offered (chat).
    tools: Option<Tools>,
}

/// A chat request's tools.
struct Tools {
    /// As the request gave them (for the template).
    json: Value,
    list: Vec<Tool>,
    choice: ToolChoice,
    parallel: bool,
}

/// The grammar a request asks for: `response_format`, vLLM's `guided_*` parameters or its
/// `structured_outputs` object (one of them).
fn grammar_asked(
    map: &Map<String, Value>,
) -> Result<Option<(&'static str, GrammarSpec)>, OpenAiError> {
    let mut found: Vec<(&'static str, GrammarSpec)> = Vec::new();
    let schema_of = |param: &'static str, v: &Value| -> Result<GrammarSpec, OpenAiError> {
        match v {
            Value::Object(_) | Value::Bool(true) => Ok(GrammarSpec::JsonSchema(v.clone())),
            // vLLM takes the schema as JSON text too
            Value::String(text) => match serde_json::from_str::<Value>(text) {
                Ok(v @ Value::Object(_)) => Ok(GrammarSpec::JsonSchema(v)),
                _ => Err(invalid(
                    param,
                    format!("'{param}' is a JSON schema (an object, or its JSON text)"),
                )),
            },
            _ => Err(invalid(
                param,
                format!("'{param}' is a JSON schema (an object, or its JSON text)"),
            )),
        }
    };
    let string_of = |param: &'static str, v: &Value| -> Result<String, OpenAiError> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| invalid(param, format!("'{param}' is a string")))
    };
    let choice_of = |param: &'static str, v: &Value| -> Result<GrammarSpec, OpenAiError> {
        let list: Option<Vec<String>> = v
            .as_array()
            .map(|l| l.iter().map(|c| c.as_str().map(str::to_string)).collect())
            .unwrap_or(None);
        match list {
            Some(l) if !l.is_empty() => Ok(GrammarSpec::Choice(l)),
            _ => Err(invalid(
                param,
                format!("'{param}' is a non-empty array of strings"),
            )),
        }
    };
    match map.get("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::Object(rf)) => {
            let shape = "'response_format' is {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"?, \"description\"?}}";
            match rf.get("type").and_then(Value::as_str) {
                Some("text") if rf.len() == 1 => {}
                Some("json_object") if rf.len() == 1 => {
                    found.push(("response_format", GrammarSpec::JsonObject))
                }
                Some("json_schema") => {
                    if let Some(k) = rf
                        .keys()
                        .find(|k| !matches!(k.as_str(), "type" | "json_schema"))
                    {
                        return Err(invalid(
                            "response_format",
                            format!(
                                "response_format.{k} is not a field this server supports; {shape}"
                            ),
                        ));
                    }
                    let Some(Value::Object(js)) = rf.get("json_schema") else {
                        return Err(invalid("response_format", shape));
                    };
                    if let Some(k) = js.keys().find(|k| {
                        !matches!(k.as_str(), "name" | "schema" | "strict" | "description")
                    }) {
                        return Err(invalid("response_format", format!("response_format.json_schema.{k} is not a field this server supports")));
                    }
                    let Some(schema) = js.get("schema") else {
                        return Err(invalid("response_format", "response_format.json_schema.schema is required: the JSON schema the answer follows"));
                    };
                    found.push(("response_format", schema_of("response_format", schema)?));
                }
                _ => return Err(invalid("response_format", shape)),
            }
        }
        Some(_) => return Err(invalid("response_format", "'response_format' is an object")),
    }
    for param in [
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    ] {
        let Some(v) = map.get(param).filter(|v| !v.is_null()) else {
            continue;
        };
        let spec = match param {
            "guided_json" => schema_of(param, v)?,
            "guided_regex" => GrammarSpec::Regex(string_of(param, v)?),
            "guided_choice" => choice_of(param, v)?,
            _ => GrammarSpec::Lark(string_of(param, v)?),
        };
        found.push((param, spec));
    }
    match map.get("structured_outputs") {
        None | Some(Value::Null) => {}
        Some(Value::Object(so)) => {
            let param = "structured_outputs";
            for (k, v) in so {
                if v.is_null() {
                    continue;
                }
                let spec = match k.as_str() {
                    "json" => schema_of(param, v)?,
                    "regex" => GrammarSpec::Regex(string_of(param, v)?),
                    "choice" => choice_of(param, v)?,
                    "grammar" => GrammarSpec::Lark(string_of(param, v)?),
                    "json_object" if v == &Value::Bool(true) => GrammarSpec::JsonObject,
                    "json_object" if v == &Value::Bool(false) => continue,
                    _ => {
                        return Err(invalid(param, format!(
                            "structured_outputs.{k} is not supported here; structured_outputs takes one of json, regex, choice, grammar (Lark) and json_object"
                        )))
                    }
                };
                found.push((param, spec));
            }
        }
        Some(_) => {
            return Err(invalid(
                "structured_outputs",
                "'structured_outputs' is an object",
            ))
        }
    }
    if found.len() > 1 {
        return Err(invalid(found[1].0, "give one constraint: response_format, one guided_* parameter or one structured_outputs field"));
    }
    Ok(found.pop())
}

/// A chat request's `tools`, `tool_choice` and `parallel_tool_calls`.
fn tools_asked(map: &Map<String, Value>) -> Result<Option<Tools>, OpenAiError> {
    let parallel = field::<bool>(map, "parallel_tool_calls", "true or false")?;
    let tools = match map.get("tools") {
        None | Some(Value::Null) => None,
        Some(t) => Some(t),
    };
    let list = match tools {
        Some(t) => parse_tools(t).map_err(|e| invalid("tools", e))?,
        None => Vec::new(),
    };
    let choice =
        parse_choice(map.get("tool_choice"), &list).map_err(|e| invalid("tool_choice", e))?;
    if tools.is_none() {
        if parallel.is_some() {
            return Err(invalid(
                "parallel_tool_calls",
                "'parallel_tool_calls' needs 'tools'",
            ));
        }
        return Ok(None);
    }
    Ok(Some(Tools {
        json: tools.cloned().unwrap_or(Value::Null),
        list,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// A grammar's refusal as the client's error on `param`.
fn grammar_error(param: &'static str, e: GrammarError) -> OpenAiError {
    invalid(param, format!("{param}: {e}"))
}

async fn generate(
    state: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, OpenAiError> {
    let body = body.map_err(body_error)?;
    let size = body.len();
    let map = blocking_if_large(size, move || {
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::json_body(e, "a JSON object"))?;
        match value {
            Value::Object(map) => Ok(map),
            other => Err(ApiError::BadRequest(format!(
                "the body is a JSON object, got {}",
                json_type(&other)
            ))),
        }
    })
    .await?;
    let own = match api {
        Api::Chat => CHAT_PARAMS,
        Api::Completions => COMPLETION_PARAMS,
    };
    let known = |k: &str| COMMON_PARAMS.contains(&k) || own.contains(&k);
    if let Some(unknown) = map.keys().find(|k| !known(k)) {
        return Err(OpenAiError::on_named(
            unknown.clone(),
            ApiError::BadRequest(format!(
                "'{unknown}' is not a parameter this server supports on this route"
            )),
        ));
    }
    let name = match map.get("model") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(invalid("model", "'model' is required: the name of a model")),
    };
    let model = take_model(&state, &name, None, &headers)
        .await
        .map_err(|e| OpenAiError::on("model", e))?;
    let Some(generator) = model.generator().cloned() else {
        return Err(OpenAiError::on(
            "model",
            ApiError::BadRequest(format!(
                "model '{}' is a {} model; this route serves text-generation models",
                model.name,
                model.codec.kind()
            )),
        ));
    };
    let mut asked = asked(&map, api)?;
    // the wait for a lazy load counts against the deadline
    asked.params.deadline = Some(generation_deadline(
        &model,
        generator.timeout(),
        client_timeout(&headers)?,
    ));
    // a forced call: its grammar; a call parsed from the model's text needs special tokens
    let format = generator.tool_format();
    if let Some(tools) = asked
        .tools
        .as_ref()
        .filter(|t| t.choice != ToolChoice::None)
    {
        // the parser reads the markers: special tokens are written out where a marker is one
        asked.params.special_text =
            format != ToolFormat::Hermes || generator.special_token_id("<tool_call>").is_some();
        let forced: Option<Vec<Tool>> = match &tools.choice {
            ToolChoice::Required => Some(tools.list.clone()),
            ToolChoice::Function(name) => Some(
                tools
                    .list
                    .iter()
                    .filter(|t| &t.name == name)
                    .cloned()
                    .collect(),
            ),
            _ => None,
        };
        if let Some(forced) = forced {
            if let Some((param, _)) = &asked.grammar {
                return Err(invalid(
                    param,
                    format!("'{param}' cannot be combined with a forced tool call (tool_choice)"),
                ));
            }
            let g = generator.clone();
            let special = move |t: &str| g.special_token_id(t);
            // a named function: one call of it; "required": one or more unless
            // parallel_tool_calls is false
            let parallel = tools.parallel && tools.choice == ToolChoice::Required;
            let spec = forced_grammar(format, &forced, parallel, &special);
            asked.grammar = Some(("tools", spec));
        }
    }
    if let Some((param, spec)) = asked.grammar.clone() {
        let g = generator.clone();
        let compiled = tokio::task::spawn_blocking(move || g.compile(&spec))
            .await
            .map_err(|e| ApiError::Internal(format!("grammar task failed: {e}")))?;
        asked.params.constraint = Some(compiled.map_err(|e| grammar_error(param, e))?);
    }
    let m = map;
    let g = generator.clone();
    let tools_json = asked
        .tools
        .as_ref()
        .filter(|t| t.choice != ToolChoice::None)
        .map(|t| t.json.clone());
    let prompts =
        blocking_if_large(size, move || Ok(prompts(&m, api, &g, tools_json.as_ref()))).await??;
    let loaded = HeaderValue::from_static(if model.cold() { "cold" } else { "warm" });
    let mut response = count_outcome(
        &model,
        answer(model.clone(), generator, prompts, asked, api),
    )
    .await?;
    // as the prediction routes say it: whether this request waited for a lazy load
    response.headers_mut().insert("x-model-loaded", loaded);
    Ok(response)
}

/// A prompt as tokens and, for `echo`, as text.
struct Prompt {
    tokens: Vec<u32>,
    text: String,
}

/// The request's prompts: the chat messages rendered by the template, or the completions
/// `prompt` (a string, strings, token ids or lists of token ids).
fn prompts(
    map: &Map<String, Value>,
    api: Api,
    g: &Generator,
    tools: Option<&Value>,
) -> Result<Vec<Prompt>, OpenAiError> {
    if api == Api::Chat {
        let messages = match map.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => m,
            _ => {
                return Err(invalid(
                    "messages",
                    "'messages' is a non-empty array of messages",
                ))
            }
        };
        if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| !m.is_object()) {
            return Err(invalid(
                "messages",
                format!(
                    "message {i} is an object with a role and content, got {}",
                    json_type(m)
                ),
            ));
        }
        let tokens = g
            .chat_prompt(messages, tools, true)
            .map_err(|e| generate_error(e, api))?;
        return Ok(vec![Prompt {
            tokens,
            text: String::new(),
        }]);
    }
    let shape = "'prompt' is a string, an array of strings, an array of token ids or an array of arrays of token ids";
    let text = |s: &str| -> Result<Prompt, OpenAiError> {
        Ok(Prompt {
            tokens: g.text_prompt(s).map_err(|e| generate_error(e, api))?,
            text: s.to_string(),
        })
    };
    let ids = |list: &[Value]| -> Result<Prompt, OpenAiError> {
        let ids: Option<Vec<i64>> = list.iter().map(Value::as_i64).collect();
        let ids = ids.ok_or_else(|| invalid("prompt", "token ids are whole numbers"))?;
        let tokens = g.check_tokens(&ids, "prompt")?;
        Ok(Prompt {
            text: g.decode(&tokens),
            tokens,
        })
    };
    match map.get("prompt") {
        Some(Value::String(s)) => Ok(vec![text(s)?]),
        Some(Value::Array(list)) if !list.is_empty() && list.iter().all(Value::is_number) => {
            Ok(vec![ids(list)?])
        }
        Some(Value::Array(list)) if !list.is_empty() => {
            if list.len() > MAX_PROMPTS {
                return Err(invalid(
                    "prompt",
                    format!(
                        "{} prompts in one request; at most {MAX_PROMPTS}",
                        list.len()
                    ),
                ));
            }
            list.iter()
                .map(|p| match p {
                    Value::String(s) => text(s),
                    Value::Array(ids_list) if !ids_list.is_empty() => ids(ids_list),
                    _ => Err(invalid("prompt", shape)),
                })
                .collect()
        }
        _ => Err(invalid("prompt", shape)),
    }
}

/// Reads a parameter of type `T` if present (and not null).
fn field<T: serde::de::DeserializeOwned>(
    map: &Map<String, Value>,
    param: &'static str,
    expected: &str,
) -> Result<Option<T>, OpenAiError> {
    match map.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| invalid(param, format!("'{param}' is {expected}, got {v}"))),
    }
}

/// The request's parameters, each checked where it is read.
fn asked(map: &Map<String, Value>, api: Api) -> Result<Asked, OpenAiError> {
    let whole = "a whole number";
    let number = "a number";
    let mut p = GenerateParams {
        n: 1,
        ..GenerateParams::default()
    };
    let max_tokens = match api {
        Api::Chat => field::<u64>(map, "max_completion_tokens", whole)?
            .map(|m| ("max_completion_tokens", m))
            .or(field::<u64>(map, "max_tokens", whole)?.map(|m| ("max_tokens", m))),
        Api::Completions => field::<u64>(map, "max_tokens", whole)?.map(|m| ("max_tokens", m)),
    };
    if let Some((param, m)) = max_tokens {
        if m == 0 {
            return Err(invalid(param, format!("'{param}' must be at least 1")));
        }
        p.max_tokens = Some(m.min(usize::MAX as u64) as usize);
    }
    p.temperature = field::<f32>(map, "temperature", number)?;
    p.top_p = field::<f32>(map, "top_p", number)?;
    // vLLM's convention: -1 (or 0) turns top-k off
    p.top_k = match field::<i64>(map, "top_k", whole)? {
        None => None,
        Some(-1) | Some(0) => Some(0),
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(invalid(
                "top_k",
                format!("'top_k' is -1, 0 or positive, got {k}"),
            ))
        }
    };
    p.min_p = field::<f32>(map, "min_p", number)?;
    p.repetition_penalty = field::<f32>(map, "repetition_penalty", number)?;
    p.presence_penalty = field::<f32>(map, "presence_penalty", number)?.unwrap_or(0.0);
    p.frequency_penalty = field::<f32>(map, "frequency_penalty", number)?.unwrap_or(0.0);
    p.seed = field::<i64>(map, "seed", whole)?.map(|s| s as u64);
    p.ignore_eos = field::<bool>(map, "ignore_eos", "true or false")?.unwrap_or(false);
    if let Some(bias) =
        field::<Map<String, Value>>(map, "logit_bias", "an object of token ids to numbers")?
    {
        for (k, v) in bias {
            let token: u32 = k
                .parse()
                .map_err(|_| invalid("logit_bias", format!("'{k}' is not a token id")))?;
            let value = v.as_f64().ok_or_else(|| {
                invalid("logit_bias", format!("the bias of token {k} is a number"))
            })?;
            p.logit_bias.push((token, value as f32));
        }
    }
    p.stop = match map.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("stop", "'stop' is a string or an array of strings"))?,
        Some(_) => return Err(invalid("stop", "'stop' is a string or an array of strings")),
    };
    if let Some(n) = field::<u64>(map, "n", whole)? {
        p.n = n.min(usize::MAX as u64) as usize;
    }
    match api {
        Api::Chat => {
            let logprobs = field::<bool>(map, "logprobs", "true or false")?.unwrap_or(false);
            let top = field::<u64>(map, "top_logprobs", whole)?;
            if let Some(k) = top {
                if !logprobs {
                    return Err(invalid(
                        "top_logprobs",
                        "'top_logprobs' needs 'logprobs': true",
                    ));
                }
                if k as usize > MAX_TOP_LOGPROBS {
                    return Err(invalid(
                        "top_logprobs",
                        format!("'top_logprobs' is within [0, {MAX_TOP_LOGPROBS}], got {k}"),
                    ));
                }
            }
            p.logprobs = logprobs.then_some(top.unwrap_or(0) as usize);
        }
        Api::Completions => {
            if let Some(k) = field::<u64>(map, "logprobs", whole)? {
                if k as usize > MAX_TOP_LOGPROBS {
                    return Err(invalid(
                        "logprobs",
                        format!("'logprobs' is within [0, {MAX_TOP_LOGPROBS}], got {k}"),
                    ));
                }
                p.logprobs = Some(k as usize);
            }
        }
    }
    let echo = field::<bool>(map, "echo", "true or false")?.unwrap_or(false);
    if echo && p.logprobs.is_some() {
        return Err(invalid(
            "echo",
            "'echo' with 'logprobs' would need the prompt's log-probabilities, which this server does not compute",
        ));
    }
    let stream = field::<bool>(map, "stream", "true or false")?.unwrap_or(false);
    let options = field::<Map<String, Value>>(map, "stream_options", "an object")?;
    let mut include_usage = false;
    if let Some(options) = options {
        if !stream {
            return Err(invalid(
                "stream_options",
                "'stream_options' needs 'stream': true",
            ));
        }
        for (k, v) in options {
            match (k.as_str(), v) {
                ("include_usage", Value::Bool(b)) => include_usage = b,
                _ => {
                    return Err(invalid(
                        "stream_options",
                        format!("'stream_options' takes include_usage (true or false), got '{k}'"),
                    ))
                }
            }
        }
    }
    let grammar = grammar_asked(map)?;
    let tools = match api {
        Api::Chat => tools_asked(map)?,
        Api::Completions => None,
    };
    Ok(Asked {
        params: p,
        stream,
        include_usage,
        echo,
        grammar,
        tools,
    })
}

/// One choice's answer as it accumulates.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<TokenInfo>,
    finish: Option<Finish>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// The answer's identity, shared by its chunks.
struct Head {
    id: String,
    created: u64,
    model: String,
    api: Api,
}

impl Head {
    fn new(api: Api, model: &str) -> Self {
        let prefix = match api {
            Api::Chat => "chatcmpl",
            Api::Completions => "cmpl",
        };
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_string(),
            api,
        }
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.api.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Log-probabilities of `tokens` in the API's shape (`offset`: the text before them, for the
/// completions API's `text_offset`).
fn logprobs(g: &Generator, api: Api, tokens: &[TokenInfo], offset: usize) -> Value {
    match api {
        Api::Chat => {
            let entry = |id: u32, lp: f32| {
                let text = g.token_text(id);
                json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.id, t.logprob);
                    e["top_logprobs"] =
                        Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
                    e
                })
                .collect();
            json!({"content": content})
        }
        Api::Completions => {
            let mut at = offset;
            let (mut texts, mut lps, mut tops, mut offsets) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for t in tokens {
                let text = g.token_text(t.id);
                offsets.push(at);
                at += text.len();
                texts.push(text);
                lps.push(t.logprob);
                let top: Map<String, Value> = t
                    .top
                    .iter()
                    .map(|&(id, lp)| (g.token_text(id), json!(lp)))
                    .collect();
                tops.push(Value::Object(top));
            }
            json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
        }
    }
}

/// Submits every prompt's choices and answers them, whole or streamed.
async fn answer(
    model: ModelLease,
    g: Arc<Generator>,
    prompts: Vec<Prompt>,
    asked: Asked,
    api: Api,
) -> Result<Response, OpenAiError> {
    let n = asked.params.n;
    let sequences = prompts.len().saturating_mul(n);
    if sequences > g.max_waiting() {
        return Err(OpenAiError::on(
            "n",
            ApiError::PayloadTooLarge(format!(
                "{sequences} sequences in one request ({} prompts x n = {n}); this model queues at most {}",
                prompts.len(),
                g.max_waiting()
            )),
        ));
    }
    let mut receivers = Vec::with_capacity(prompts.len() * n);
    let mut echoes = Vec::with_capacity(prompts.len() * n);
    for p in prompts {
        let rx = g
            .submit(p.tokens, &asked.params)
            .map_err(|e| generate_error(e, api))?;
        for r in rx {
            receivers.push(r);
            echoes.push(if asked.echo {
                p.text.clone()
            } else {
                String::new()
            });
        }
    }
    let head = Head::new(api, &model.name);
    // tool calls are parsed from the answer's text when tools are offered
    let format = asked
        .tools
        .as_ref()
        .filter(|t| t.choice != ToolChoice::None)
        .map(|_| g.tool_format());
    let names: Vec<String> = asked
        .tools
        .as_ref()
        .map(|t| t.list.iter().map(|f| f.name.clone()).collect())
        .unwrap_or_default();
    if asked.stream {
        return Ok(stream_answer(
            model,
            g,
            head,
            receivers,
            echoes,
            &asked,
            format.map(|f| (f, names)),
        ));
    }
    let mut choices: Vec<Choice> = Vec::with_capacity(receivers.len());
    for mut rx in receivers {
        let mut c = Choice::default();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Token { text, token } => {
                    c.text.push_str(&text);
                    if asked.params.logprobs.is_some() {
                        c.tokens.push(token);
                    }
                }
                Event::End {
                    text,
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    c.text.push_str(&text);
                    c.finish = Some(finish);
                    c.prompt_tokens = prompt_tokens;
                    c.completion_tokens = completion_tokens;
                }
                Event::Error(e) => return Err(sequence_error(e).into()),
            }
        }
        if c.finish.is_none() {
            return Err(
                ApiError::ModelNotReady("the model stopped before answering".into()).into(),
            );
        }
        choices.push(c);
    }
    // the prompt counts once per prompt, not once per choice
    let prompt_tokens: usize = choices
        .iter()
        .step_by(n.max(1))
        .map(|c| c.prompt_tokens)
        .sum();
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let want_logprobs = asked.params.logprobs.is_some();
    let rendered: Vec<Value> = choices
        .into_iter()
        .zip(echoes)
        .enumerate()
        .map(|(index, (c, echo))| {
            let lp = want_logprobs.then(|| logprobs(&g, api, &c.tokens, echo.len()));
            let mut finish = c.finish.map(Finish::as_str);
            match api {
                Api::Chat => {
                    let mut message = json!({"role": "assistant", "content": c.text});
                    if let Some(format) = format {
                        let (content, calls) = tool_calls(format, &names, &c.text);
                        if !calls.is_empty() {
                            message["content"] = if content.is_empty() {
                                Value::Null
                            } else {
                                json!(content)
                            };
                            message["tool_calls"] = Value::Array(calls);
                            if c.finish == Some(Finish::Stop) {
                                finish = Some("tool_calls");
                            }
                        }
                    }
                    json!({
                        "index": index,
                        "message": message,
                        "logprobs": lp,
                        "finish_reason": finish,
                    })
                }
                Api::Completions => json!({
                    "index": index,
                    "text": echo + &c.text,
                    "logprobs": lp,
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    Ok(Json(json!({
        "id": head.id,
        "object": api.object(false),
        "created": head.created,
        "model": head.model,
        "choices": rendered,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

/// An answer's text split into its content and its `tool_calls` (OpenAI's shape).
fn tool_calls(format: ToolFormat, names: &[String], text: &str) -> (String, Vec<Value>) {
    let (content, calls) = split_answer(ToolParser::offering(format, names.to_vec()), text);
    let calls = calls
        .iter()
        .map(|(name, args)| call_json(&format.call_id(), name, args))
        .collect();
    (content, calls)
}

/// The state of a streamed answer: the choices' events merged, the chunks still to send, and
/// what the last chunk needs.
struct Streamer {
    events: SelectAll<BoxStream<'static, (usize, Event)>>,
    pending: VecDeque<Value>,
    head: Head,
    g: Arc<Generator>,
    /// Holds the model while the answer streams (no unload or eviction under it).
    _model: ModelLease,
    include_usage: bool,
    want_logprobs: bool,
    n: usize,
    /// Text already sent per choice (the completions API's `text_offset`).
    sent: Vec<usize>,
    prompt_tokens: Vec<usize>,
    completion_tokens: usize,
    done: bool,
    /// Per choice, the tool-call parser when tools are offered.
    parsers: Vec<Option<ToolParser>>,
    format: Option<ToolFormat>,
}

fn stream_answer(
    model: ModelLease,
    g: Arc<Generator>,
    head: Head,
    receivers: Vec<mpsc::Receiver<Event>>,
    echoes: Vec<String>,
    asked: &Asked,
    format: Option<(ToolFormat, Vec<String>)>,
) -> Response {
    let count = receivers.len();
    let events = stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, move |mut rx| async move {
            rx.recv().await.map(|e| ((i, e), rx))
        })
        .boxed()
    }));
    let mut s = Streamer {
        events,
        pending: VecDeque::new(),
        g,
        _model: model,
        include_usage: asked.include_usage,
        want_logprobs: asked.params.logprobs.is_some(),
        n: asked.params.n.max(1),
        sent: vec![0; count],
        prompt_tokens: vec![0; count],
        completion_tokens: 0,
        done: false,
        parsers: (0..count)
            .map(|_| {
                format
                    .as_ref()
                    .map(|(f, names)| ToolParser::offering(*f, names.clone()))
            })
            .collect(),
        format: format.map(|(f, _)| f),
        head,
    };
    for (i, echo) in echoes.into_iter().enumerate() {
        let first = match s.head.api {
            Api::Chat => {
                json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
            }
            Api::Completions if !echo.is_empty() => {
                s.sent[i] = echo.len();
                json!({"index": i, "text": echo, "logprobs": null, "finish_reason": null})
            }
            Api::Completions => continue,
        };
        s.push(first);
    }
    let body = stream::unfold(s, |mut s| async move {
        loop {
            if let Some(chunk) = s.pending.pop_front() {
                let event = match chunk {
                    Value::String(done) => SseEvent::default().data(done),
                    chunk => SseEvent::default().data(chunk.to_string()),
                };
                return Some((Ok::<_, Infallible>(event), s));
            }
            if s.done {
                return None;
            }
            match s.events.next().await {
                Some((i, e)) => s.on_event(i, e),
                None => s.finish(),
            }
        }
    });
    let mut response = Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.extensions_mut().insert(Streaming);
    response
}

impl Streamer {
    /// Queues a chunk of one choice.
    fn push(&mut self, choice: Value) {
        let usage = self.include_usage.then_some(Value::Null);
        let chunk = self.head.chunk(json!([choice]), usage);
        self.pending.push_back(chunk);
    }

    fn on_event(&mut self, i: usize, event: Event) {
        let api = self.head.api;
        match event {
            Event::Token { text, token } if api == Api::Chat && self.parsers[i].is_some() => {
                let events = self.parsers[i]
                    .as_mut()
                    .map_or_else(Vec::new, |p| p.push(&text));
                let mut lp = self
                    .want_logprobs
                    .then(|| logprobs(&self.g, api, std::slice::from_ref(&token), 0));
                if events.is_empty() {
                    if let Some(lp) = lp.take() {
                        self.push(
                            json!({"index": i, "delta": {}, "logprobs": lp, "finish_reason": null}),
                        );
                    }
                }
                for e in events {
                    self.push_tool_event(i, e, lp.take());
                }
            }
            Event::Token { text, token } => {
                if text.is_empty() && !self.want_logprobs {
                    return;
                }
                let lp = self
                    .want_logprobs
                    .then(|| logprobs(&self.g, api, std::slice::from_ref(&token), self.sent[i]));
                self.sent[i] += text.len();
                self.push(match api {
                    Api::Chat => json!({"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}),
                    Api::Completions => json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null}),
                });
            }
            Event::End {
                text,
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                self.prompt_tokens[i] = prompt_tokens;
                self.completion_tokens += completion_tokens;
                if let Some(mut parser) = self.parsers[i].take() {
                    let mut events = parser.push(&text);
                    events.extend(parser.finish());
                    for e in events {
                        self.push_tool_event(i, e, None);
                    }
                    let reason = if parser.calls() > 0 && finish == Finish::Stop {
                        "tool_calls"
                    } else {
                        finish.as_str()
                    };
                    self.push(
                        json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": reason}),
                    );
                    return;
                }
                let finish = finish.as_str();
                self.push(match api {
                    Api::Chat if text.is_empty() => json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}),
                    Api::Chat => json!({"index": i, "delta": {"content": text}, "logprobs": null, "finish_reason": finish}),
                    Api::Completions => json!({"index": i, "text": text, "logprobs": null, "finish_reason": finish}),
                });
            }
            Event::Error(e) => {
                // an error mid-stream: OpenAI's error object as an event, then the stream ends
                let err = sequence_error(e);
                let status = err.status();
                self.pending.push_back(json!({"error": {
                    "message": err.to_string(),
                    "type": if status.is_server_error() { "server_error" } else { "invalid_request_error" },
                    "param": null,
                    "code": status.as_u16(),
                }}));
                self.done = true;
            }
        }
    }

    /// A tool parser's event as a chunk: content, a call's start (id, type, name and empty
    /// arguments) or a piece of its arguments.
    fn push_tool_event(&mut self, i: usize, e: ToolEvent, lp: Option<Value>) {
        let delta = match e {
            ToolEvent::Text(text) => json!({"content": text}),
            ToolEvent::Start { index, name } => {
                let id = self.format.map_or_else(String::new, |f| f.call_id());
                json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]})
            }
            ToolEvent::Args { index, text } => {
                json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
            }
        };
        self.push(json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": null}));
    }

    fn finish(&mut self) {
        if self.include_usage {
            let prompt: usize = self.prompt_tokens.iter().step_by(self.n).sum();
            let chunk = self
                .head
                .chunk(json!([]), Some(usage(prompt, self.completion_tokens)));
            self.pending.push_back(chunk);
        }
        self.pending.push_back(Value::String("[DONE]".into()));
        self.done = true;
    }
}
