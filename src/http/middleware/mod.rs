//! The middleware in front of the handlers, one file each. Those whose refusals are error
//! answers take the route's [`Dialect`](super::Dialect) as state, so that they answer in the
//! route's shape.

mod body;
mod concurrency;
mod declared_length;
mod draining;
mod error_shape;
mod observe;
mod request_id;

pub use body::read_body;
pub use concurrency::limit_concurrency;
pub use declared_length::refuse_oversized;
pub use draining::close_when_draining;
pub use error_shape::shape_foreign_errors;
pub use observe::observe;
pub use request_id::sanitize_request_id;

/// Marks a streamed answer (Server-Sent Events): the request stays in flight (its concurrency
/// permit, the in-flight gauge) until the body's last chunk is sent or the client leaves, not
/// only until the handler returns.
#[derive(Debug, Clone, Copy)]
pub struct Streaming;

/// Keeps `guard` until `response`'s body ends when the response is [`Streaming`]; drops it now
/// otherwise.
fn hold_while_streaming<G: Send + 'static>(
    response: axum::response::Response,
    guard: G,
) -> axum::response::Response {
    use http_body_util::BodyExt;
    if response.extensions().get::<Streaming>().is_none() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = body.map_frame(move |frame| {
        let _held = &guard;
        frame
    });
    axum::response::Response::from_parts(parts, axum::body::Body::new(body))
}
