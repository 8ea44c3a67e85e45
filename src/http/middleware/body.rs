//! Reads the whole request body before the handler runs: within a deadline, within the size
//! limit, and decompressed.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::http::{ApiError, AppState, Dialect};

/// Reads the whole request body within `--body-timeout` (a slow or stalled sender gets 408 and
/// its connection closed, instead of holding it for ever) and at most `--max-body-bytes` of it
/// (413), then undoes its `Content-Encoding`: gzip (every member, as concatenated gzip files
/// are one stream) or deflate, again at most `--max-body-bytes` decoded, so a compression bomb
/// is a 413 too; any other encoding is a 415. Refusals are answered in the route's `dialect`.
pub async fn read_body(
    State((state, dialect)): State<(AppState, Dialect)>,
    req: Request,
    next: Next,
) -> Response {
    let timeout = state.settings.body_timeout;
    let max = state.settings.max_body_bytes;
    let (mut parts, body) = req.into_parts();
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, max));
    let bytes = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return dialect.error_response(ApiError::PayloadTooLarge(format!(
                "the request body is over {max} bytes (--max-body-bytes)"
            )))
        }
        Ok(Err(e)) => {
            return dialect.error_response(ApiError::MalformedBody(format!(
                "the request body could not be read: {e}"
            )))
        }
        Err(_) => {
            return dialect.error_response(ApiError::RequestTimeout(format!(
                "the request body did not arrive within {} s (--body-timeout)",
                timeout.as_secs_f64()
            )))
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
                Err(e) => return dialect.error_response(e),
            }
        }
        Some(other) => {
            return dialect.error_response(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding '{other}' is not supported: send gzip, deflate or none"
            )))
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
