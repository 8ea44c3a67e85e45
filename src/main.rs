//! The `aiaas` server binary: command line, logging, then [`aiaas::server::serve`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use aiaas::codec::{DecodeBudget, ImageLimits};
use aiaas::config::ModelControl;
use aiaas::connections::ConnectionSettings;
use aiaas::grpc::GrpcSettings;
use aiaas::http::ApiKeys;
use aiaas::http::HttpSettings;
use aiaas::idle_poll::IdlePolling;
use aiaas::registry::memory::MemoryBudget;
use aiaas::registry::RegistrySettings;
use aiaas::server::{serve, ServerConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// AI inference as a service: serves TorchScript models over HTTP with dynamic batching.
///
/// Every option can also be set through the environment variable shown.
#[derive(Debug, Parser)]
#[command(name = "aiaas", version, about, long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "AIAAS_HOST", default_value = "0.0.0.0")]
    host: IpAddr,

    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "AIAAS_PORT", default_value_t = 8080)]
    port: u16,

    /// Port of KServe v2 over gRPC (Triton's `inference.GRPCInferenceService`, health and
    /// reflection); 0 turns it off. Same address as --host.
    #[arg(long, env = "AIAAS_GRPC_PORT", default_value_t = 8081)]
    grpc_port: u16,

    /// Seconds an open gRPC `ModelStreamInfer` stream with no request in flight may send
    /// nothing before the server ends it (DEADLINE_EXCEEDED).
    #[arg(long, env = "AIAAS_GRPC_STREAM_IDLE_TIMEOUT", default_value_t = 600.0)]
    grpc_stream_idle_timeout: f64,

    /// Model repository: a folder with one sub-folder per model (model.toml + TorchScript file).
    #[arg(long, env = "AIAAS_MODELS", default_value = "./models")]
    models: PathBuf,

    /// Load only this model at start-up (repeat for several); default: every model found.
    #[arg(long = "load-model", env = "AIAAS_LOAD_MODELS", value_delimiter = ',')]
    load_models: Vec<String>,

    /// How models change at run time: none (fixed at start-up, management API read-only),
    /// explicit (load/unload/reload through the management API), poll (follow the repository
    /// on disk), lazy (every model listed, each loaded by the first request for it; with
    /// --model-memory-budget the least recently used idle models are evicted to make room).
    #[arg(long, env = "AIAAS_MODEL_CONTROL", value_enum, default_value = "none")]
    model_control: ModelControl,

    /// Most memory loaded models may hold: a size for every device (8GiB, 512MiB, bytes) or
    /// one per device (cpu=8GiB,cuda:0=60GiB). Each version's footprint is measured at load,
    /// after warm-up. Under --model-control lazy the least recently used idle models are
    /// evicted to make room; otherwise a load that does not fit is refused. Default: no limit.
    #[arg(long, env = "AIAAS_MODEL_MEMORY_BUDGET")]
    model_memory_budget: Option<MemoryBudget>,

    /// Seconds between two scans of the repository in poll (and lazy) mode.
    #[arg(long, env = "AIAAS_POLL_INTERVAL", default_value_t = 5.0)]
    poll_interval: f64,

    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter such as
    /// "aiaas=debug"). RUST_LOG, when set, wins.
    #[arg(long, env = "AIAAS_LOG_LEVEL", default_value = "info")]
    log_level: String,

    /// Log line format.
    #[arg(long, env = "AIAAS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Largest request body accepted, in bytes (larger bodies get 413).
    #[arg(long, env = "AIAAS_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    max_body_bytes: usize,

    /// Most instances in one /v1 predict request.
    #[arg(long, env = "AIAAS_MAX_INSTANCES", default_value_t = 1024)]
    max_instances: usize,

    /// Largest image width or height accepted, checked before decoding.
    #[arg(long, env = "AIAAS_MAX_IMAGE_DIM", default_value_t = 8192)]
    max_image_dim: u32,

    /// Most pixels (width x height) of one image, checked from its header before decoding.
    #[arg(long, env = "AIAAS_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    max_image_pixels: u64,

    /// MiB of decoded image pixels in flight across the server; images beyond it wait in
    /// arrival order (up to 10 s, then 503). 0: a sixteenth of the machine's memory, at least
    /// 256 MiB and at most 4 GiB.
    #[arg(long, env = "AIAAS_DECODE_BUDGET_MIB", default_value_t = 0)]
    decode_budget_mib: u64,

    /// Longest text accepted in one text instance, in bytes (longer texts get 413).
    #[arg(long, env = "AIAAS_MAX_TEXT_BYTES", default_value_t = 65536)]
    max_text_bytes: usize,

    /// Requests served at once; beyond this new requests get 503 with Retry-After at once.
    #[arg(long, env = "AIAAS_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    max_concurrent_requests: usize,

    /// File of API keys, one "<scope> <key>" per line (scope: infer or admin). With keys,
    /// every route but /health/* needs "Authorization: Bearer <key>". Keys may also come from
    /// AIAAS_API_KEYS as comma-separated "<scope>:<key>".
    #[arg(long, env = "AIAAS_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,

    /// With API keys configured, /metrics needs a key too (default: open).
    #[arg(long, env = "AIAAS_METRICS_AUTH")]
    metrics_auth: bool,

    /// Without API keys, allow model management from any address (default: loopback only).
    #[arg(long, env = "AIAAS_ALLOW_UNAUTHENTICATED_ADMIN")]
    allow_unauthenticated_admin: bool,

    /// libtorch's inter-op thread pool, shared by every model (TorchScript `fork`; traced
    /// models do not use it). 0 keeps libtorch's default, one per core. Per-model threading
    /// is `instances` and `intra_op_threads` in model.toml.
    #[arg(long, env = "AIAAS_INTEROP_THREADS", default_value_t = 0)]
    interop_threads: usize,

    /// Idle polling: keep the CPUs from going idle while requests are in flight and for this
    /// many microseconds after the last one, with one lowest-priority (SCHED_IDLE) thread per
    /// CPU, so that hand-offs between threads do not wait for a halted CPU to wake (tens of
    /// microseconds each on many VMs); each model's queue and engine threads also poll for work
    /// within the window instead of blocking. Trades CPU time, accounted as used, for latency at low
    /// load; not for CPU-quota-limited containers. 0: off.
    #[arg(long, env = "AIAAS_IDLE_POLL_US", default_value_t = 0)]
    idle_poll_us: u64,

    /// Seconds in-flight requests may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, env = "AIAAS_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    shutdown_timeout: f64,

    /// Seconds to keep accepting requests after SIGTERM, with readiness already failing, so
    /// that load balancers stop routing here first (0: stop accepting at once). Answers carry
    /// `Connection: close` from SIGTERM on, so keep-alive clients move their next request to a
    /// new connection within the delay.
    #[arg(long, env = "AIAAS_SHUTDOWN_DELAY", default_value_t = 0.0)]
    shutdown_delay: f64,

    /// Seconds a connection may take to send a request's headers, counted from its opening or
    /// from its previous response: also how long an idle keep-alive connection stays open.
    #[arg(long, env = "AIAAS_HEADER_TIMEOUT", default_value_t = 15.0)]
    header_timeout: f64,

    /// Seconds a request's whole body may take to arrive (slower: 408, connection closed).
    #[arg(long, env = "AIAAS_BODY_TIMEOUT", default_value_t = 60.0)]
    body_timeout: f64,

    /// Connections served at once with keep-alive; a few more (64) are admitted past it, one
    /// request each with a 0.5 s header timeout, so that probes get through while slow clients
    /// are shed; then new connections are closed. Also held below the open-file limit, which is
    /// raised to its hard limit at start.
    #[arg(long, env = "AIAAS_MAX_CONNECTIONS", default_value_t = 8192)]
    max_connections: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    aiaas::telemetry::init_logging(&args.log_level, matches!(args.log_format, LogFormat::Json));
    // keys that were asked for but came out empty (an empty file, a typo'd variable) must not
    // start a wide-open server: that is a start-up error, not a warning
    let mut api_keys = match &args.api_keys_file {
        Some(path) => {
            let keys = ApiKeys::from_file(path).map_err(anyhow::Error::msg)?;
            if keys.is_empty() {
                anyhow::bail!(
                    "--api-keys-file {} holds no keys (one '<scope> <key>' per line); refusing to start without authentication",
                    path.display()
                );
            }
            keys
        }
        None => ApiKeys::default(),
    };
    if let Ok(list) = std::env::var("AIAAS_API_KEYS") {
        let before = api_keys.len();
        api_keys.add_list(&list).map_err(anyhow::Error::msg)?;
        if api_keys.len() == before {
            anyhow::bail!(
                "AIAAS_API_KEYS is set but holds no keys (comma-separated '<scope>:<key>'); unset it to run without authentication"
            );
        }
    }
    if api_keys.is_empty() {
        tracing::warn!(
            admin = if args.allow_unauthenticated_admin {
                "open to any address"
            } else {
                "loopback only"
            },
            "no API keys configured: predictions are open"
        );
    } else {
        tracing::info!(
            keys = api_keys.len(),
            metrics_auth = args.metrics_auth,
            "API keys loaded"
        );
    }
    // one value, shared by the HTTP layer (requests keep the CPUs polling) and the models'
    // threads (they poll for work within its window)
    let idle_polling = IdlePolling::start(Duration::from_micros(args.idle_poll_us));
    let decode_budget = match args.decode_budget_mib {
        0 => (memory_bytes() / 16).clamp(256 << 20, 4 << 30),
        mib => mib << 20,
    };
    tracing::info!(mib = decode_budget >> 20, "decode budget");
    // room under the open-file limit for the overflow, model files, logs and libtorch
    let fd_limit = aiaas::connections::raise_fd_limit() as usize;
    let reserve = aiaas::connections::OVERFLOW_CONNECTIONS + 256;
    let max_connections = if fd_limit > reserve {
        args.max_connections.min(fd_limit - reserve)
    } else {
        args.max_connections
    };
    if max_connections < args.max_connections {
        tracing::warn!(
            fd_limit,
            max_connections,
            "--max-connections lowered to fit the open-file limit"
        );
    }
    let config = ServerConfig {
        addr: SocketAddr::new(args.host, args.port),
        models: args.models,
        load_models: (!args.load_models.is_empty()).then_some(args.load_models),
        http: HttpSettings {
            max_body_bytes: args.max_body_bytes,
            max_instances: args.max_instances,
            model_control: args.model_control,
            api_keys,
            metrics_auth: args.metrics_auth,
            allow_unauthenticated_admin: args.allow_unauthenticated_admin,
            max_concurrent_requests: args.max_concurrent_requests,
            idle_polling: idle_polling.clone(),
            body_timeout: positive_secs(args.body_timeout, "--body-timeout")?,
        },
        poll_interval: Duration::from_secs_f64(args.poll_interval.max(0.1)),
        registry: RegistrySettings {
            image_limits: ImageLimits {
                max_width: args.max_image_dim,
                max_height: args.max_image_dim,
                max_pixels: args.max_image_pixels,
                budget: Some(Box::leak(Box::new(DecodeBudget::new(decode_budget)))),
                ..ImageLimits::default()
            },
            max_text_bytes: args.max_text_bytes,
            idle_polling,
            memory_budget: args.model_memory_budget.unwrap_or_default(),
            lazy: args.model_control == ModelControl::Lazy,
        },
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
        shutdown_delay: Duration::from_secs_f64(args.shutdown_delay.max(0.0)),
        interop_threads: args.interop_threads,
        connections: ConnectionSettings {
            header_timeout: positive_secs(args.header_timeout, "--header-timeout")?,
            max_connections: max_connections.max(1),
        },
        grpc_addr: (args.grpc_port != 0).then(|| SocketAddr::new(args.host, args.grpc_port)),
        grpc: GrpcSettings {
            stream_idle_timeout: positive_secs(
                args.grpc_stream_idle_timeout,
                "--grpc-stream-idle-timeout",
            )?,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(config));
    // do not wait on engine threads or blocking tasks still finishing: accepted requests are
    // answered by now
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// A positive, finite number of seconds as a duration.
fn positive_secs(secs: f64, flag: &str) -> anyhow::Result<Duration> {
    if secs.is_finite() && secs > 0.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        anyhow::bail!("{flag} must be a positive number of seconds, got {secs}")
    }
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo; 4 GiB when unknown).
fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib << 10)
}
