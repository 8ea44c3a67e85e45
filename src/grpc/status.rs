//! gRPC's side of the one error type: [`ApiError`] as a gRPC status (the table below, which
//! docs/API.md repeats), and what a call's metadata carries (key, deadline, request id).

use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::http::auth::bearer_token;
use crate::http::ApiError;

/// The gRPC code of an error: the same meaning as its HTTP status.
///
/// | HTTP | gRPC | errors |
/// |---|---|---|
/// | 400, 422 | INVALID_ARGUMENT | malformed message, invalid input, a generative model asked to infer |
/// | 401 | UNAUTHENTICATED | no key, unknown key |
/// | 403 | PERMISSION_DENIED | an infer key on a management call; management from afar without keys |
/// | 404 | NOT_FOUND | unknown model or version |
/// | 405 | UNIMPLEMENTED | (shared memory, trace and log settings) |
/// | 408, 504 | DEADLINE_EXCEEDED | the body or the deadline ran out |
/// | 413 | RESOURCE_EXHAUSTED | a message over `--max-body-bytes`, too many elements |
/// | 415 | INVALID_ARGUMENT | an image that cannot be decoded |
/// | 503 | UNAVAILABLE | queue full, concurrency limit, model not ready, device failed |
/// | 500 | INTERNAL | a bug or an engine failure |
pub fn code_of(e: &ApiError) -> Code {
    match e {
        ApiError::BadRequest(_)
        | ApiError::MalformedBody(_)
        | ApiError::InvalidInput(_)
        | ApiError::UnsupportedMediaType(_)
        | ApiError::LoadFailed(_) => Code::InvalidArgument,
        ApiError::Unauthorized(_) => Code::Unauthenticated,
        ApiError::Forbidden(_) => Code::PermissionDenied,
        ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => Code::NotFound,
        ApiError::MethodNotAllowed => Code::Unimplemented,
        ApiError::Timeout(_) | ApiError::RequestTimeout(_) => Code::DeadlineExceeded,
        ApiError::PayloadTooLarge(_) => Code::ResourceExhausted,
        ApiError::Overloaded(_) | ApiError::ModelNotReady(_) | ApiError::DeviceFailed(_) => {
            Code::Unavailable
        }
        ApiError::Internal(_) => Code::Internal,
    }
}

/// An error as the status a gRPC call ends with.
pub fn status_of(e: ApiError) -> Status {
    Status::new(code_of(&e), e.to_string())
}

/// tonic refuses a message over the size limit with OUT_OF_RANGE; gRPC's own implementations,
/// and this server's table ([`code_of`]: 413), say RESOURCE_EXHAUSTED. The refusal comes
/// before any handler runs, in the answer's headers (trailers-only) or its trailers, so both
/// are rewritten here.
pub async fn too_large_is_resource_exhausted(
    mut response: axum::response::Response,
) -> axum::response::Response {
    rewrite_too_large(response.headers_mut());
    response.map(|b| axum::body::Body::new(TrailersRewritten(b)))
}

fn rewrite_too_large(h: &mut axum::http::HeaderMap) {
    let too_large = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large"));
    if too_large {
        h.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
}

struct TrailersRewritten(axum::body::Body);

impl http_body::Body for TrailersRewritten {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|f| {
                f.map(|f| match f.into_trailers() {
                    Ok(mut t) => {
                        rewrite_too_large(&mut t);
                        http_body::Frame::trailers(t)
                    }
                    Err(data) => data,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// A status from tonic's decoding of a streamed message, with the code of [`code_of`]'s table.
pub fn stream_status(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

/// The key a call presents in its `authorization` metadata (`Bearer <key>`).
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    bearer_token(metadata.get("authorization")?.to_str().ok()?)
}

/// The client's deadline from `grpc-timeout` (`<digits><unit>`, unit one of H M S m u n); a
/// malformed value is an error rather than no deadline.
pub fn grpc_timeout(metadata: &MetadataMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || ApiError::BadRequest("grpc-timeout must be up to 8 digits and a unit".into());
    let v = v.to_str().map_err(|_| bad())?;
    if v.len() < 2 || v.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(key: &'static str, value: &'static str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(key, value.parse().unwrap());
        m
    }

    #[test]
    fn grpc_timeout_units() {
        let t = |v| grpc_timeout(&with("grpc-timeout", v));
        assert_eq!(t("250m").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(t("2S").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(t("1H").unwrap(), Some(Duration::from_secs(3600)));
        assert_eq!(t("1500u").unwrap(), Some(Duration::from_micros(1500)));
        assert!(t("12").is_err());
        assert!(t("m").is_err());
        assert!(t("123456789S").is_err());
        assert!(t("-1S").is_err());
        assert_eq!(grpc_timeout(&MetadataMap::new()).unwrap(), None);
    }

    #[test]
    fn bearer_keys_and_codes() {
        assert_eq!(
            bearer(&with("authorization", "Bearer 0123456789abcdef")),
            Some("0123456789abcdef")
        );
        assert_eq!(bearer(&with("authorization", "Basic abc")), None);
        assert_eq!(
            code_of(&ApiError::Overloaded("x".into())),
            Code::Unavailable
        );
        assert_eq!(
            code_of(&ApiError::PayloadTooLarge("x".into())),
            Code::ResourceExhausted
        );
        assert_eq!(
            code_of(&ApiError::ModelNotFound("x".into())),
            Code::NotFound
        );
    }
}
