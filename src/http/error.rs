//! One error type for every handler, the single place that maps an error to its status and
//! code, and what every dialect's error answer shares ([`error_answer`]). The native dialect's
//! answer is [`ApiError`]'s `IntoResponse`; v2's and OpenAI's live with their routes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::codec::CodecError;
use crate::registry::InferError;
use crate::registry::{LookupError, ManageError, ModelState};
use crate::repository::RepositoryError;
use crate::telemetry::Outcome;

/// An error answer's code and message, for the request's log line (a response extension).
#[derive(Debug, Clone)]
pub struct ErrorLog {
    pub code: &'static str,
    pub message: String,
}

/// Everything a handler or middleware can fail with. Native body:
/// `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    ModelNotReady(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    LoadFailed(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    MalformedBody(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Timeout(String),
    /// The model's device failed (out of memory, lost): the model is failed.
    #[error("{0}")]
    DeviceFailed(String),
    /// The client did not send its request in time.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    Internal(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl ApiError {
    /// Status and stable code.
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            ApiError::ModelNotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "model_not_ready"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::LoadFailed(_) => (StatusCode::UNPROCESSABLE_ENTITY, "load_failed"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::MalformedBody(_) => (StatusCode::BAD_REQUEST, "malformed_body"),
            ApiError::InvalidInput(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ApiError::DeviceFailed(_) => (StatusCode::SERVICE_UNAVAILABLE, "device_failed"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The code and message for the request's log line.
    pub fn log(&self) -> ErrorLog {
        ErrorLog {
            code: self.parts().1,
            message: self.to_string(),
        }
    }

    /// The error of one part of a request (`instance 3`, `document 0`, ...): an invalid or
    /// malformed part's message names it; other errors are the request's as they are.
    pub fn about(self, part: impl std::fmt::Display) -> ApiError {
        match self {
            ApiError::InvalidInput(m) => ApiError::InvalidInput(format!("{part}: {m}")),
            ApiError::MalformedBody(m) => ApiError::MalformedBody(format!("{part}: {m}")),
            other => other,
        }
    }

    /// A JSON body serde could not read: a syntax error is a malformed body (400); JSON of the
    /// wrong shape is invalid input (422), its message saying the `expected` shape.
    pub fn json_body(e: serde_json::Error, expected: &str) -> ApiError {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::MalformedBody(format!("invalid JSON: {e}"))
            }
            Category::Data => ApiError::InvalidInput(format!("expected {expected}: {e}")),
        }
    }

    /// `count` parts (instances, inputs, documents) in one request, at most `max`: else 413.
    pub fn at_most(count: usize, max: usize, parts: &str) -> Result<(), ApiError> {
        if count > max {
            return Err(ApiError::PayloadTooLarge(format!(
                "{count} {parts} in one request; at most {max} are accepted"
            )));
        }
        Ok(())
    }

    /// The request outcome this error counts as in metrics.
    pub fn outcome(&self) -> Outcome {
        match self {
            ApiError::Overloaded(_) | ApiError::ModelNotReady(_) => Outcome::Rejected,
            ApiError::Timeout(_) => Outcome::Timeout,
            ApiError::Internal(_) | ApiError::DeviceFailed(_) => Outcome::Error,
            _ => Outcome::ClientError,
        }
    }
}

/// The native dialect's error answer.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let log = self.log();
        let body = json!({"error": {"code": log.code, "message": log.message}});
        error_answer(self.status(), body, log)
    }
}

/// An error answer in any dialect: `body` (the dialect's shape) with `status` (the dialect's),
/// the error for the request's log line, and the headers its status calls for whatever the
/// dialect: `Retry-After` on 503, `Connection: close` on 413 and 408, `WWW-Authenticate` on 401.
pub(super) fn error_answer(status: StatusCode, body: Value, log: ErrorLog) -> Response {
    let mut response = (status, Json(body)).into_response();
    // logged once, on the request's log line, by the observing middleware
    response.extensions_mut().insert(log);
    let headers = response.headers_mut();
    match status {
        StatusCode::SERVICE_UNAVAILABLE => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // The body may be left unread: the connection cannot carry another request, and a
        // client that reused it would see its next request fail.
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        StatusCode::UNAUTHORIZED => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"aiaas\""),
            );
        }
        _ => {}
    }
    response
}

impl From<CodecError> for ApiError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Invalid(m) => ApiError::InvalidInput(m),
            CodecError::Malformed(m) => ApiError::MalformedBody(m),
            CodecError::TooLarge(m) => ApiError::PayloadTooLarge(m),
            CodecError::Busy(m) => ApiError::Overloaded(m),
        }
    }
}

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        match &e {
            LookupError::UnknownModel(_) | LookupError::UnknownVersion(..) => {
                ApiError::ModelNotFound(e.to_string())
            }
            // Unloaded: gone until someone loads it again.
            LookupError::NotReady {
                state: ModelState::Unavailable,
                ..
            } => ApiError::ModelNotFound(e.to_string()),
            // Loading, unloading or failed: the client may retry.
            LookupError::NotReady { .. } => ApiError::ModelNotReady(e.to_string()),
            // Lazy loading outlasted the request's deadline; the load goes on for the next one.
            LookupError::LoadTimedOut { .. } => ApiError::Timeout(e.to_string()),
        }
    }
}

impl From<ManageError> for ApiError {
    fn from(e: ManageError) -> Self {
        match &e {
            ManageError::Repository(r) => match r {
                RepositoryError::InvalidName(_) | RepositoryError::Escapes(_) => {
                    ApiError::BadRequest(e.to_string())
                }
                RepositoryError::NotFound(_) => ApiError::ModelNotFound(e.to_string()),
                RepositoryError::Io(..) => ApiError::Internal(e.to_string()),
            },
            ManageError::NotLoaded(_) => ApiError::ModelNotFound(e.to_string()),
            ManageError::LoadFailed { .. } => ApiError::LoadFailed(e.to_string()),
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match &e {
            InferError::QueueFull { .. } => ApiError::Overloaded(e.to_string()),
            InferError::MoreRowsThanMaxBatch { .. } | InferError::NotBatched { .. } => {
                ApiError::InvalidInput(e.to_string())
            }
            InferError::MoreRowsThanQueue { .. } => ApiError::PayloadTooLarge(e.to_string()),
            InferError::Timeout { .. } => ApiError::Timeout(e.to_string()),
            InferError::Stopped { .. } => ApiError::ModelNotReady(e.to_string()),
            InferError::Engine { source, .. } if source.is_device_failure() => {
                ApiError::DeviceFailed(e.to_string())
            }
            InferError::Engine { .. } => ApiError::Internal(e.to_string()),
        }
    }
}
