//! Text generation over KServe v2 gRPC, the way Triton serves vLLM and TensorRT-LLM models: a
//! request carries `text_input` (BYTES, the prompt as given: no chat template), optionally
//! `stream` (BOOL), `sampling_parameters` (BYTES, a JSON object with vLLM's names) and
//! `exclude_input_in_output` (BOOL); the answer is `text_output` (BYTES). `ModelInfer` answers
//! once, with the prompt before the answer unless `exclude_input_in_output` is true (vLLM's
//! backend does the same). On `ModelStreamInfer` with `stream: true`, each piece of text is
//! one response as it is generated (Triton's decoupled models), the last one carrying the
//! parameters `triton_final_response: true` and `finish_reason`; a client that sets
//! `triton_enable_empty_final_response` gets that last response with no text, as Triton sends it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::proto::{
    infer_parameter::ParameterChoice, model_infer_response::InferOutputTensor, InferParameter,
    ModelInferRequest, ModelInferResponse,
};
use crate::codec::v2::{encode_bytes_elements, V2Data, V2Input};
use crate::http::ApiError;
use crate::registry::generate::{
    Event, GenerateError, GenerateParams, Generator, SequenceError, SubmitError,
};
use crate::registry::ModelLease;
use crate::tensor::DType;

/// What a generation request asks for.
pub struct Asked {
    pub prompt: String,
    pub stream: bool,
    pub exclude_input: bool,
    pub params: GenerateParams,
    pub id: String,
    pub empty_final: bool,
}

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError::BadRequest(m.into())
}

/// The inputs a generation request may carry.
const INPUTS: &[&str] = &[
    "text_input",
    "stream",
    "sampling_parameters",
    "exclude_input_in_output",
];

/// The keys of `sampling_parameters` this server takes (vLLM's `SamplingParams` names).
const SAMPLING: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "n",
];

fn one_bytes(input: &V2Input) -> Result<&[u8], ApiError> {
    match &input.data {
        V2Data::Bytes(b) if b.len() == 1 => Ok(&b[0]),
        _ => Err(invalid(format!(
            "input '{}' is one BYTES element",
            input.name
        ))),
    }
}

fn one_bool(input: &V2Input) -> Result<bool, ApiError> {
    match &input.data {
        V2Data::Tensor(t) if t.dtype == DType::Bool && t.data.len() == 1 => Ok(t.data[0] != 0),
        _ => Err(invalid(format!(
            "input '{}' is one BOOL element",
            input.name
        ))),
    }
}

/// Reads a generation request; every input and sampling key it does not know is an error
/// naming it, never ignored.
pub fn asked(msg: ModelInferRequest, deadline: Option<Instant>) -> Result<Asked, ApiError> {
    let empty_final = matches!(
        msg.parameters
            .get("triton_enable_empty_final_response")
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    let request = super::convert::infer_request(msg)?;
    let mut asked = Asked {
        prompt: String::new(),
        stream: false,
        exclude_input: false,
        params: GenerateParams {
            n: 1,
            deadline,
            ..GenerateParams::default()
        },
        id: request.id.clone().unwrap_or_default(),
        empty_final,
    };
    let mut prompt = None;
    for input in &request.inputs {
        match input.name.as_str() {
            "text_input" => {
                let text = std::str::from_utf8(one_bytes(input)?)
                    .map_err(|_| invalid("text_input is not UTF-8"))?;
                prompt = Some(text.to_string());
            }
            "stream" => asked.stream = one_bool(input)?,
            "exclude_input_in_output" => asked.exclude_input = one_bool(input)?,
            "sampling_parameters" => sampling(one_bytes(input)?, &mut asked.params)?,
            other => {
                return Err(invalid(format!(
                    "unknown input '{other}'; a text-generation model takes {INPUTS:?}"
                )))
            }
        }
    }
    asked.prompt = prompt.ok_or_else(|| invalid("missing input 'text_input'"))?;
    if let Some(outputs) = &request.outputs {
        if let Some(o) = outputs.iter().find(|o| o.name != "text_output") {
            return Err(invalid(format!(
                "unknown output '{}'; a text-generation model answers 'text_output'",
                o.name
            )));
        }
    }
    Ok(asked)
}

fn sampling(json: &[u8], p: &mut GenerateParams) -> Result<(), ApiError> {
    let map: Map<String, Value> = serde_json::from_slice(json)
        .map_err(|e| invalid(format!("sampling_parameters is a JSON object: {e}")))?;
    for (key, v) in &map {
        if !SAMPLING.contains(&key.as_str()) {
            return Err(invalid(format!(
                "sampling_parameters: '{key}' is not supported; supported: {SAMPLING:?}"
            )));
        }
        let bad = || {
            invalid(format!(
                "sampling_parameters: '{key}' has the wrong type: {v}"
            ))
        };
        let float = || v.as_f64().map(|f| f as f32).ok_or_else(bad);
        let count = || v.as_u64().map(|u| u as usize).ok_or_else(bad);
        match key.as_str() {
            "max_tokens" => p.max_tokens = Some(count()?),
            "temperature" => p.temperature = Some(float()?),
            "top_p" => p.top_p = Some(float()?),
            // vLLM's -1 means no top-k
            "top_k" => p.top_k = (v.as_i64() != Some(-1)).then(count).transpose()?,
            "min_p" => p.min_p = Some(float()?),
            "repetition_penalty" => p.repetition_penalty = Some(float()?),
            "presence_penalty" => p.presence_penalty = float()?,
            "frequency_penalty" => p.frequency_penalty = float()?,
            "seed" => p.seed = Some(v.as_u64().ok_or_else(bad)?),
            "ignore_eos" => p.ignore_eos = v.as_bool().ok_or_else(bad)?,
            "stop" => {
                p.stop = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(a) => a
                        .iter()
                        .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
                        .collect::<Result<_, _>>()?,
                    _ => return Err(bad()),
                }
            }
            "n" if v.as_u64() == Some(1) => {}
            "n" => return Err(invalid("sampling_parameters: n must be 1 over gRPC")),
            _ => unreachable!("checked against SAMPLING"),
        }
    }
    Ok(())
}

fn generate_error(e: GenerateError) -> ApiError {
    let message = e.to_string();
    match e {
        GenerateError::Submit(SubmitError::QueueFull { .. }) => ApiError::Overloaded(message),
        GenerateError::Submit(SubmitError::Closed) => ApiError::ModelNotReady(message),
        _ => ApiError::BadRequest(message),
    }
}

fn sequence_error(e: SequenceError) -> ApiError {
    match e {
        SequenceError::TimedOut { .. } => ApiError::Timeout(e.to_string()),
        SequenceError::Model(_) | SequenceError::Grammar(_) => ApiError::Internal(e.to_string()),
    }
}

/// One response with `text` as `text_output`.
fn piece(
    model: &ModelLease,
    id: &str,
    text: String,
    last: Option<&'static str>,
) -> ModelInferResponse {
    let mut parameters = HashMap::new();
    parameters.insert(
        "triton_final_response".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(last.is_some())),
        },
    );
    if let Some(finish) = last {
        parameters.insert(
            "finish_reason".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(finish.into())),
            },
        );
    }
    ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id: id.to_string(),
        parameters,
        outputs: vec![InferOutputTensor {
            name: "text_output".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_output_contents: vec![encode_bytes_elements(&[text.into_bytes()])],
    }
}

/// Runs a generation request; each response goes to `send` (one for a request that does not
/// stream). Returns once the last has been sent, or with the error that ended it.
pub async fn run(
    model: ModelLease,
    g: Arc<Generator>,
    asked: Asked,
    streaming_allowed: bool,
    send: &mpsc::Sender<ModelInferResponse>,
) -> Result<(), ApiError> {
    if asked.stream && !streaming_allowed {
        return Err(invalid(
            "stream: true needs ModelStreamInfer (a unary ModelInfer has one response)",
        ));
    }
    let prompt = g.text_prompt(&asked.prompt).map_err(generate_error)?;
    let mut rx = g
        .submit(prompt, &asked.params)
        .map_err(generate_error)?
        .remove(0);
    let mut whole = if asked.exclude_input || asked.stream {
        String::new()
    } else {
        asked.prompt.clone()
    };
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token { text, .. } if asked.stream => {
                if !text.is_empty()
                    && send
                        .send(piece(&model, &asked.id, text, None))
                        .await
                        .is_err()
                {
                    return Ok(()); // the client left: dropping `rx` ends the sequence
                }
            }
            Event::Token { text, .. } => whole.push_str(&text),
            Event::End { text, finish, .. } => {
                let last = if asked.stream && asked.empty_final {
                    if !text.is_empty() {
                        let _ = send.send(piece(&model, &asked.id, text, None)).await;
                    }
                    piece(&model, &asked.id, String::new(), Some(finish.as_str()))
                } else {
                    whole.push_str(&text);
                    piece(&model, &asked.id, whole, Some(finish.as_str()))
                };
                let _ = send.send(last).await;
                return Ok(());
            }
            Event::Error(e) => return Err(sequence_error(e)),
        }
    }
    Err(ApiError::ModelNotReady(
        "the model stopped before answering".into(),
    ))
}
