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
//! - On shutdown the listener closes, idle keep-alive connections are closed at once, and busy
//!   ones finish their request with `Connection: close` (hyper's graceful shutdown).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
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
    let graceful = GracefulShutdown::new();
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
        let (permit, builder) = match slots.clone().try_acquire_owned() {
            Ok(p) => (p, &normal),
            Err(_) => match spare.clone().try_acquire_owned() {
                Ok(p) => (p, &overflow),
                Err(_) => {
                    drop(stream);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let header_timeout = if std::ptr::eq(builder, &overflow) {
            OVERFLOW_HEADER_TIMEOUT
        } else {
            settings.header_timeout
        };
        let service = router
            .clone()
            .map_request(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.map(axum::body::Body::new)
            });
        let service = TowerToHyperService::new(service);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // hyper's header timeout starts once it knows the protocol; until then (it waits
            // for the first bytes, to tell HTTP/1 from HTTP/2) the same bound applies here
            if !first_bytes(&stream, header_timeout).await {
                return;
            }
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
