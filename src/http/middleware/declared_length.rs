//! Refuses a body declared too large before anything reads it.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::http::{ApiError, AppState, Dialect};

/// Refuses a body whose declared `Content-Length` is over `--max-body-bytes` with 413 (in the
/// route's `dialect`) before anything reads it, so the client is not sent `100 Continue` and
/// nothing waits for the bytes.
pub async fn refuse_oversized(
    State((state, dialect)): State<(AppState, Dialect)>,
    req: Request,
    next: Next,
) -> Response {
    let max = state.settings.max_body_bytes as u64;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(len) if len > max => dialect.error_response(ApiError::PayloadTooLarge(format!(
            "the request body is {len} bytes; at most {max} are accepted (--max-body-bytes)"
        ))),
        _ => next.run(req).await,
    }
}
