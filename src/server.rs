//! Start-up and shutdown: bind, serve, load the models, drain on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::connections::{self, ConnectionSettings};
use crate::engine::torch;
use crate::grpc::{self, GrpcSettings};
use crate::http::{app, AppState, HttpSettings};
use crate::registry::{Registry, RegistrySettings};
use crate::repository::ModelRepository;
use crate::telemetry::{BuildInfo, Metrics};

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub models: PathBuf,
    /// Load only these models at start-up (all when `None`).
    pub load_models: Option<Vec<String>>,
    pub http: HttpSettings,
    /// Time between two repository scans in poll mode.
    pub poll_interval: Duration,
    pub registry: RegistrySettings,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_timeout: Duration,
    /// How long to keep accepting (with readiness failing) after SIGTERM before draining.
    pub shutdown_delay: Duration,
    /// libtorch's process-wide inter-op pool size (0: libtorch's default).
    pub interop_threads: usize,
    /// Header timeout and connection cap (of each listener).
    pub connections: ConnectionSettings,
    /// Where KServe v2 over gRPC listens (`None`: off).
    pub grpc_addr: Option<SocketAddr>,
    pub grpc: GrpcSettings,
}

pub fn build_info() -> BuildInfo {
    let rt = torch::runtime_info();
    let mut devices = vec!["cpu".to_string()];
    devices.extend((0..rt.cuda_devices).map(|i| format!("cuda:{i}")));
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        revision: env!("AIAAS_GIT_REVISION"),
        torch_version: rt.torch_version,
        devices: devices.join(","),
    }
}

/// Serves until SIGTERM or Ctrl-C, then drains in-flight requests and returns.
pub async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    torch::set_interop_threads(config.interop_threads);
    let build = build_info();
    tracing::info!(
        version = build.version,
        revision = build.revision,
        torch = build.torch_version,
        devices = %build.devices,
        interop_threads = torch::interop_threads(),
        models = %config.models.display(),
        model_control = config.http.model_control.as_str(),
        "starting aiaas"
    );
    let metrics = Metrics::new(&build);
    let registry = Registry::new(
        ModelRepository::new(&config.models),
        config.registry.clone(),
        std::sync::Arc::new(torch::TorchEngines),
        metrics.clone(),
    );
    let state = AppState::new(registry.clone(), metrics, config.http.clone());
    let shutting_down = state.shutting_down.clone();
    let listener = TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    // Liveness answers while models load; readiness waits for them.
    tracing::info!(%addr, "listening on {addr}");
    let grpc_listener = match config.grpc_addr {
        Some(a) => {
            let l = TcpListener::bind(a).await?;
            let addr = l.local_addr()?;
            tracing::info!(%addr, "gRPC (KServe v2) serving on {addr}");
            Some(l)
        }
        None => None,
    };
    let loader = {
        let registry = registry.clone();
        let only = config.load_models.clone();
        let (mode, interval) = (config.http.model_control, config.poll_interval);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match registry.load_startup(only.as_deref()).await {
                Ok(()) => {
                    let r = registry.readiness();
                    if r.ready {
                        tracing::info!(took_ms = started.elapsed().as_millis() as u64, "ready");
                    } else {
                        tracing::warn!(waiting_for = ?r.waiting_for, "start-up loading finished; not ready");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read the model repository"),
            }
            if mode.polls() {
                tracing::info!(
                    interval_s = interval.as_secs_f64(),
                    "polling the model repository"
                );
                loop {
                    tokio::time::sleep(interval).await;
                    registry.poll_once().await;
                }
            }
        })
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let grpc_serving = match grpc_listener {
        Some(l) => Some(tokio::spawn(connections::serve(
            l,
            grpc::router(state.clone(), config.grpc)?,
            config.connections,
            stopped(),
        ))),
        None => None,
    };
    let http_serving = tokio::spawn(connections::serve(
        listener,
        app(state),
        config.connections,
        stopped(),
    ));
    let serving = async move {
        let http = http_serving.await;
        match grpc_serving {
            Some(g) => http.and(g.await),
            None => http,
        }
    };
    shutdown_signal().await;
    // Readiness fails at once, so load balancers stop sending; the listener stays open for
    // --shutdown-delay, then closes, and every accepted request is answered.
    shutting_down.store(true, std::sync::atomic::Ordering::Release);
    loader.abort();
    tracing::info!(
        delay_s = config.shutdown_delay.as_secs_f64(),
        timeout_s = config.shutdown_timeout.as_secs_f64(),
        "shutting down: readiness is now 503"
    );
    if !config.shutdown_delay.is_zero() {
        tokio::time::sleep(config.shutdown_delay).await;
    }
    tracing::info!("no longer accepting connections; draining accepted requests");
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(config.shutdown_timeout, serving).await {
        Ok(Ok(())) => tracing::info!("drained; bye"),
        Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
        Err(_) => tracing::warn!("shutdown timeout reached with requests still in flight"),
    }
    config.http.idle_polling.stop();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
