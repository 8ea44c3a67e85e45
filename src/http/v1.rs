//! `/v1`: the native prediction API.
//!
//! `POST /v1/models/{name}[/versions/{v}]/predict` takes `{"instances": [...]}` as JSON, or one
//! raw image (`image/png`, `image/jpeg`), and answers
//! `{"model", "version", "predictions": [...]}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::inference::{
    count_outcome, deadline, decode_inline_or_blocking, take_model, with_timing, StillWanted,
};
use super::{ApiError, AppState};
use crate::codec::v1::{parse_request, Parameters, Scores};
use crate::registry::{ModelLease, ServingModel};
use crate::tensor::{Inferred, Item};

/// curl's `-d` default Content-Type.
const FORM_URLENCODED: &str = "application/x-www-form-urlencoded";

/// `?top_k=k&scores=all`: the same output options as the body's `parameters`, which they
/// override (other query parameters are ignored).
#[derive(Debug, Default, serde::Deserialize)]
pub struct PredictQuery {
    top_k: Option<usize>,
    scores: Option<Scores>,
}

pub async fn predict(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<PredictQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let model = take_model(&state, &name, None, &headers).await?;
    serve_prediction(state, model, query, headers, body).await
}

pub async fn predict_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    query: Result<Query<PredictQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let version: u64 = version.parse().map_err(|_| {
        ApiError::ModelNotFound(format!("model '{name}' has no version '{version}'"))
    })?;
    let model = take_model(&state, &name, Some(version), &headers).await?;
    serve_prediction(state, model, query, headers, body).await
}

/// Answers one prediction on `model`, counting its outcome.
async fn serve_prediction(
    state: AppState,
    model: ModelLease,
    query: Result<Query<PredictQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    count_outcome(
        &model,
        answer_prediction(&state, &model, query, &headers, body),
    )
    .await
}

async fn answer_prediction(
    state: &AppState,
    model: &ModelLease,
    query: Result<Query<PredictQuery>, QueryRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let deadline = deadline(headers, model, None)?;
    // decoding stops between instances once the client has left or the deadline has passed
    let (wanted, _alive) = StillWanted::new(deadline);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let Query(PredictQuery { top_k, scores }) = query
        .map_err(|e| ApiError::InvalidInput(format!("bad query string: {}", e.body_text())))?;
    let query = Parameters { top_k, scores };
    let mut params = query;

    let items = match content_type.as_deref() {
        // no type, JSON, or curl -d's form default (taken when it is JSON, as TF Serving and
        // TorchServe do)
        ct @ (None | Some("application/json" | FORM_URLENCODED)) => {
            let form = ct == Some(FORM_URLENCODED);
            let (items, body_params) =
                decode_json(state, model, body, form, wanted.clone()).await?;
            params = query.or(body_params);
            items
        }
        Some(ct) if ct.ends_with("+json") => {
            let (items, body_params) =
                decode_json(state, model, body, false, wanted.clone()).await?;
            params = query.or(body_params);
            items
        }
        Some("image/png" | "image/jpeg" | "image/jpg" | "application/octet-stream") => {
            if !model.codec.takes_encoded() {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "model '{}' is a {} model; send JSON {{\"instances\": [...]}}",
                    model.name,
                    model.codec.kind()
                )));
            }
            let item = decode_inline_or_blocking(model, body, move |m, b| {
                wanted.check()?;
                m.codec.decode_encoded(&b).map_err(ApiError::from)
            })
            .await?;
            vec![item]
        }
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "unsupported Content-Type '{other}': use application/json, image/png or image/jpeg"
            )))
        }
    };

    let results = model.batched()?.infer(items, deadline).await?;
    let opts = params.output_options();
    let predictions: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            model
                .codec
                .encode_prediction(r, opts)
                .map_err(|e| ApiError::InvalidInput(format!("instance {i}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(respond(model, &results, predictions))
}

pub(super) fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!("request body too large: {}", rejection.body_text()))
    } else {
        ApiError::MalformedBody(format!(
            "cannot read request body: {}",
            rejection.body_text()
        ))
    }
}

/// Decodes a JSON body; `form` says it came as `application/x-www-form-urlencoded`, which is
/// refused as 415 unless it is JSON.
async fn decode_json(
    state: &AppState,
    model: &Arc<ServingModel>,
    body: Bytes,
    form: bool,
    wanted: StillWanted,
) -> Result<(Vec<Item>, Parameters), ApiError> {
    let max = state.settings.max_instances;
    decode_inline_or_blocking(model, body, move |m, b| {
        let req = parse_request(&b).map_err(|e| match ApiError::json_body(e, V1_SHAPE) {
            ApiError::MalformedBody(msg) if form => ApiError::UnsupportedMediaType(format!(
                "a body sent as {FORM_URLENCODED} is taken only when it is JSON ({msg}); \
                 send {{\"instances\": [...]}} as application/json"
            )),
            other => other,
        })?;
        if req.instances.is_empty() {
            return Err(ApiError::InvalidInput(
                "\"instances\" is empty: send at least one instance".into(),
            ));
        }
        ApiError::at_most(req.instances.len(), max, "instances")?;
        let items = req
            .instances
            .iter()
            .enumerate()
            .map(|(i, v)| {
                wanted.check()?;
                m.codec
                    .decode_instance(v)
                    .map_err(|e| ApiError::from(e).about(format_args!("instance {i}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, req.parameters.unwrap_or_default()))
    })
    .await
}

/// Syntax errors are malformed bodies (400); well-formed JSON of the wrong shape is 422.
const V1_SHAPE: &str =
    "{\"instances\": [...], \"parameters\"?: {\"top_k\"?: n, \"scores\"?: \"all\"}}";

fn respond(model: &ModelLease, results: &[Inferred], predictions: Vec<Value>) -> Response {
    let body = json!({
        "model": model.name,
        "version": model.version,
        "predictions": predictions,
    });
    with_timing((StatusCode::OK, Json(body)).into_response(), model, results)
}
