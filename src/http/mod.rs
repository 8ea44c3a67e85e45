//! The HTTP layer: the route table and router assembly here, middleware in [`middleware`] (and
//! [`auth`]), one module per API surface, and the API dialects ([`Dialect`]) that shape their
//! errors. It knows requests, responses and the registry, never libtorch.

mod admin;
pub mod auth;
mod chat;
mod dialect;
mod error;
mod health;
pub(crate) mod inference;
mod metrics;
mod middleware;
mod models;
mod openai;
mod rerank;
mod v1;
pub(crate) mod v2;

use std::sync::Arc;
use std::time::Duration;

use crate::config::ModelControl;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Method};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub use self::auth::{Access, ApiKeys};
pub use self::dialect::Dialect;
pub use self::error::{ApiError, ErrorLog};
pub use self::middleware::sanitize_request_id;
use crate::idle_poll::IdlePolling;
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

    /// A slot under `--max-concurrent-requests`, held while a request is served; `None` when
    /// every slot is taken.
    pub fn try_serve(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.concurrency.clone().try_acquire_owned().ok()
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

/// One route of the API: method, path template, who may call it and the dialect it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInfo {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    pub dialect: Dialect,
}

/// Every route with its handler. The router is built from this table, and the tests check
/// the table against openapi.yaml, so the spec cannot miss a route.
fn table() -> Vec<(RouteInfo, MethodRouter<AppState>)> {
    use Access::*;
    use Dialect::*;
    let r = |method, path, access, dialect, handler| {
        (
            RouteInfo {
                method,
                path,
                access,
                dialect,
            },
            handler,
        )
    };
    vec![
        r("GET", "/health/live", Public, Native, get(health::live)),
        r("GET", "/health/ready", Public, Native, get(health::ready)),
        r("GET", "/metrics", Metrics, Native, get(metrics::render)),
        r("GET", "/v1/models", Infer, Native, get(models::list)),
        r(
            "GET",
            "/v1/models/{name}",
            Infer,
            Native,
            get(models::describe),
        ),
        r(
            "POST",
            "/v1/embeddings",
            Infer,
            OpenAi,
            post(openai::embeddings),
        ),
        r(
            "POST",
            "/v1/chat/completions",
            Infer,
            OpenAi,
            post(chat::chat_completions),
        ),
        r(
            "POST",
            "/v1/completions",
            Infer,
            OpenAi,
            post(chat::completions),
        ),
        r("POST", "/v1/rerank", Infer, Native, post(rerank::rerank)),
        r(
            "GET",
            "/v1/models/{name}/versions/{version}",
            Infer,
            Native,
            get(models::describe_version),
        ),
        r(
            "POST",
            "/v1/models/{name}/predict",
            Infer,
            Native,
            post(v1::predict),
        ),
        r(
            "POST",
            "/v1/models/{name}/versions/{version}/predict",
            Infer,
            Native,
            post(v1::predict_version),
        ),
        r(
            "POST",
            "/v1/models/{name}/load",
            Admin,
            Native,
            post(admin::load),
        ),
        r(
            "POST",
            "/v1/models/{name}/unload",
            Admin,
            Native,
            post(admin::unload),
        ),
        r(
            "POST",
            "/v1/models/{name}/reload",
            Admin,
            Native,
            post(admin::reload),
        ),
        r(
            "DELETE",
            "/v1/models/{name}",
            Admin,
            Native,
            delete(admin::unload),
        ),
        r("GET", "/v2", Infer, V2, get(v2::server_metadata)),
        r("GET", "/v2/health/live", Public, V2, get(v2::live)),
        r("GET", "/v2/health/ready", Public, V2, get(v2::ready)),
        r("GET", "/v2/models/stats", Infer, V2, get(v2::all_stats)),
        r(
            "GET",
            "/v2/models/{name}",
            Infer,
            V2,
            get(v2::model_metadata),
        ),
        r(
            "GET",
            "/v2/models/{name}/ready",
            Infer,
            V2,
            get(v2::model_ready),
        ),
        r(
            "GET",
            "/v2/models/{name}/config",
            Infer,
            V2,
            get(v2::model_config),
        ),
        r(
            "GET",
            "/v2/models/{name}/stats",
            Infer,
            V2,
            get(v2::model_stats),
        ),
        r(
            "POST",
            "/v2/models/{name}/infer",
            Infer,
            V2,
            post(v2::infer),
        ),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}",
            Infer,
            V2,
            get(v2::model_version_metadata),
        ),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}/ready",
            Infer,
            V2,
            get(v2::model_version_ready),
        ),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}/config",
            Infer,
            V2,
            get(v2::model_version_config),
        ),
        r(
            "GET",
            "/v2/models/{name}/versions/{version}/stats",
            Infer,
            V2,
            get(v2::model_version_stats),
        ),
        r(
            "POST",
            "/v2/models/{name}/versions/{version}/infer",
            Infer,
            V2,
            post(v2::infer_version),
        ),
        r(
            "POST",
            "/v2/repository/index",
            Admin,
            V2,
            post(v2::repository_index),
        ),
        r(
            "POST",
            "/v2/repository/models/{name}/load",
            Admin,
            V2,
            post(v2::repository_load),
        ),
        r(
            "POST",
            "/v2/repository/models/{name}/unload",
            Admin,
            V2,
            post(v2::repository_unload),
        ),
    ]
}

/// Every route the server answers (method, path template, access, dialect).
pub fn routes() -> Vec<RouteInfo> {
    table().into_iter().map(|(info, _)| info).collect()
}

/// The whole application: each dialect's routes behind that dialect's middleware (see
/// [`dialect_routes`]), then what every request goes through: compression, the request id, its
/// observation (span, log line, metrics), and `Connection: close` while draining.
pub fn app(state: AppState) -> Router {
    let routes = table();
    let mut router = Router::new();
    for dialect in Dialect::ALL {
        router = router.merge(dialect_routes(&state, &routes, dialect));
    }
    router
        .layer(
            ServiceBuilder::new()
                // gzip / deflate answers for clients that accept them (request bodies are
                // decompressed by middleware::read_body), outermost: the layer that reshapes
                // foreign error bodies sees them uncompressed
                .layer(CompressionLayer::new())
                .layer(from_fn(middleware::sanitize_request_id))
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
                .layer(from_fn_with_state(state.clone(), middleware::observe))
                .layer(from_fn_with_state(
                    state.clone(),
                    middleware::close_when_draining,
                ))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone())),
        )
        .with_state(state)
}

/// The routes of one dialect, one group per access level behind its authorisation layer (the
/// admin routes all behind one) and, but for the health probes and metrics, the server-wide
/// concurrency limit; then the body guards and the shaping of foreign error answers. Every
/// refusal on these routes, an unknown method's 405 included, is answered in `dialect`; a path
/// no route matches gets the native dialect's 404.
fn dialect_routes(
    state: &AppState,
    routes: &[(RouteInfo, MethodRouter<AppState>)],
    dialect: Dialect,
) -> Router<AppState> {
    let mut router = Router::new();
    for access in [
        Access::Public,
        Access::Metrics,
        Access::Infer,
        Access::Admin,
    ] {
        let mut group = Router::new();
        for (info, handler) in routes
            .iter()
            .filter(|(i, _)| i.dialect == dialect && i.access == access)
        {
            group = group.route(info.path, handler.clone());
        }
        if !group.has_routes() {
            // a route layer on no routes is refused by axum
            continue;
        }
        group = group.route_layer(from_fn_with_state(
            (state.clone(), access, dialect),
            auth::authorize,
        ));
        if matches!(access, Access::Infer | Access::Admin) {
            group = group.route_layer(from_fn_with_state(
                (state.clone(), dialect),
                middleware::limit_concurrency,
            ));
        }
        router = router.merge(group);
    }
    if dialect == Dialect::Native {
        router = router.fallback(not_found);
    }
    router
        .method_not_allowed_fallback(move || async move {
            dialect.error_response(ApiError::MethodNotAllowed)
        })
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(
            ServiceBuilder::new()
                .layer(from_fn_with_state(
                    dialect,
                    middleware::shape_foreign_errors,
                ))
                .layer(from_fn_with_state(
                    (state.clone(), dialect),
                    middleware::refuse_oversized,
                ))
                .layer(from_fn_with_state(
                    (state.clone(), dialect),
                    middleware::read_body,
                )),
        )
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::RouteNotFound(format!("{method} {}", uri.path()))
}

/// Helper for handlers: a JSON response with a status.
pub(crate) fn json_response(status: axum::http::StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}
