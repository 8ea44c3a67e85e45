//! The accept loop: HTTP connections with the bounds a slow, stalled or greedy client must not
//! get around, and a graceful close.
//!
//! - Each connection must deliver a request's headers within `header_timeout`, counted from its
//!   opening or from the end of its previous response; so the same bound closes idle keep-alive
//!   connections (hyper's `header_read_timeout`, which needs a timer: without one, as in
//!   `axum::serve`, a connection that sends nothing stays open for ever).
//! - At most `max_connections` are served at once. Past that, a small overflow is still admitted
//!   with a half-second header timeout and no keep-alive, so that a health probe or a real client
//!   gets through while connections that send nothing are shed within half a second; past the
//!   overflow, new connections are closed at once.
//! - On shutdown the listener closes; a connection with a request in progress finishes it with
//!   `Connection: close` (hyper's graceful shutdown), and one with none (idle keep-alive, silent,
//!   or a head still arriving) may still begin one within a second, then is closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Connection limits (flags `--header-timeout` and `--max-connections`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    /// Time to receive a request's headers, from the connection's opening or the end of its
    /// previous response: also the idle keep-alive timeout.
    pub header_timeout: Duration,
    /// Connections served at once with keep-alive.
    pub max_connections: usize,
}

/// Connections admitted past `max_connections`, each for one request with a short header
/// timeout: room for probes while slow clients hold the rest.
pub const OVERFLOW_CONNECTIONS: usize = 64;
/// At shutdown, how long a connection with no request in progress may still begin one (or a
/// just-accepted one send its first bytes) before it is closed.
const CLOSING_GRACE: Duration = Duration::from_secs(1);
/// The header timeout of an overflow connection.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_millis(500);

/// Raises the process's open-file limit to its hard limit, so that `max_connections` is not cut
/// short by a low default; returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// Serves `router` on `listener` until `stop` resolves, then closes the listener and shuts the
/// open connections down gracefully; resolves when they have all closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ConnectionSettings,
    stop: impl std::future::Future<Output = ()>,
) {
    let normal = builder(settings.header_timeout, true);
    let overflow = builder(OVERFLOW_HEADER_TIMEOUT, false);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let spare = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    // set once the listener closes; every connection task holds a `done` sender, so the
    // receiver ends when the last one has finished
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let (done, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let (permit, builder, header_timeout) = match slots.clone().try_acquire_owned() {
            Ok(p) => (p, &normal, settings.header_timeout),
            Err(_) => match spare.clone().try_acquire_owned() {
                Ok(p) => (p, &overflow, OVERFLOW_HEADER_TIMEOUT),
                Err(_) => {
                    drop(stream);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        bound_unsent(&stream);
        // requests of this connection whose answer is not yet produced
        let busy = Arc::new(AtomicUsize::new(0));
        let service = {
            let busy = busy.clone();
            router
                .clone()
                .map_request(move |mut req: hyper::Request<Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req.map(axum::body::Body::new)
                })
                .map_future(move |answer| {
                    let guard = Busy::start(&busy);
                    async move {
                        let response = answer.await;
                        drop(guard);
                        response
                    }
                })
        };
        let service = TowerToHyperService::new(service);
        let builder = builder.clone();
        let mut closing = closing.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _done = done;
            let _permit = permit;
            // hyper's header timeout starts once it knows the protocol; until then (it waits
            // for the first bytes, to tell HTTP/1 from HTTP/2) the same bound applies here
            let started = tokio::select! {
                ok = first_bytes(&stream, header_timeout) => ok,
                // closing: a client that has just connected still gets its first request read
                _ = async {
                    closed(&mut closing).await;
                    tokio::time::sleep(CLOSING_GRACE).await;
                } => false,
            };
            if !started {
                return;
            }
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = closed(&mut closing) => {
                    // answers now carry `Connection: close`: a request in progress, or one that
                    // begins within the grace, is answered and then the connection closes; a
                    // connection with none (idle keep-alive, silent, a head still arriving) is
                    // closed after the grace, once an answer being written has gone out
                    let grace_end = tokio::time::Instant::now() + CLOSING_GRACE;
                    loop {
                        if busy.load(Ordering::Acquire) > 0 {
                            conn.as_mut().graceful_shutdown();
                            break conn.as_mut().await;
                        }
                        if tokio::time::Instant::now() >= grace_end {
                            conn.as_mut().graceful_shutdown();
                            break tokio::time::timeout(CLOSING_GRACE, conn.as_mut())
                                .await
                                .unwrap_or(Ok(()));
                        }
                        tokio::select! {
                            r = conn.as_mut() => break r,
                            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drop(done);
    let _ = all_done.recv().await;
}

/// Resolves once the listener has closed.
async fn closed(closing: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

/// Counts a request as in progress on its connection from the moment it is read until its
/// answer is produced, also when its future is dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// HTTP/2's connection preface: a client that starts with it speaks HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client sent enough to tell its protocol within `timeout`: a byte that is not
/// HTTP/2's preface, or the whole preface. False when it sent nothing or closed.
async fn first_bytes(stream: &tokio::net::TcpStream, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(n)) if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] => return true,
            // part of the preface: wait for the rest (peek returns at once while bytes wait)
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
    }
}

fn builder(header_timeout: Duration, keep_alive: bool) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(keep_alive);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Bytes a connection's socket holds unsent before it stops taking more (`TCP_NOTSENT_LOWAT`).
/// Without it the kernel's send buffer grows to megabytes for a client that does not read, and a
/// stream nobody reads (a generative model's answer) would be computed that far ahead before the
/// server noticed; with it the server sees a stalled reader within a few chunks. What is in
/// flight to a reading client is not limited by this, only what waits behind it.
const NOT_SENT_LOW_WATER: libc::c_int = 16 * 1024;

fn bound_unsent(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let value = NOT_SENT_LOW_WATER;
    // SAFETY: a valid socket descriptor, and the option's value is a c_int of the given size
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
