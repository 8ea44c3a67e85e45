//! The HTTP layer: router assembly, middleware (request id, logging, metrics, body limit) and
//! one module per API surface. It knows requests, responses and the registry, never libtorch.

mod admin;
pub mod auth;
mod error;
mod guard;
mod health;
mod inference;
mod metrics;
mod models;
mod openai;
mod rerank;
mod v1;
mod v2;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ModelControl;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::{field::Empty, Instrument};

pub use self::auth::{Access, ApiKeys};
pub use self::error::{ApiError, ErrorLog};
use crate::idle_poll::{Busy, IdlePolling};
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
    /// API keys; empty: no authentication (see [`Access`]).
    pub api_keys: ApiKeys,
    /// Whether `/metrics` needs a key (when keys are configured).
    pub metrics_auth: bool,
    /// Whether management is open to any address when no keys are configured.
    pub allow_unauthenticated_admin: bool,
    /// Requests served at once beyond which new ones get 503.
    pub max_concurrent_requests: usize,
    /// `--idle-poll-us`: every request in flight keeps the CPUs polling.
    pub idle_polling: IdlePolling,
    /// `--body-timeout`: the whole request body must arrive within this.
    pub body_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 << 20,
            max_instances: 1024,
            model_control: ModelControl::None,
            api_keys: ApiKeys::default(),
            metrics_auth: false,
            allow_unauthenticated_admin: false,
            max_concurrent_requests: 1024,
            idle_polling: IdlePolling::off(),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<HttpSettings>,
    /// Set at SIGTERM: readiness answers 503 from then on.
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
    concurrency: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, settings: HttpSettings) -> Self {
        let permits = settings.max_concurrent_requests.max(1);
        Self {
            registry,
            metrics,
            settings: Arc::new(settings),
            shutting_down: Arc::default(),
            concurrency: Arc::new(tokio::sync::Semaphore::new(permits)),
        }
    }

    /// Whether a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
    }
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

/// One route of the API: method, path template and who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInfo {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

/// Every route with its handler. The router is built from this table, and the tests check
/// the table against openapi.yaml, so the spec cannot miss a route.
fn table() -> Vec<(RouteInfo, MethodRouter<AppState>)> {
    use Access::*;
    let r = |method, path, access, handler| {
        (
            RouteInfo {
                method,
                path,
                access,
            },
            handler,
        )
    };
    vec![
        r("GET", "/health/live", Public, get(health::live)),
        r("GET", "/health/ready", Public, get(health::ready)),
        r("GET", "/metrics", Metrics, get(metrics::render)),
        r("GET", "/v1/models", Infer, get(models::list)),
        r("GET", "/v1/models/{name}", Infer, get(models::describe)),
        r("POST", "/v1/embeddings", Infer, post(openai::embeddings)),
        r("POST", "/v1/rerank", Infer, post(rerank::rerank)),
        r(
            "GET",
            "/v1/models/{name}/versions/{version}",
            Infer,
            get(models::describe_version),
        ),
        r(
            "POST",
            "/v1/models/{name}/predict",
            Infer,
            post(v1::predict),
        ),
        r(
            "POST",
            "/v1/models/{name}/versions/{version}/predict",
            Infer,
            post(v1::predict_version),
        ),
        r("POST", "/v1/models/{name}/load", Admin, post(admin::load)),
        r(
            "POST",
            "/v1/models/{name}/unload",
            Admin,
            post(admin::unload),
        ),
        r(
            "POST",
            "/v1/models/{name}/reload",
            Admin,
            post(admin::reload),
        ),
        r("DELETE", "/v1/models/{name}", Admin, delete(admin::unload)),
        r("GET", "/v2", Infer, get(v2::server_metadata)),
        r("GET", "/v2/health/live", Public, get(v2::live)),
        r("GET", "/v2/health/ready", Public, get(v2::ready)),
        r("GET", "/v2/models/stats", Infer, get(v2::all_stats)),
        r("GET", "/v2/models/{name}", Infer, get(v2::model_metadata)),
        r(
            "GET",
            "/v2/models/{name}/ready",
            Infer,
            get(v2::model_ready),
        ),
        r(
            "GET",
            "/v2/models/{name}/config",
            Infer,
            get(v2::model_config),
        ),
        r(
            "GET",
            "/v2/models/{name}/stats",
            Infer,
            get(v2::model_stats),
        ),
        r("POST", "/v2/models/{name}/infer", Infer, post(v2::infer)),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}",
            Infer,
            get(v2::model_version_metadata),
        ),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}/ready",
            Infer,
            get(v2::model_version_ready),
        ),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}/config",
            Infer,
            get(v2::model_version_config),
        ),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}/stats",
            Infer,
            get(v2::model_version_stats),
        ),
        r(
            "POST",
            "/v2/models/{name}/versions/{version}/infer",
            Infer,
            post(v2::infer_version),
        ),
        r(
            "POST",
            "/v2/repository/index",
            Admin,
            post(v2::repository_index),
        ),
        r(
            "POST",
            "/v2/repository/models/{name}/load",
            Admin,
            post(v2::repository_load),
        ),
        r(
            "POST",
            "/v2/repository/models/{name}/unload",
            Admin,
            post(v2::repository_unload),
        ),
    ]
}

/// Every route the server answers (method, path template, access).
pub fn routes() -> Vec<RouteInfo> {
    table().into_iter().map(|(info, _)| info).collect()
}

/// The whole application: one router per access level, each behind its authorisation layer
/// (the admin routes all behind one), and a server-wide concurrency limit on everything but
/// the health probes and metrics.
pub fn app(state: AppState) -> Router {
    let max_body = state.settings.max_body_bytes;
    let levels = [
        Access::Public,
        Access::Metrics,
        Access::Infer,
        Access::Admin,
    ];
    let mut router = Router::new();
    for access in levels {
        let mut group = Router::new();
        for (info, handler) in table().into_iter().filter(|(i, _)| i.access == access) {
            group = group.route(info.path, handler);
        }
        group = group.route_layer(middleware::from_fn_with_state(
            (state.clone(), access),
            auth::authorize,
        ));
        if matches!(access, Access::Infer | Access::Admin) {
            group = group.route_layer(middleware::from_fn_with_state(
                state.clone(),
                limit_concurrency,
            ));
        }
        router = router.merge(group);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(
            ServiceBuilder::new()
                // gzip / deflate answers for clients that accept them (request bodies are
                // decompressed by guard::read_body), outermost: the layers inside that rewrite
                // error bodies (JSON, OpenAI's shape) see them uncompressed
                .layer(CompressionLayer::new())
                .layer(middleware::from_fn(guard::sanitize_request_id))
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
                .layer(middleware::from_fn_with_state(state.clone(), observe))
                .layer(middleware::from_fn(openai::openai_error_shape))
                .layer(middleware::from_fn(guard::json_error_bodies))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    guard::close_when_draining,
                ))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    guard::refuse_oversized,
                ))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    guard::read_body,
                ))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone())),
        )
        .with_state(state)
}

/// Refuses a request at once (503 + Retry-After) while `--max-concurrent-requests` are being
/// served; it never queues.
async fn limit_concurrency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.concurrency.clone().try_acquire_owned() {
        Ok(_permit) => next.run(req).await,
        Err(_) => {
            state.metrics.reject("concurrency_limit");
            let err = ApiError::Overloaded(format!(
                "the server is serving its limit of {} concurrent requests; retry later",
                state.settings.max_concurrent_requests
            ));
            if req.uri().path().starts_with("/v2") {
                v2::V2Error::from(err).into_response()
            } else {
                err.into_response()
            }
        }
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::RouteNotFound(format!("{method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Keeps the in-flight gauge right even when the client leaves mid-request, and the CPUs
/// polling meanwhile when idle polling is on.
struct InFlight {
    metrics: Arc<Metrics>,
    _polling: Option<Busy>,
}
impl InFlight {
    fn new(state: &AppState) -> Self {
        state.metrics.http_in_flight.inc();
        Self {
            metrics: state.metrics.clone(),
            _polling: state.settings.idle_polling.busy(),
        }
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.http_in_flight.dec();
    }
}

/// One span per request carrying its id, one log line at the end, HTTP metrics by route
/// template (never by raw path).
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::new(&state);
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
    state.metrics.observe_http(
        &route,
        guard::method_label(&method),
        status.as_u16(),
        elapsed,
    );
    span.record("status", status.as_u16());
    let total_ms = elapsed.as_secs_f64() * 1e3;
    let _enter = span.enter();
    if let Some(err) = response.extensions().get::<ErrorLog>() {
        let line = format!("{} {} {}", method, route, status.as_u16());
        if status.is_server_error() && status.as_u16() != 503 {
            tracing::error!(total_ms, code = err.code, error = %guard::Escaped(&err.message), "{line}");
        } else {
            tracing::info!(total_ms, code = err.code, error = %guard::Escaped(&err.message), "{line}");
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
