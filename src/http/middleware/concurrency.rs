//! The server-wide limit on requests served at once.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::http::{ApiError, AppState, Dialect};

/// Refuses a request at once (503 + Retry-After, in the route's `dialect`) while
/// `--max-concurrent-requests` are being served; it never queues.
pub async fn limit_concurrency(
    State((state, dialect)): State<(AppState, Dialect)>,
    req: Request,
    next: Next,
) -> Response {
    match state.concurrency.clone().try_acquire_owned() {
        Ok(permit) => super::hold_while_streaming(next.run(req).await, permit),
        Err(_) => {
            state.metrics.reject("concurrency_limit");
            dialect.error_response(ApiError::Overloaded(format!(
                "the server is serving its limit of {} concurrent requests; retry later",
                state.settings.max_concurrent_requests
            )))
        }
    }
}
