//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::{json_response, AppState};

/// `GET /health/live`: the process is up and serving HTTP.
pub async fn live() -> Response {
    json_response(StatusCode::OK, json!({"status": "live"}))
}

/// `GET /health/ready`: 200 once every model required at start-up is loaded and warm, else
/// 503 with the models still awaited.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "shutting_down"}),
        );
    }
    let r = state.registry.readiness();
    if r.ready {
        json_response(StatusCode::OK, json!({"status": "ready"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not_ready", "waiting_for": r.waiting_for}),
        )
    }
}
