//! `POST /v1/embeddings`: OpenAI's embeddings API, for the clients that speak it (the `openai`
//! package, LangChain, LlamaIndex, ...), served by `text-embedding` models.
//!
//! Request: `{"model", "input": "text" | ["text", ...] | [token ids] | [[token ids], ...],
//! "encoding_format"?: "float" | "base64", "dimensions"?: n, "user"?: "..."}`. Answer:
//! `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
//! "usage": {"prompt_tokens", "total_tokens"}}`. Errors on this route take OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}` ([`error_response`]), with the statuses
//! of the rest of the API.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::error_answer;
use super::inference::{
    blocking_if_large, count_outcome, deadline, take_model, with_timing, HasOutcome, StillWanted,
};
use super::v1::body_error;
use super::{ApiError, AppState};
use crate::codec::instance::json_type;
use crate::codec::Embedder;
use crate::registry::{ModelLease, ServingModel};
use crate::telemetry::Outcome;
use crate::tensor::Item;

/// An error and the request field it is about (OpenAI's `param`).
#[derive(Debug)]
pub struct OpenAiError {
    error: ApiError,
    param: Option<std::borrow::Cow<'static, str>>,
}

impl OpenAiError {
    pub(super) fn on(param: &'static str, error: ApiError) -> Self {
        Self {
            error,
            param: Some(param.into()),
        }
    }

    /// An error about a field the request named itself (e.g. one the route does not know).
    pub(super) fn on_named(param: String, error: ApiError) -> Self {
        Self {
            error,
            param: Some(param.into()),
        }
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        Self { error, param: None }
    }
}

impl HasOutcome for OpenAiError {
    fn outcome(&self) -> Outcome {
        self.error.outcome()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        error_response(self.error, self.param.as_deref())
    }
}

/// An error answer in OpenAI's shape: the API's status, `code` and `message`, plus `type`
/// (from the status) and `param` (the request field it is about, if any), and the headers
/// every dialect's error answer carries.
pub fn error_response(err: ApiError, param: Option<&str>) -> Response {
    let status = err.status();
    let log = err.log();
    let (kind, code) = match status {
        StatusCode::UNAUTHORIZED => ("authentication_error", "invalid_api_key"),
        StatusCode::FORBIDDEN => ("permission_error", log.code),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
            ("rate_limit_error", log.code)
        }
        s if s.is_server_error() => ("server_error", log.code),
        _ => ("invalid_request_error", log.code),
    };
    let body =
        json!({"error": {"message": log.message, "type": kind, "param": param, "code": code}});
    error_answer(status, body, log)
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<Value>,
    /// OpenAI's end-user id: accepted and not used.
    #[serde(default, rename = "user")]
    _user: Option<Value>,
}

/// One input: a text, or token ids the client tokenised with the model's tokenizer.
enum Input {
    Text(String),
    Ids(Vec<i64>),
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Float,
    Base64,
}

pub async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let body = body.map_err(body_error)?;
    let max = state.settings.max_instances;
    let size = body.len();
    let (req, inputs) = blocking_if_large(size, move || Ok(parse(&body, max))).await??;
    let model = take_model(&state, &req.model, None, &headers)
        .await
        .map_err(|e| OpenAiError::on("model", e))?;
    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(OpenAiError::on(
                "encoding_format",
                ApiError::InvalidInput(format!(
                    "encoding_format '{other}' is not one of 'float', 'base64'"
                )),
            ))
        }
    };
    let Some(embedder) = model.codec.embedder() else {
        return Err(OpenAiError::on(
            "model",
            ApiError::BadRequest(format!(
                "model '{}' is a {} model; /v1/embeddings serves text-embedding models",
                model.name,
                model.codec.kind()
            )),
        ));
    };
    let dimensions = dimensions(req.dimensions.as_ref(), embedder)?;
    let answer = Answer {
        encoding,
        dimensions,
    };
    count_outcome(&model, embed(&model, inputs, &headers, size, answer)).await
}

/// How the vectors are answered.
#[derive(Clone, Copy)]
struct Answer {
    encoding: Encoding,
    /// Keep the first `dimensions` of each vector (re-normalised when the model normalises).
    dimensions: Option<usize>,
}

/// Parses the body: the request and its inputs, or an error naming the field.
fn parse(body: &[u8], max: usize) -> Result<(EmbeddingsRequest, Vec<Input>), OpenAiError> {
    let req: EmbeddingsRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::json_body(
            e,
            "{\"model\": \"...\", \"input\": \"text\" | [\"text\", ...] | [token ids] | [[token ids], ...]}",
        )
    })?;
    let inputs = inputs(&req.input, max).map_err(|e| OpenAiError::on("input", e))?;
    Ok((req, inputs))
}

/// The inputs of `input`: a string, an array of strings, an array of token ids, or an array
/// of arrays of token ids.
fn inputs(input: &Value, max: usize) -> Result<Vec<Input>, ApiError> {
    let shape = "\"input\" is a string, an array of strings, an array of token ids or an array of arrays of token ids";
    let ids = |v: &[Value]| -> Option<Vec<i64>> { v.iter().map(Value::as_i64).collect() };
    let list = match input {
        Value::String(s) => return Ok(vec![Input::Text(s.clone())]),
        Value::Array(list) if list.is_empty() => {
            return Err(ApiError::InvalidInput(format!(
                "\"input\" is empty; {shape}"
            )))
        }
        Value::Array(list) => list,
        other => {
            return Err(ApiError::InvalidInput(format!(
                "{shape}, got {}",
                json_type(other)
            )))
        }
    };
    if list.iter().all(Value::is_number) {
        let ids = ids(list).ok_or_else(|| {
            ApiError::InvalidInput("token ids are whole numbers (integers)".into())
        })?;
        return Ok(vec![Input::Ids(ids)]);
    }
    ApiError::at_most(list.len(), max, "inputs")?;
    list.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(Input::Text(s.clone())),
            Value::Array(a) => ids(a).map(Input::Ids).ok_or_else(|| {
                ApiError::InvalidInput(format!("input {i}: token ids are whole numbers (integers)"))
            }),
            other => Err(ApiError::InvalidInput(format!(
                "input {i}: {shape}, got {} in the array",
                json_type(other)
            ))),
        })
        .collect()
}

/// `dimensions`: a whole number from 1 to the model's size.
fn dimensions(
    value: Option<&Value>,
    embedder: &dyn Embedder,
) -> Result<Option<usize>, OpenAiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let size = embedder.dimension();
    match value.as_u64() {
        Some(n) if (1..=size as u64).contains(&n) => Ok(Some(n as usize)),
        _ => Err(OpenAiError::on(
            "dimensions",
            ApiError::InvalidInput(format!(
                "dimensions is a whole number from 1 to {size} (the model's size), got {value}"
            )),
        )),
    }
}

async fn embed(
    model: &ModelLease,
    inputs: Vec<Input>,
    headers: &HeaderMap,
    size: usize,
    answer: Answer,
) -> Result<Response, OpenAiError> {
    let deadline = deadline(headers, model, None)?;
    let m = model.clone();
    let (wanted, _alive) = StillWanted::new(deadline);
    let items = blocking_if_large(size, move || Ok(tokenise(&m, &inputs, &wanted))).await??;
    let results = model
        .batched()
        .map_err(ApiError::from)?
        .infer(items, deadline)
        .await
        .map_err(ApiError::from)?;
    let embedder = model.codec.embedder().expect("checked before");
    let data = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let v = finish(embedder.vector(r), embedder.normalizes(), answer.dimensions);
            if !v.iter().all(|x| x.is_finite()) {
                return Err(OpenAiError::from(ApiError::InvalidInput(format!(
                    "input {i}: the model's embedding is not finite (NaN or infinity)"
                ))));
            }
            let embedding = match answer.encoding {
                Encoding::Float => json!(v),
                Encoding::Base64 => json!(base64_f32(&v)),
            };
            Ok(json!({"object": "embedding", "index": i, "embedding": embedding}))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tokens: usize = results.iter().map(|r| r.tokens).sum();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(with_timing(
        (StatusCode::OK, axum::Json(body)).into_response(),
        model,
        &results,
    ))
}

/// Each input as an item: texts tokenised, token ids checked; stops early once the client has
/// left or the deadline has passed.
fn tokenise(
    model: &ServingModel,
    inputs: &[Input],
    wanted: &StillWanted,
) -> Result<Vec<Item>, OpenAiError> {
    let embedder = model.codec.embedder().expect("checked before");
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            wanted.check()?;
            match input {
                Input::Text(t) => embedder.text(t),
                Input::Ids(ids) => embedder.token_ids(ids),
            }
            .map_err(|e| {
                OpenAiError::on("input", ApiError::from(e).about(format_args!("input {i}")))
            })
        })
        .collect()
}

/// The vector as answered: its first `dimensions` (Matryoshka truncation), re-normalised when
/// the model's vectors are normalised (so that a truncated one is a unit vector too).
fn finish(mut v: Vec<f32>, normalized: bool, dimensions: Option<usize>) -> Vec<f32> {
    if let Some(d) = dimensions.filter(|&d| d < v.len()) {
        v.truncate(d);
        if normalized {
            let norm = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let norm = norm.max(1e-12);
            v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
        }
    }
    v
}

/// The vector as base64 of its little-endian FP32 bytes (OpenAI's `encoding_format: base64`).
fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `GET /v1/models` entry in OpenAI's list-models shape (`data`), beside the API's own
/// `models`, so that `client.models.list()` works against the server; `created` is when the
/// model was loaded (0: not loaded).
pub fn list_entry(name: &str, created: u64) -> Value {
    json!({"id": name, "object": "model", "created": created, "owned_by": "aiaas"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_take_every_openai_shape() {
        let one = inputs(&json!("hi"), 10).unwrap();
        assert!(matches!(&one[..], [Input::Text(t)] if t == "hi"));
        let ids = inputs(&json!([101, 7592, 102]), 10).unwrap();
        assert!(matches!(&ids[..], [Input::Ids(v)] if v == &[101, 7592, 102]));
        let many = inputs(&json!(["a", [1, 2]]), 10).unwrap();
        assert_eq!(many.len(), 2);
        for bad in [
            json!([]),
            json!(3),
            json!([1.5]),
            json!([["x"]]),
            json!([null]),
        ] {
            let e = inputs(&bad, 10).err().expect("refused");
            assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
        let e = inputs(&json!(["a", "b", "c"]), 2).err().unwrap();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn truncation_renormalises_normalised_vectors_only() {
        let v = vec![0.6, 0.0, 0.8];
        let t = finish(v.clone(), true, Some(2));
        assert_eq!(t, vec![1.0, 0.0]);
        assert_eq!(finish(v.clone(), false, Some(2)), vec![0.6, 0.0]);
        assert_eq!(finish(v.clone(), true, None), v);
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let s = base64_f32(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(&bytes[..4], &1.0f32.to_le_bytes());
        assert_eq!(&bytes[4..], &(-2.5f32).to_le_bytes());
    }
}
