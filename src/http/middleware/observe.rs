//! The request's observation: one span carrying its id, one log line at the end, the HTTP
//! metrics by route template, and the in-flight gauge.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tracing::{field::Empty, Instrument};

use crate::http::{AppState, ErrorLog, InferenceLog, REQUEST_ID};
use crate::idle_poll::Busy;
use crate::telemetry::Metrics;

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
pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let in_flight = InFlight::new(&state);
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
        .observe_http(&route, method_label(&method), status.as_u16(), elapsed);
    span.record("status", status.as_u16());
    let total_ms = elapsed.as_secs_f64() * 1e3;
    let _enter = span.enter();
    if let Some(err) = response.extensions().get::<ErrorLog>() {
        let line = format!("{} {} {}", method, route, status.as_u16());
        if status.is_server_error() && status.as_u16() != 503 {
            tracing::error!(total_ms, code = err.code, error = %Escaped(&err.message), "{line}");
        } else {
            tracing::info!(total_ms, code = err.code, error = %Escaped(&err.message), "{line}");
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
    super::hold_while_streaming(response, in_flight)
}

/// The metrics label of a request method: the standard ones by name, anything else `other`,
/// so that a client inventing methods cannot create series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Text for a log field that a client had a hand in (a model name from the path, a message
/// quoting its input): control characters, quotes and backslashes escaped, so that a line of
/// the text log format cannot be forged or broken.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0.escape_debug(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_log_text_has_no_control_characters_or_bare_quotes() {
        let s = Escaped("model 'x\ny' \u{1b}[31mred\u{1b}[0m \"q\" 中文").to_string();
        assert!(!s.chars().any(char::is_control), "{s}");
        assert!(s.contains("\\n") && s.contains("\\u{1b}") && s.contains("\\\"q\\\""));
        assert!(s.contains("中文"), "printable text is kept: {s}");
    }

    #[test]
    fn only_standard_methods_are_labels() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"XQZK").unwrap()), "other");
    }
}
