//! `ModelStreamInfer`: requests arrive on one bidirectional stream and are answered on it as
//! they finish (a response carries its request's `id`), each through the same path as a unary
//! `ModelInfer`. A failed request is answered with `error_message` and the stream goes on, as
//! Triton does.
//!
//! What one stream may cost is bounded: at most [`IN_FLIGHT`] of its requests run at once (the
//! next message is not read until one finishes, so HTTP/2 flow control holds the sender back),
//! answers wait in a channel of [`IN_FLIGHT`] (a client that stops reading stops the stream's
//! work the same way), and a stream with nothing in flight that sends nothing for the idle
//! timeout is ended with DEADLINE_EXCEEDED. At shutdown a stream takes no new request, answers
//! the ones it holds, and ends with OK.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::proto::{ModelInferRequest, ModelStreamInferResponse};
use super::service::{Caller, Inference};

/// Requests of one stream running at once, and answers waiting to be read.
pub const IN_FLIGHT: usize = 32;

/// How often a stream waiting for its next message looks at the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);

/// The stream of answers to `requests`.
pub fn serve(
    service: Inference,
    mut requests: Streaming<ModelInferRequest>,
    caller: Caller,
) -> impl Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Result<ModelStreamInferResponse, Status>>(IN_FLIGHT);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // the stream's deadline (grpc-timeout) bounds the whole stream, as gRPC defines it
    let stream_deadline = caller.timeout.map(|t| tokio::time::Instant::now() + t);
    tokio::spawn(async move {
        let mut idle_since = tokio::time::Instant::now();
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s.expect("never closed"),
                _ = tx.closed() => return,
            };
            let next = loop {
                tokio::select! {
                    m = requests.message() => break m,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(SHUTDOWN_POLL) => {}
                }
                if service.state.is_shutting_down() {
                    break Ok(None);
                }
                let now = tokio::time::Instant::now();
                if stream_deadline.is_some_and(|d| now >= d) {
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(
                            "the stream's grpc-timeout passed",
                        )))
                        .await;
                    return;
                }
                // only this loop's own slot taken: nothing of the stream's is in flight
                if slots.available_permits() + 1 < IN_FLIGHT {
                    idle_since = now;
                } else if idle_since.elapsed() >= service.stream_idle_timeout {
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(format!(
                            "no request on this stream for {} s (--grpc-stream-idle-timeout); open a new stream",
                            service.stream_idle_timeout.as_secs_f64()
                        ))))
                        .await;
                    return;
                }
            };
            idle_since = tokio::time::Instant::now();
            let msg = match next {
                Ok(Some(msg)) => msg,
                // the client closed its side (or the server is draining): the answers in
                // flight still go out
                Ok(None) => break,
                Err(status) => {
                    let _ = tx.send(Err(super::status::stream_status(status))).await;
                    return;
                }
            };
            let timeout =
                stream_deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            let service = service.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                service.stream_one(msg, timeout, &tx).await;
                drop(slot);
            });
        }
        // every answer in flight holds a sender: the stream ends when the last is sent
    });
    ReceiverStream::new(rx)
}
