//! What every prediction route shares, /v1 and /v2 alike: outcome counting, deadlines, and the
//! timing headers and log fields of an answered request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;

use super::{ApiError, AppState, InferenceLog};
use crate::registry::{ModelLease, ServingModel};
use crate::telemetry::{Outcome, Protocol};
use crate::tensor::Inferred;

/// Above this body size, decoding moves off the async workers.
const INLINE_DECODE_BYTES: usize = 32 << 10;

/// Header with which a client may shorten (never lengthen) a request's deadline.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// Counts the request's outcome once, also when the client leaves and the future is dropped.
struct OutcomeGuard {
    model: Arc<ServingModel>,
    protocol: Protocol,
    started: Instant,
    outcome: Option<Outcome>,
}

impl Drop for OutcomeGuard {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Dropped);
        self.model
            .metrics
            .request(self.protocol, outcome, self.started.elapsed());
    }
}

/// An error that knows which request outcome it counts as.
pub trait HasOutcome {
    fn outcome(&self) -> Outcome;
}

impl HasOutcome for ApiError {
    fn outcome(&self) -> Outcome {
        ApiError::outcome(self)
    }
}

/// Runs a prediction for `model`, tagging the request's span with the model and counting its
/// outcome (success, client error, rejected, timeout, error, or dropped if the client leaves).
pub async fn count_outcome<T, E: HasOutcome>(
    model: &Arc<ServingModel>,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    count_outcome_via(Protocol::Http, model, work).await
}

/// [`count_outcome`] for a request that came over `protocol`.
pub async fn count_outcome_via<T, E: HasOutcome>(
    protocol: Protocol,
    model: &Arc<ServingModel>,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let span = tracing::Span::current();
    span.record("model", model.name.as_str());
    span.record("version", model.version);
    let mut guard = OutcomeGuard {
        model: model.clone(),
        protocol,
        started: Instant::now(),
        outcome: None,
    };
    let result = work.await;
    guard.outcome = Some(match &result {
        Ok(_) => Outcome::Success,
        Err(e) => e.outcome(),
    });
    result
}

/// The model version that serves one prediction request (the default one when `version` is
/// `None`). Under lazy model control a model not in memory is loaded first, the wait bounded by
/// the client's `x-request-timeout-ms` (else the model's timeout).
pub async fn take_model(
    state: &AppState,
    name: &str,
    version: Option<u64>,
    headers: &HeaderMap,
) -> Result<ModelLease, ApiError> {
    take_model_within(state, name, version, client_timeout(headers)?).await
}

/// [`take_model`] with the client's timeout given directly (gRPC's `grpc-timeout`).
pub async fn take_model_within(
    state: &AppState,
    name: &str,
    version: Option<u64>,
    client: Option<Duration>,
) -> Result<ModelLease, ApiError> {
    let client = client.map(|t| Instant::now() + t);
    Ok(state.registry.acquire(name, version, client).await?)
}

/// A generative request's deadline: the model's generation `timeout`, shortened by the
/// client's (`x-request-timeout-ms`, `grpc-timeout`) when given, less the time the request
/// already waited for the model to load: a lazy load counts against the deadline.
pub fn generation_deadline(
    model: &ModelLease,
    timeout: Duration,
    client: Option<Duration>,
) -> Instant {
    let timeout = client.map_or(timeout, |c| c.min(timeout));
    Instant::now() + timeout.saturating_sub(model.waited)
}

/// The client's `x-request-timeout-ms`, if it sent one.
pub fn client_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let ms: u64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&ms| ms > 0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{TIMEOUT_HEADER} must be a positive whole number of milliseconds"
            ))
        })?;
    Ok(Some(Duration::from_millis(ms)))
}

/// The request's deadline: the model's timeout, shortened by the client's
/// `x-request-timeout-ms` header and by `extra` (e.g. the v2 `timeout` parameter) when given,
/// less the time the request already waited for the model to load.
pub fn deadline(
    headers: &HeaderMap,
    model: &ModelLease,
    extra: Option<Duration>,
) -> Result<Option<Instant>, ApiError> {
    Ok(Some(deadline_within(
        model,
        client_timeout(headers)?,
        extra,
    )))
}

/// [`deadline`] with the client's timeout given directly (gRPC's `grpc-timeout`).
pub fn deadline_within(
    model: &ModelLease,
    client: Option<Duration>,
    extra: Option<Duration>,
) -> Instant {
    let mut timeout = model.spec.batching.timeout();
    for t in [client, extra].into_iter().flatten() {
        timeout = timeout.min(t);
    }
    Instant::now() + timeout.saturating_sub(model.waited)
}

/// Adds `x-model-version`, `x-batch-size`, `x-queue-time-ms`, `x-inference-time-ms` and
/// `x-model-loaded` (`cold` when the request waited for the model to load, else `warm`), and
/// the log fields, to a successful prediction response. With several items, the largest values.
pub fn with_timing(mut response: Response, model: &ModelLease, results: &[Inferred]) -> Response {
    let batch_size = results.iter().map(|r| r.batch_size).max().unwrap_or(0);
    let queue_time = results
        .iter()
        .map(|r| r.queue_time)
        .max()
        .unwrap_or_default();
    let compute_time = results
        .iter()
        .map(|r| r.compute_time)
        .max()
        .unwrap_or_default();
    let h = response.headers_mut();
    let num = |v: String| HeaderValue::from_str(&v).expect("numeric header value");
    h.insert("x-model-version", num(model.version.to_string()));
    h.insert(
        "x-model-loaded",
        HeaderValue::from_static(if model.cold() { "cold" } else { "warm" }),
    );
    h.insert("x-batch-size", num(batch_size.to_string()));
    h.insert(
        "x-queue-time-ms",
        num(format!("{:.3}", queue_time.as_secs_f64() * 1e3)),
    );
    h.insert(
        "x-inference-time-ms",
        num(format!("{:.3}", compute_time.as_secs_f64() * 1e3)),
    );
    response.extensions_mut().insert(InferenceLog {
        model: model.name.clone(),
        version: model.version,
        batch_size,
        queue_time,
        compute_time,
    });
    response
}

/// Whether a request's work is still wanted: its client is still waiting and its deadline has
/// not passed. Decoding runs on the blocking pool, where dropping the request's future (the
/// client hung up) does not stop it, so it checks this between steps (instances, texts,
/// images) and stops early instead of spending seconds of a core on an answer nobody reads.
#[derive(Debug, Clone)]
pub struct StillWanted {
    gone: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

/// Marks the request's work as no longer wanted when dropped with the request's future.
pub struct WantedWhileAlive(Arc<AtomicBool>);

impl Drop for WantedWhileAlive {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl StillWanted {
    /// A check for a request with `deadline`, and the guard to keep alive in its future.
    pub fn new(deadline: Option<Instant>) -> (Self, WantedWhileAlive) {
        let gone = Arc::new(AtomicBool::new(false));
        (
            Self {
                gone: gone.clone(),
                deadline,
            },
            WantedWhileAlive(gone),
        )
    }

    /// An error when the client left or the deadline passed.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.gone.load(Ordering::Relaxed) {
            return Err(ApiError::Timeout(
                "the client left while its request was being decoded".into(),
            ));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(ApiError::Timeout(
                "the request's deadline passed while it was being decoded".into(),
            ));
        }
        Ok(())
    }
}

/// Runs `decode` inline for bodies up to [`INLINE_DECODE_BYTES`] and on the blocking pool above.
pub async fn decode_inline_or_blocking<T: Send + 'static>(
    model: &Arc<ServingModel>,
    body: Bytes,
    decode: impl FnOnce(&ServingModel, Bytes) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let model = model.clone();
    blocking_if_large(body.len(), move || decode(&model, body)).await
}

/// Runs `work` (parsing or decoding a body of `bytes`) inline when the body is small, and on
/// the blocking pool when it is over [`INLINE_DECODE_BYTES`], so that the async workers stay
/// free for other requests.
pub async fn blocking_if_large<T: Send + 'static>(
    bytes: usize,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if bytes <= INLINE_DECODE_BYTES {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("decoding task failed: {e}")))?
}
