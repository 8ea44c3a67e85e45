//! `/v2`: the KServe Open Inference Protocol with Triton's extensions (binary tensor data,
//! model configuration, statistics, model repository), so that tritonclient, KServe's
//! InferenceRESTClient and perf_analyzer work unchanged.
//!
//! Bodies are read as bytes whatever the Content-Type (tritonclient sends none). Errors are
//! `{"error": "message"}` with Triton's statuses ([`error_response`]): 400 invalid, 404
//! unknown, 503 queue full or timed out, 500 internal. v2 requests go through the same
//! per-model batcher as /v1.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::error_answer;
use super::inference::{count_outcome, deadline, take_model, with_timing, HasOutcome, StillWanted};
use super::{ApiError, AppState, REQUEST_ID};
use crate::codec::v2::{self, V2Input};
use crate::codec::CodecError;
use crate::config::model_spec::VersionPolicy;
use crate::registry::{ModelLease, ModelState, ServingModel};
use crate::telemetry::Outcome;

/// The binary tensor extension's header.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Extensions listed in `GET /v2`: only complete ones (perf_analyzer trusts the list).
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
];

/// A v2 error answer: `{"error": "message"}` with Triton's statuses (invalid input and an
/// unsupported media type are 400, a passed deadline 503), and the headers every dialect's
/// error answer carries.
pub fn error_response(err: ApiError) -> Response {
    let status = match err.status() {
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            StatusCode::BAD_REQUEST
        }
        StatusCode::GATEWAY_TIMEOUT => StatusCode::SERVICE_UNAVAILABLE,
        s => s,
    };
    let log = err.log();
    let body = json!({ "error": log.message });
    error_answer(status, body, log)
}

/// A v2 handler's error: an [`ApiError`] answered in v2's shape ([`error_response`]).
#[derive(Debug)]
pub struct V2Error(ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        V2Error(e)
    }
}

impl HasOutcome for V2Error {
    fn outcome(&self) -> Outcome {
        self.0.outcome()
    }
}

impl From<CodecError> for V2Error {
    fn from(e: CodecError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        error_response(self.0)
    }
}

type V2Result<T> = Result<T, V2Error>;

fn parse_version(name: &str, version: &str) -> V2Result<u64> {
    Ok(version_number(name, version)?)
}

/// A version named in a path or message: a number, else the model has no such version (404).
pub(crate) fn version_number(name: &str, version: &str) -> Result<u64, ApiError> {
    version
        .parse()
        .map_err(|_| ApiError::ModelNotFound(format!("model '{name}' has no version '{version}'")))
}

/// `GET /v2`: server metadata.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "aiaas",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

/// `GET /v2/health/live`: 200 `{"live": true}` (KServe's client reads the body, Triton's the
/// status).
pub async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready`: 200 `{"ready": true}` when every model required at start-up is
/// ready, else 503 `{"ready": false}`.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let ready = state.registry.readiness().ready && !state.is_shutting_down();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready })))
}

/// The model a metadata or config request describes: under lazy model control one not in
/// memory is loaded first, since a client asks for metadata right before it infers (Triton's
/// clients do). Readiness and statistics never load.
async fn described(state: &AppState, name: &str, version: Option<u64>) -> V2Result<ModelLease> {
    Ok(take_model(state, name, version, &HeaderMap::new()).await?)
}

fn serving(state: &AppState, name: &str, version: Option<u64>) -> V2Result<Arc<ServingModel>> {
    Ok(state
        .registry
        .serving(name, version)
        .map_err(ApiError::from)?)
}

/// The ready versions of a model, as metadata lists them.
pub(crate) fn ready_versions(state: &AppState, name: &str) -> Vec<String> {
    state
        .registry
        .entry(name)
        .map(|e| {
            e.versions
                .iter()
                .filter(|(_, v)| v.state == ModelState::Ready)
                .map(|(k, _)| k.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn metadata_json(state: &AppState, model: &ServingModel) -> Value {
    let versions = ready_versions(state, &model.name);
    json!({
        "name": model.name,
        "versions": versions,
        "platform": "pytorch_libtorch",
        "inputs": model.codec.v2_inputs().iter().map(|t| t.metadata_json()).collect::<Vec<_>>(),
        "outputs": model.codec.v2_outputs().iter().map(|t| t.metadata_json()).collect::<Vec<_>>(),
    })
}

/// `GET /v2/models/{m}`.
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> V2Result<Json<Value>> {
    let model = described(&state, &name, None).await?;
    Ok(Json(metadata_json(&state, &model)))
}

/// `GET /v2/models/{m}/versions/{v}`.
pub async fn model_version_metadata(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> V2Result<Json<Value>> {
    let model = described(&state, &name, Some(parse_version(&name, &version)?)).await?;
    let mut v = metadata_json(&state, &model);
    v["versions"] = json!([model.version.to_string()]);
    Ok(Json(v))
}

/// `GET /v2/models/{m}/ready`: 200 when its default version is ready; 404 unknown, 503 not
/// ready.
pub async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> V2Result<Json<Value>> {
    serving(&state, &name, None)?;
    Ok(Json(json!({"name": name, "ready": true})))
}

/// `GET /v2/models/{m}/versions/{v}/ready`.
pub async fn model_version_ready(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> V2Result<Json<Value>> {
    serving(&state, &name, Some(parse_version(&name, &version)?))?;
    Ok(Json(json!({"name": name, "ready": true})))
}

/// `GET /v2/models/{m}/config`: the Triton model configuration (protobuf JSON field names).
pub async fn model_config(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> V2Result<Json<Value>> {
    let model = described(&state, &name, None).await?;
    Ok(Json(config_json(&model)))
}

/// `GET /v2/models/{m}/versions/{v}/config`.
pub async fn model_version_config(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> V2Result<Json<Value>> {
    let model = described(&state, &name, Some(parse_version(&name, &version)?)).await?;
    Ok(Json(config_json(&model)))
}

/// Triton's `instance_group`: one group per device, `count` instances on it; a GPU group names
/// its device in `gpus` (Triton puts `count` instances on each GPU listed).
fn instance_groups(model: &ServingModel) -> Vec<Value> {
    device_groups(model)
        .into_iter()
        .map(|(gpu, count)| match gpu {
            Some(n) => json!({
                "name": model.name,
                "kind": "KIND_GPU",
                "count": count,
                "gpus": [n],
            }),
            None => json!({"name": model.name, "kind": "KIND_CPU", "count": count}),
        })
        .collect()
}

/// A model's instances grouped by device: the GPU's index (`None` for the CPU) and how many
/// instances run there, in the order the devices first appear.
pub(crate) fn device_groups(model: &ServingModel) -> Vec<(Option<u64>, usize)> {
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for d in &model.instance_devices {
        match groups.iter_mut().find(|(g, _)| g == d) {
            Some((_, count)) => *count += 1,
            None => groups.push((d, 1)),
        }
    }
    groups
        .into_iter()
        .map(|(device, count)| {
            let gpu = device
                .strip_prefix("cuda:")
                .map(|n| n.parse::<u64>().unwrap_or(0));
            (gpu, count)
        })
        .collect()
}

fn config_json(model: &ServingModel) -> Value {
    let spec = &model.spec;
    let b = &spec.batching;
    let policy = match &spec.version_policy {
        VersionPolicy::Latest(n) => json!({"latest": {"num_versions": n}}),
        VersionPolicy::Specific(v) => json!({"specific": {"versions": v}}),
        VersionPolicy::All(_) => json!({"all": {}}),
    };
    json!({
        "name": model.name,
        "platform": "pytorch_libtorch",
        "backend": "pytorch",
        "version_policy": policy,
        "max_batch_size": b.max_batch_size,
        "input": model.codec.v2_inputs().iter().map(|t| t.config_json()).collect::<Vec<_>>(),
        "output": model.codec.v2_outputs().iter().map(|t| t.config_json()).collect::<Vec<_>>(),
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": (b.max_queue_delay_ms * 1000.0).round() as u64,
            "preserve_ordering": false,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": b.timeout_ms * 1000,
                "allow_timeout_override": true,
                "max_queue_size": b.queue_capacity,
            },
        },
        "instance_group": instance_groups(model),
        "parameters": {},
    })
}

fn duration(count: u64, ns: u64) -> Value {
    json!({"count": count, "ns": ns})
}

fn stats_json(model: &ServingModel) -> Value {
    let s = model.stats();
    let (ok, ok_ns) = model.metrics.success.get();
    let (fail, fail_ns) = model.metrics.failure.get();
    let computed = s.inferred_items;
    json!({
        "name": model.name,
        "version": model.version.to_string(),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inferred_rows,
        "execution_count": s.forward_passes,
        "inference_stats": {
            "success": duration(ok, ok_ns),
            "fail": duration(fail, fail_ns),
            "queue": duration(computed, s.queue_ns),
            "compute_input": duration(computed, s.input_ns),
            "compute_infer": duration(computed, s.infer_ns),
            "compute_output": duration(computed, s.output_ns),
            "cache_hit": duration(0, 0),
            "cache_miss": duration(0, 0),
        },
        "batch_stats": [],
    })
}

/// The serving versions statistics cover: every model's (`name` `None`), or one model's,
/// whose unknown name is a 404.
pub(crate) fn stats_scope(
    state: &AppState,
    name: Option<&str>,
) -> Result<Vec<Arc<ServingModel>>, ApiError> {
    let serving = |e: &crate::registry::ModelEntry| -> Vec<Arc<ServingModel>> {
        e.versions
            .values()
            .filter_map(|v| v.serving.clone())
            .collect()
    };
    match name {
        None => Ok(state
            .registry
            .list()
            .iter()
            .flat_map(|(_, e)| serving(e))
            .collect()),
        Some(name) => state
            .registry
            .entry(name)
            .map(|e| serving(&e))
            .ok_or_else(|| ApiError::ModelNotFound(format!("model '{name}' not found"))),
    }
}

/// `GET /v2/models/stats`: every ready model version.
pub async fn all_stats(State(state): State<AppState>) -> V2Result<Json<Value>> {
    let stats: Vec<Value> = stats_scope(&state, None)?
        .iter()
        .map(|s| stats_json(s))
        .collect();
    Ok(Json(json!({ "model_stats": stats })))
}

/// `GET /v2/models/{m}/stats`: every ready version of one model.
pub async fn model_stats(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> V2Result<Json<Value>> {
    let stats: Vec<Value> = stats_scope(&state, Some(&name))?
        .iter()
        .map(|s| stats_json(s))
        .collect();
    Ok(Json(json!({ "model_stats": stats })))
}

/// `GET /v2/models/{m}/versions/{v}/stats`.
pub async fn model_version_stats(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> V2Result<Json<Value>> {
    let model = serving(&state, &name, Some(parse_version(&name, &version)?))?;
    Ok(Json(json!({ "model_stats": [stats_json(&model)] })))
}

/// `POST /v2/models/{m}/infer`.
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> V2Result<Response> {
    let model = take_model(&state, &name, None, &headers)
        .await
        .map_err(V2Error::from)?;
    run_infer(model, headers, body).await
}

/// `POST /v2/models/{m}/versions/{v}/infer`.
pub async fn infer_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> V2Result<Response> {
    let version = Some(parse_version(&name, &version)?);
    let model = take_model(&state, &name, version, &headers)
        .await
        .map_err(V2Error::from)?;
    run_infer(model, headers, body).await
}

async fn run_infer(
    model: ModelLease,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> V2Result<Response> {
    count_outcome(&model, answer_inference(model.clone(), headers, body)).await
}

async fn answer_inference(
    model: ModelLease,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> V2Result<Response> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body too large: {}", r.body_text()))
        } else {
            ApiError::BadRequest(format!("cannot read request body: {}", r.body_text()))
        }
    })?;
    let header_len = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("{HEADER_LENGTH} must be a byte count"))
                })?,
        ),
    };
    let request_id = headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Decoding (images, tokens, large JSON) runs off the async workers, and stops before
    // decoding the inputs once the client has left or the header's deadline has passed.
    let (wanted, _alive) = StillWanted::new(deadline(&headers, &model, None)?);
    let decoding = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || -> Result<_, V2Error> {
            let request = if header_len == Some(0) {
                raw_request(&model, &body)?
            } else {
                v2::parse_request(&body, header_len)?
            };
            wanted.check()?;
            let (items, rows) = model.codec.decode_v2(request.inputs.clone())?;
            Ok((request, items, rows))
        })
    };
    let (request, items, rows) = decoding
        .await
        .map_err(|e| ApiError::Internal(format!("decoding task failed: {e}")))??;
    if rows > model.spec.batching.max_batch_size && items.len() == 1 {
        return Err(ApiError::BadRequest(format!(
            "batch of {rows} exceeds max_batch_size {} of model '{}'",
            model.spec.batching.max_batch_size, model.name
        ))
        .into());
    }
    let timeout = request.timeout_us.map(Duration::from_micros);
    let deadline = deadline(&headers, &model, timeout)?;
    let results = model
        .batched()
        .map_err(ApiError::from)?
        .infer(items, deadline)
        .await
        .map_err(ApiError::from)?;
    let outputs = model
        .codec
        .encode_v2(&results, request.outputs.as_deref())?;
    let id = request.id.clone().unwrap_or(request_id);
    let (body, header_len) = v2::encode_response(
        &model.name,
        model.version,
        &id,
        outputs,
        request.outputs.as_deref(),
        request.binary_output,
    );
    let mut response = body.into_response();
    let h = response.headers_mut();
    match header_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(with_timing(response, &model, &results))
}

/// `Inference-Header-Content-Length: 0`: the whole body is the model's single input. An image
/// model takes it as one encoded image; a tensor input as raw little-endian data whose batch
/// size follows from its length.
fn raw_request(model: &ServingModel, body: &[u8]) -> Result<v2::V2Request, CodecError> {
    let inputs = model.codec.v2_inputs();
    let [input] = inputs.as_slice() else {
        return Err(CodecError::Invalid(format!(
            "a raw body (Inference-Header-Content-Length: 0) needs a model with one input; '{}' has {}",
            model.name,
            inputs.len()
        )));
    };
    let data = if model.codec.takes_encoded() || input.datatype == v2::V2Type::Bytes {
        v2::V2Data::Bytes(vec![body.to_vec()])
    } else {
        let v2::V2Type::Tensor(dtype) = input.datatype else {
            unreachable!("checked above")
        };
        if input.dims.iter().any(|&d| d < 0) {
            return Err(CodecError::Invalid(format!(
                "input '{}' has variable dimensions; a raw body cannot say its shape",
                input.name
            )));
        }
        let row: usize = input.dims.iter().map(|&d| d as usize).product::<usize>() * dtype.size();
        if row == 0 || body.is_empty() || !body.len().is_multiple_of(row) {
            return Err(CodecError::Invalid(format!(
                "a raw body of {} bytes is not a whole number of {}-byte rows of input '{}'",
                body.len(),
                row,
                input.name
            )));
        }
        let mut shape = vec![body.len() / row];
        shape.extend(input.dims.iter().map(|&d| d as usize));
        v2::V2Data::Tensor(
            crate::tensor::HostTensor::new(dtype, shape, body.to_vec())
                .map_err(|e| CodecError::Invalid(e.to_string()))?,
        )
    };
    let shape = match &data {
        v2::V2Data::Bytes(_) => vec![1],
        v2::V2Data::Tensor(t) => t.shape.clone(),
    };
    Ok(v2::V2Request {
        id: None,
        inputs: vec![V2Input {
            name: input.name.clone(),
            shape,
            data,
        }],
        outputs: None,
        binary_output: false,
        timeout_us: None,
    })
}

/// One line of the repository index.
pub(crate) struct IndexEntry {
    pub name: String,
    /// `None` for a model with no version in memory or on disk yet.
    pub version: Option<String>,
    /// Triton's state names: READY, LOADING, UNLOADING, UNAVAILABLE.
    pub state: &'static str,
    pub reason: String,
}

/// Every model in the repository with its versions' states (only the ready ones when
/// `ready_only`).
pub(crate) fn repository_entries(state: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    for (name, entry) in state.registry.list() {
        if entry.versions.is_empty() {
            if !ready_only {
                let reason = entry.error.clone().unwrap_or_else(|| "not loaded".into());
                out.push(IndexEntry {
                    name: name.clone(),
                    version: None,
                    state: "UNAVAILABLE",
                    reason,
                });
            }
            continue;
        }
        for (version, v) in &entry.versions {
            let state_name = match v.state {
                ModelState::Ready => "READY",
                ModelState::Loading => "LOADING",
                ModelState::Unloading => "UNLOADING",
                // Triton's states have no "unloaded": the reason says it
                ModelState::Unavailable | ModelState::Failed | ModelState::Unloaded => {
                    "UNAVAILABLE"
                }
            };
            if ready_only && state_name != "READY" {
                continue;
            }
            out.push(IndexEntry {
                name: name.clone(),
                version: Some(version.to_string()),
                state: state_name,
                reason: match (&v.reason, v.state) {
                    (Some(r), _) => r.clone(),
                    (None, ModelState::Unloaded) => "unloaded: the first request loads it".into(),
                    (None, _) => String::new(),
                },
            });
        }
    }
    out
}

/// `POST /v2/repository/index`: every model in the repository with its versions' states.
pub async fn repository_index(State(state): State<AppState>, body: Bytes) -> V2Result<Json<Value>> {
    let ready_only = if body.is_empty() {
        false
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
        v.get("ready").and_then(Value::as_bool).unwrap_or(false)
    };
    let out = repository_entries(&state, ready_only)
        .into_iter()
        .map(|e| match e.version {
            None => json!({"name": e.name, "state": e.state, "reason": e.reason}),
            Some(v) => json!({"name": e.name, "version": v, "state": e.state, "reason": e.reason}),
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

/// Whether the model-control mode lets a client load and unload models.
pub(crate) fn control_allowed(state: &AppState) -> Result<(), ApiError> {
    if state.settings.model_control.allows_management() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "explicit model load / unload is not allowed: model control mode is '{}' (start with --model-control explicit or lazy)",
            state.settings.model_control.as_str()
        )))
    }
}

/// Refuses Triton load parameters this server does not implement (config/file overrides).
pub(crate) fn check_load_parameters<'a>(
    mut names: impl Iterator<Item = &'a str>,
) -> Result<(), ApiError> {
    match names.find(|k| *k == "config" || k.starts_with("file:")) {
        Some(k) => Err(ApiError::BadRequest(format!(
            "load parameter '{k}' is not supported: put the model and its model.toml in the repository"
        ))),
        None => Ok(()),
    }
}

fn check_load_body(body: &Bytes) -> V2Result<()> {
    if body.is_empty() {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    if let Some(params) = v.get("parameters").and_then(Value::as_object) {
        check_load_parameters(params.keys().map(String::as_str))?;
    }
    Ok(())
}

/// `POST /v2/repository/models/{m}/load`.
pub async fn repository_load(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> V2Result<Json<Value>> {
    control_allowed(&state)?;
    check_load_body(&body)?;
    state.registry.load(&name).await.map_err(ApiError::from)?;
    Ok(Json(json!({})))
}

/// `POST /v2/repository/models/{m}/unload`.
pub async fn repository_unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    _body: Bytes,
) -> V2Result<Json<Value>> {
    control_allowed(&state)?;
    state.registry.unload(&name).await.map_err(ApiError::from)?;
    Ok(Json(json!({})))
}
