//! `POST /v1/rerank`: documents ranked by relevance to a query, served by `reranker` models
//! (cross-encoders), in the shape Cohere's and Jina's clients use (text-embeddings-inference's
//! own `/rerank` takes `texts` and answers a bare array: see docs/API.md).
//!
//! Request: `{"model", "query", "documents": ["text" | {"text"}, ...], "top_n"?,
//! "return_documents"?}`. Answer: `{"id", "model", "results": [{"index", "relevance_score",
//! "document"?: {"text"}}], "usage": {"total_tokens"}}`, best first. Each (query, document)
//! pair is one item in the model's queue, so the pairs of one request share forward passes
//! with other requests' pairs.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::inference::{
    blocking_if_large, count_outcome, deadline, take_model, with_timing, StillWanted,
};
use super::v1::body_error;
use super::{ApiError, AppState, REQUEST_ID};
use crate::registry::ServingModel;
use crate::tensor::Item;

#[derive(Debug, Deserialize)]
struct RerankRequest {
    model: String,
    query: String,
    documents: Vec<Document>,
    #[serde(default)]
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: bool,
}

/// A document: a string, or `{"text": "..."}` (Cohere's older shape).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    fn text(&self) -> &str {
        match self {
            Document::Text(t) | Document::Object { text: t } => t,
        }
    }
}

pub async fn rerank(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let size = body.len();
    let req = blocking_if_large(size, move || parse(&body)).await?;
    let max = state.settings.max_instances;
    if req.documents.is_empty() {
        return Err(ApiError::InvalidInput(
            "\"documents\" is empty: send at least one".into(),
        ));
    }
    ApiError::at_most(req.documents.len(), max, "documents")?;
    if req.top_n == Some(0) {
        return Err(ApiError::InvalidInput(
            "top_n is at least 1 (leave it out for every document)".into(),
        ));
    }
    let model = take_model(&state, &req.model, None, &headers).await?;
    if model.codec.pair_scorer().is_none() {
        return Err(ApiError::BadRequest(format!(
            "model '{}' is a {} model; /v1/rerank serves reranker models",
            model.name,
            model.codec.kind()
        )));
    }
    let id = headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    count_outcome(&model, async {
        let deadline = deadline(&headers, &model, None)?;
        let m = model.clone();
        // the query is tokenised with every document: that, not the body, is the work
        let work = size.saturating_add(req.query.len().saturating_mul(req.documents.len()));
        let (wanted, _alive) = StillWanted::new(deadline);
        let (items, req) =
            blocking_if_large(work, move || Ok((pairs(&m, &req, &wanted)?, req))).await?;
        let results = model.batched()?.infer(items, deadline).await?;
        let scorer = model.codec.pair_scorer().expect("checked before");
        let mut ranked = Vec::with_capacity(results.len());
        for (i, r) in results.iter().enumerate() {
            let (score, logit) = scorer.relevance(r);
            if !logit.is_finite() {
                return Err(ApiError::InvalidInput(format!(
                    "document {i}: the model's score is not finite (NaN or infinity)"
                )));
            }
            ranked.push((i, score));
        }
        // best first; equal scores keep the documents' order
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(req.top_n.unwrap_or(usize::MAX));
        let out: Vec<Value> = ranked
            .iter()
            .map(|&(i, score)| {
                let mut r = json!({"index": i, "relevance_score": score});
                if req.return_documents {
                    r["document"] = json!({"text": req.documents[i].text()});
                }
                r
            })
            .collect();
        let tokens: usize = results.iter().map(|r| r.tokens).sum();
        let body = json!({
            "id": id,
            "model": model.name,
            "results": out,
            "usage": {"total_tokens": tokens},
        });
        Ok(with_timing(
            (StatusCode::OK, axum::Json(body)).into_response(),
            &model,
            &results,
        ))
    })
    .await
}

fn parse(body: &[u8]) -> Result<RerankRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::json_body(
            e,
            "{\"model\": \"...\", \"query\": \"...\", \"documents\": [\"...\", ...], \"top_n\"?: n, \"return_documents\"?: bool}",
        )
    })
}

/// Every (query, document) pair as an item; stops early once the client has left or the
/// deadline has passed.
fn pairs(
    model: &ServingModel,
    req: &RerankRequest,
    wanted: &StillWanted,
) -> Result<Vec<Item>, ApiError> {
    let scorer = model.codec.pair_scorer().expect("checked before");
    req.documents
        .iter()
        .enumerate()
        .map(|(i, d)| {
            wanted.check()?;
            scorer
                .pair(&req.query, d.text())
                .map_err(|e| ApiError::from(e).about(format_args!("document {i}")))
        })
        .collect()
}
