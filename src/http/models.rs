//! `/v1/models`: what the server knows about its models (read-only).
//!
//! `GET /v1/models` lists every model in the repository or loaded; `GET /v1/models/{name}`
//! (and `/versions/{v}`) describes one: kind, signature, labels, versions with their states,
//! device, batching and live counters.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::config::model_spec::{ModelSpec, TensorSpec};
use crate::registry::{ModelEntry, ServingModel, VersionEntry};

/// `{"models": [...]}`, the API's own list, and beside it OpenAI's list-models shape
/// (`"object": "list"`, `"data": [{"id", "object", "created", "owned_by"}]`) so that OpenAI's
/// clients can list the models too.
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let listed = state.registry.list();
    let models: Vec<Value> = listed
        .iter()
        .map(|(name, entry)| summary(name, entry))
        .collect();
    let data: Vec<Value> = listed
        .iter()
        .map(|(name, entry)| {
            let created = entry.default_version().map_or(0, |s| loaded_at_secs(s));
            super::openai::list_entry(name, created)
        })
        .collect();
    Json(json!({"models": models, "object": "list", "data": data}))
}

/// When a serving copy was loaded, in seconds since the Unix epoch.
fn loaded_at_secs(s: &ServingModel) -> u64 {
    s.loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn describe(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(model_json(&state, &name, None)?))
}

pub async fn describe_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let v: u64 = version.parse().map_err(|_| {
        ApiError::ModelNotFound(format!("model '{name}' has no version '{version}'"))
    })?;
    Ok(Json(model_json(&state, &name, Some(v))?))
}

/// The JSON of one model (all versions, or just `version`). A loaded copy describes it from
/// memory; model.toml is read from disk only for a model (or version) that has none.
pub fn model_json(state: &AppState, name: &str, version: Option<u64>) -> Result<Value, ApiError> {
    let spec_on_disk = || state.registry.spec_on_disk(name);
    let (entry, mut on_disk) = match state.registry.entry(name) {
        Some(e) => (e, None),
        None => match spec_on_disk() {
            Ok(found) => (Arc::new(ModelEntry::default()), Some(Ok(found))),
            Err(_) => return Err(ApiError::ModelNotFound(format!("model '{name}' not found"))),
        },
    };
    let versions: Vec<(u64, &VersionEntry)> = entry
        .versions
        .iter()
        .filter(|(v, _)| version.is_none_or(|want| **v == want))
        .map(|(v, e)| (*v, e))
        .collect();
    if let Some(v) = version {
        if versions.is_empty() {
            return Err(ApiError::ModelNotFound(format!(
                "model '{name}' has no version {v}"
            )));
        }
    }
    // The spec of the serving copy (newest first), else the one on disk.
    let serving: Option<&Arc<ServingModel>> =
        versions.iter().rev().find_map(|(_, e)| e.serving.as_ref());
    if serving.is_none() && on_disk.is_none() {
        on_disk = Some(spec_on_disk());
    }
    let spec: Option<&ModelSpec> = serving.map(|s| s.spec.as_ref()).or(on_disk
        .as_ref()
        .and_then(|d| d.as_ref().ok())
        .map(|(_, s)| s));
    let mut out = summary(name, &entry);
    let obj = out.as_object_mut().expect("summary is an object");
    if let Some(v) = version {
        let ve = &versions[0].1;
        obj.insert("state".into(), json!(ve.state));
        obj.insert("reason".into(), json!(ve.reason));
        obj.insert("versions".into(), json!([version_json(v, ve)]));
    }
    if let Some(spec) = spec {
        obj.insert("kind".into(), json!(spec.kind.to_string()));
        obj.insert("description".into(), json!(spec.description));
        obj.insert("inputs".into(), tensors_json(&spec.inputs));
        obj.insert("outputs".into(), tensors_json(&spec.outputs));
        obj.insert("labels".into(), json!(spec.labels));
        obj.insert("instances".into(), json!(spec.instances));
        obj.insert("pinned".into(), json!(spec.pinned));
        obj.insert("batching".into(), batching_json(spec));
        obj.insert("version_policy".into(), json!(spec.version_policy));
    }
    if let (Some(Err(reason)), None) = (&on_disk, serving) {
        obj.insert("reason".into(), json!(reason));
    }
    Ok(out)
}

/// Name, overall state, default version and per-version states: the listing's row.
fn summary(name: &str, entry: &ModelEntry) -> Value {
    let default = entry.default_version();
    json!({
        "name": name,
        "state": entry.state(),
        "reason": entry.reason(),
        "default_version": default.map(|s| s.version),
        "device": default.map(|s| s.device.clone()),
        "batching": default.map(|s| batching_json(&s.spec)),
        "versions": entry
            .versions
            .iter()
            .map(|(v, e)| version_json(*v, e))
            .collect::<Vec<_>>(),
    })
}

fn version_json(version: u64, e: &VersionEntry) -> Value {
    let mut v = json!({
        "version": version,
        "state": e.state,
        "reason": e.reason,
    });
    if let Some(s) = &e.serving {
        let stats = s.stats();
        let obj = v.as_object_mut().expect("object");
        obj.insert("device".into(), json!(s.device));
        obj.insert("instance_devices".into(), json!(s.instance_devices));
        obj.insert("precision".into(), json!(s.spec.precision));
        obj.insert("memory_bytes".into(), json!(s.footprint()));
        obj.insert("load_ms".into(), json!(s.load_time.as_millis() as u64));
        obj.insert("warmup_ms".into(), json!(s.warmup_time.as_millis() as u64));
        obj.insert("loaded_at".into(), json!(loaded_at_secs(s)));
        obj.insert(
            "stats".into(),
            json!({
                "requests": stats.requests,
                "rejected": stats.rejected,
                "dropped": stats.dropped,
                "timed_out": stats.timed_out,
                "failed_rows": stats.failed_rows,
                "inferred_rows": stats.inferred_rows,
                "forward_passes": stats.forward_passes,
                "average_batch_size": stats.average_batch_size(),
                "queued": s.runner.queued(),
            }),
        );
        if let Some(g) = s.generator() {
            let geometry = g.scheduler().geometry();
            obj.insert(
                "generation".into(),
                json!({
                    "context_length": g.context_len(),
                    "kv_cache_tokens": g.kv_capacity(),
                    "kv_cache_tokens_budgeted": g.kv_capacity_budgeted(),
                    "kv_block_size": geometry.block_size,
                    "kv_block_bytes": geometry.bytes_per_block,
                    "quantization": g.settings().quantization().map(|q| q.name()),
                    "quantization_group_size": g.settings().quantization().and_then(|q| q.group_size()),
                    "chat_template": g.has_chat_template(),
                    "scheduler": g.scheduler().state(),
                }),
            );
        }
        if stats.real_tokens > 0 {
            let st = obj["stats"].as_object_mut().expect("object");
            st.insert("real_tokens".into(), json!(stats.real_tokens));
            st.insert("padded_tokens".into(), json!(stats.padded_tokens));
            st.insert("padding_waste".into(), json!(stats.padding_waste()));
        }
    }
    v
}

fn batching_json(spec: &ModelSpec) -> Value {
    let b = &spec.batching;
    let mut v = json!({
        "max_batch_size": b.max_batch_size,
        "max_queue_delay_ms": b.max_queue_delay_ms,
        "queue_capacity": b.queue_capacity,
        "timeout_ms": b.timeout_ms,
    });
    if let Some(t) = &spec.token_batching {
        let obj = v.as_object_mut().expect("object");
        obj.insert("max_batch_tokens".into(), json!(t.max_batch_tokens));
        obj.insert("sequence_buckets".into(), json!(t.sequence_buckets));
        obj.insert("group_by_length".into(), json!(t.group_by_length));
    }
    v
}

/// Tensor specs with -1 for the batch dimension.
fn tensors_json(specs: &[TensorSpec]) -> Value {
    Value::Array(
        specs
            .iter()
            .map(|t| {
                let mut shape = vec![-1i64];
                shape.extend(&t.dims);
                json!({"name": t.name, "datatype": t.datatype, "shape": shape})
            })
            .collect(),
    )
}
