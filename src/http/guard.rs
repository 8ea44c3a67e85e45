//! Guards in front of every route against what a hostile or broken client sends: a request id
//! that would forge log lines, a declared body larger than the server accepts, and error
//! answers from layers and extractors that are not in the API's JSON error shape.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{v2, ApiError, AppState, ErrorLog, REQUEST_ID};

/// Longest client-given `x-request-id` kept; a longer or odd one is replaced by a new id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Drops a client's `x-request-id` unless it is 1 to 128 visible ASCII characters without
/// quotes or backslashes, so that the id layer generates a fresh one: a client id is logged and
/// echoed back, and must neither forge log lines nor be large.
pub async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let ok = req.headers().get(&REQUEST_ID).map(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID_LEN
            && b.iter()
                .all(|&c| c.is_ascii_graphic() && c != b'"' && c != b'\\')
    });
    if ok == Some(false) || req.headers().get_all(&REQUEST_ID).iter().count() > 1 {
        req.headers_mut().remove(&REQUEST_ID);
    }
    next.run(req).await
}

/// Refuses a body whose declared `Content-Length` is over `--max-body-bytes` with 413 before
/// anything reads it, so the client is not sent `100 Continue` and nothing waits for the bytes.
pub async fn refuse_oversized(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let max = state.settings.max_body_bytes as u64;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(len) if len > max => answer(
            req.uri().path(),
            ApiError::PayloadTooLarge(format!(
                "the request body is {len} bytes; at most {max} are accepted (--max-body-bytes)"
            )),
        ),
        _ => next.run(req).await,
    }
}

/// Reads the whole request body within `--body-timeout` (a slow or stalled sender gets 408 and
/// its connection closed, instead of holding it for ever) and at most `--max-body-bytes` of it
/// (413), then undoes its `Content-Encoding`: gzip (every member, as concatenated gzip files
/// are one stream) or deflate, again at most `--max-body-bytes` decoded, so a compression bomb
/// is a 413 too; any other encoding is a 415.
pub async fn read_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let timeout = state.settings.body_timeout;
    let max = state.settings.max_body_bytes;
    let path = req.uri().path().to_string();
    let (mut parts, body) = req.into_parts();
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, max));
    let bytes = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return answer(
                &path,
                ApiError::PayloadTooLarge(format!(
                    "the request body is over {max} bytes (--max-body-bytes)"
                )),
            )
        }
        Ok(Err(e)) => {
            return answer(
                &path,
                ApiError::MalformedBody(format!("the request body could not be read: {e}")),
            )
        }
        Err(_) => {
            return answer(
                &path,
                ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} s (--body-timeout)",
                    timeout.as_secs_f64()
                )),
            )
        }
    };
    let encoding = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    let bytes = match encoding.as_deref() {
        None | Some("" | "identity") => bytes,
        Some(name @ ("gzip" | "x-gzip" | "deflate")) => {
            let gzip = name != "deflate";
            let decoded = if bytes.len() <= INLINE_INFLATE_BYTES {
                inflate(&bytes, gzip, max)
            } else {
                tokio::task::spawn_blocking(move || inflate(&bytes, gzip, max))
                    .await
                    .unwrap_or_else(|e| Err(ApiError::Internal(format!("inflating failed: {e}"))))
            };
            match decoded {
                Ok(d) => {
                    parts.headers.remove(header::CONTENT_ENCODING);
                    parts.headers.remove(header::CONTENT_LENGTH);
                    d
                }
                Err(e) => return answer(&path, e),
            }
        }
        Some(other) => {
            return answer(
                &path,
                ApiError::UnsupportedMediaType(format!(
                    "Content-Encoding '{other}' is not supported: send gzip, deflate or none"
                )),
            )
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Compressed bodies up to this size are inflated on the async worker; larger ones on the
/// blocking pool.
const INLINE_INFLATE_BYTES: usize = 64 << 10;

/// A gzip (all members) or zlib-wrapped deflate body, decoded to at most `max` bytes.
fn inflate(bytes: &[u8], gzip: bool, max: usize) -> Result<bytes::Bytes, ApiError> {
    use std::io::Read;
    let reader: Box<dyn Read + '_> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(bytes))
    } else {
        Box::new(flate2::read::ZlibDecoder::new(bytes))
    };
    let mut out = Vec::new();
    reader
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::MalformedBody(format!("cannot decompress the body: {e}")))?;
    if out.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "the request body decompresses to over {max} bytes (--max-body-bytes)"
        )));
    }
    Ok(out.into())
}

/// Once a shutdown has begun, every answer carries `Connection: close`, so that keep-alive
/// clients open a new connection (to another replica) for their next request instead of
/// sending it down one the server is about to close.
pub async fn close_when_draining(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let mut response = next.run(req).await;
    if state.is_shutting_down() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// An error answer in the shape of the API the path belongs to (/v2's or the native one).
fn answer(path: &str, err: ApiError) -> Response {
    if path.starts_with("/v2") {
        v2::V2Error::from(err).into_response()
    } else {
        err.into_response()
    }
}

/// Most bytes of a non-JSON error body kept as the message.
const MAX_MESSAGE: usize = 1024;

/// Gives error answers that no handler wrote (an extractor's rejection such as a path that is
/// not UTF-8, a layer's plain-text refusal) the API's JSON error shape, keeping their status
/// and headers.
pub async fn json_error_bodies(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let head = req.method() == Method::HEAD;
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || head
        || response.extensions().get::<ErrorLog>().is_some()
        || is_json(response.headers())
    {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_MESSAGE)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let err = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(message),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::InvalidInput(message),
        StatusCode::NOT_FOUND => ApiError::RouteNotFound(format!("{path}: {message}")),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        s if s.is_server_error() => ApiError::Internal(message),
        _ => ApiError::BadRequest(message),
    };
    let mut fixed = answer(&path, err);
    *fixed.status_mut() = status;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name, value.clone());
        }
    }
    fixed
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The metrics label of a request method: the standard ones by name, anything else `other`,
/// so that a client inventing methods cannot create series.
pub fn method_label(method: &Method) -> &'static str {
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
pub struct Escaped<'a>(pub &'a str);

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
