//! Tells keep-alive clients to reconnect elsewhere once a shutdown has begun.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::http::AppState;

/// Once a shutdown has begun, every answer carries `Connection: close`, so that keep-alive
/// clients open a new connection (to another replica) for their next request instead of
/// sending it down one the server is about to close.
pub async fn close_when_draining(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let mut response = next.run(req).await;
    if state.is_shutting_down() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
