//! `GET /metrics`: the Prometheus text exposition.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::AppState;

pub async fn render(State(state): State<AppState>) -> Response {
    state.registry.refresh_gauges();
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
