//! The HTTP layer: router assembly, middleware (request id, logging, metrics, body limit) and
//! one module per API surface. It knows requests, responses and the registry, never libtorch.

mod admin;
mod error;
mod health;
mod inference;
mod metrics;
mod models;
mod v1;
mod v2;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ModelControl;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::{field::Empty, Instrument};

pub use self::error::{ApiError, ErrorLog};
use crate::registry::Registry;
use crate::telemetry::Metrics;

/// The request id header: taken from the client when present, else a new UUID v4.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most instances in one /v1 request.
    pub max_instances: usize,
    /// Whether the management API may change the loaded models.
    pub model_control: ModelControl,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 << 20,
            max_instances: 1024,
            model_control: ModelControl::None,
        }
    }
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<HttpSettings>,
}

/// What a prediction handler tells the logging middleware (a response extension).
#[derive(Debug, Clone)]
pub struct InferenceLog {
    pub model: String,
    pub version: u64,
    pub batch_size: usize,
    pub queue_time: Duration,
    pub compute_time: Duration,
}

/// The whole application.
pub fn app(state: AppState) -> Router {
    let max_body = state.settings.max_body_bytes;
    Router::new()
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(metrics::render))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{name}", get(models::describe))
        .route(
            "/v1/models/{name}/versions/{version}",
            get(models::describe_version),
        )
        .route("/v1/models/{name}/predict", post(v1::predict))
        .route(
            "/v1/models/{name}/versions/{version}/predict",
            post(v1::predict_version),
        )
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2/models/stats", get(v2::all_stats))
        .route("/v2/models/{name}", get(v2::model_metadata))
        .route("/v2/models/{name}/ready", get(v2::model_ready))
        .route("/v2/models/{name}/config", get(v2::model_config))
        .route("/v2/models/{name}/stats", get(v2::model_stats))
        .route("/v2/models/{name}/infer", post(v2::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(v2::model_version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(v2::model_version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(v2::model_version_config),
        )
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(v2::model_version_stats),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(v2::infer_version),
        )
        .route("/v2/repository/index", post(v2::repository_index))
        .merge(admin_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
                .layer(middleware::from_fn_with_state(state.clone(), observe))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
                // gzip / deflate bodies both ways; the body limit applies to the decompressed
                // bytes, so a compression bomb is refused like any large body
                .layer(CompressionLayer::new())
                .layer(RequestDecompressionLayer::new()),
        )
        .with_state(state)
}

/// The management routes, under one router so that one layer (admin authentication) can wrap
/// them all.
fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models/{name}/load", post(admin::load))
        .route("/v1/models/{name}/unload", post(admin::unload))
        .route("/v1/models/{name}/reload", post(admin::reload))
        .route("/v1/models/{name}", axum::routing::delete(admin::unload))
        .route(
            "/v2/repository/models/{name}/load",
            post(v2::repository_load),
        )
        .route(
            "/v2/repository/models/{name}/unload",
            post(v2::repository_unload),
        )
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::RouteNotFound(format!("{method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Keeps the in-flight gauge right even when the client leaves mid-request.
struct InFlight(Arc<Metrics>);
impl InFlight {
    fn new(m: &Arc<Metrics>) -> Self {
        m.http_in_flight.inc();
        Self(m.clone())
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.http_in_flight.dec();
    }
}

/// One span per request carrying its id, one log line at the end, HTTP metrics by route
/// template (never by raw path).
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::new(&state.metrics);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %method,
        route = %route,
        status = Empty,
        model = Empty,
        version = Empty,
    );
    let response = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status();
    state
        .metrics
        .observe_http(&route, method.as_str(), status.as_u16(), elapsed);
    span.record("status", status.as_u16());
    let total_ms = elapsed.as_secs_f64() * 1e3;
    let _enter = span.enter();
    if let Some(err) = response.extensions().get::<ErrorLog>() {
        let line = format!("{} {} {}", method, route, status.as_u16());
        if status.is_server_error() && status.as_u16() != 503 {
            tracing::error!(total_ms, code = err.code, error = %err.message, "{line}");
        } else {
            tracing::info!(total_ms, code = err.code, error = %err.message, "{line}");
        }
    } else if let Some(log) = response.extensions().get::<InferenceLog>() {
        span.record("model", log.model.as_str());
        span.record("version", log.version);
        tracing::info!(
            batch_size = log.batch_size,
            queue_ms = log.queue_time.as_secs_f64() * 1e3,
            compute_ms = log.compute_time.as_secs_f64() * 1e3,
            total_ms,
            "{} {} {}",
            method,
            route,
            status.as_u16()
        );
    } else if route.starts_with("/health") || route == "/metrics" {
        tracing::debug!(total_ms, "{} {} {}", method, route, status.as_u16());
    } else {
        tracing::info!(total_ms, "{} {} {}", method, route, status.as_u16());
    }
    response
}

/// Helper for handlers: a JSON response with a status.
pub(crate) fn json_response(status: axum::http::StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}
