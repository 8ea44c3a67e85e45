//! Keeps a client's `x-request-id` only when it is safe to log and echo back.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use crate::http::REQUEST_ID;

/// Longest client-given `x-request-id` kept; a longer or odd one is replaced by a new id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Drops a client's `x-request-id` unless it is 1 to 128 visible ASCII characters without
/// quotes or backslashes, so that the id layer generates a fresh one: a client id is logged and
/// echoed back, and must neither forge log lines nor be large.
pub async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let ok = req.headers().get(&REQUEST_ID).map(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID_LEN
            && b.iter()
                .all(|&c| c.is_ascii_graphic() && c != b'"' && c != b'\\')
    });
    if ok == Some(false) || req.headers().get_all(&REQUEST_ID).iter().count() > 1 {
        req.headers_mut().remove(&REQUEST_ID);
    }
    next.run(req).await
}
