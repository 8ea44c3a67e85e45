//! A unary call's message must arrive within `--body-timeout`, as an HTTP request's body must:
//! a client that trickles a message (or sends headers and stalls) costs a bounded time. Streams
//! are bounded by their own idle timeout instead ([`super::stream`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// The streaming methods, whose request bodies are open-ended.
const STREAMING: &[&str] = &[
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Middleware: gives a unary call's request body a deadline `timeout` from now.
pub async fn unary_deadline(req: Request, next: Next, timeout: Duration) -> Response {
    if STREAMING.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let req = req.map(|b| {
        Body::new(DeadlineBody {
            inner: b,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        })
    });
    next.run(req).await
}

struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let secs = self.timeout.as_secs_f64();
            return Poll::Ready(Some(Err(axum::Error::new(format!(
                "the request message did not arrive within {secs} s (--body-timeout)"
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
