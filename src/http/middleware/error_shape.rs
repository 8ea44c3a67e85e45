//! Gives error answers that no handler or middleware of ours wrote the route's error shape.
//!
//! It remains for answers we do not build: axum's extractor rejections (a path parameter that
//! is not UTF-8, a body that cannot be read) come as plain text from inside axum, before any
//! handler runs. Everything of ours answers through [`Dialect::error_response`] directly and
//! carries [`ErrorLog`], which this layer leaves alone.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::http::{ApiError, Dialect, ErrorLog};

/// Most bytes of a non-JSON error body kept as the message.
const MAX_MESSAGE: usize = 1024;

/// Rewrites a non-JSON error answer (4xx, 5xx) into the route's `dialect`, keeping its status
/// and headers and taking its text as the message.
pub async fn shape_foreign_errors(
    State(dialect): State<Dialect>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let head = req.method() == Method::HEAD;
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || head
        || response.extensions().get::<ErrorLog>().is_some()
        || is_json(response.headers())
    {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_MESSAGE)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let err = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(message),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::InvalidInput(message),
        StatusCode::NOT_FOUND => ApiError::RouteNotFound(format!("{path}: {message}")),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        s if s.is_server_error() => ApiError::Internal(message),
        _ => ApiError::BadRequest(message),
    };
    let mut fixed = dialect.error_response(err);
    *fixed.status_mut() = status;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name, value.clone());
        }
    }
    fixed
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}
