//! Prometheus metrics and logging set-up.
//!
//! Every metric carries the `aiaas_` prefix, HELP text, base units and, when per model, the
//! `model` and `version` labels. Per-model label values are resolved once at load time
//! ([`ModelMetrics`], in `model.rs`; a generative model's [`GenerationMetrics`], in
//! `generation.rs`), so the hot path touches only atomics. `logging.rs` sets up tracing.

mod generation;
mod logging;
mod model;

use self::generation::GenerationFamilies;
pub use self::generation::GenerationMetrics;

pub use self::logging::init_logging;
use self::model::TextSeries;
pub use self::model::{ModelMetrics, RequestTotals};

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    core::Collector, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 100 µs to 10 s (roughly 1-2.5-5 per decade).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Batch-size buckets: powers of two up to 256.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Buckets of `aiaas_batch_tokens`: padded tokens per forward pass.
pub const TOKEN_BUCKETS: &[f64] = &[
    16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
];

/// The protocol a prediction request came over: the `protocol` label of
/// `aiaas_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Http, Protocol::Grpc];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Outcomes of a prediction request, a small fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    ClientError,
    Rejected,
    Timeout,
    Dropped,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Success,
        Outcome::ClientError,
        Outcome::Rejected,
        Outcome::Timeout,
        Outcome::Dropped,
        Outcome::Error,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::ClientError => "client_error",
            Outcome::Rejected => "rejected",
            Outcome::Timeout => "timeout",
            Outcome::Dropped => "dropped",
            Outcome::Error => "error",
        }
    }
}

/// Every metric family of the server.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_duration: HistogramVec,
    compute_duration: HistogramVec,
    batch_size: HistogramVec,
    batch_tokens: HistogramVec,
    tokens: IntCounterVec,
    inferences: IntCounterVec,
    executions: IntCounterVec,
    pending: IntGaugeVec,
    model_state: IntGaugeVec,
    load_duration: GaugeVec,
    batch_cap: IntGaugeVec,
    queue_delay: GaugeVec,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
    pub grpc_in_flight: IntGauge,
    rejected: IntCounterVec,
    model_memory: IntGaugeVec,
    resident_memory: IntGaugeVec,
    gpu_memory: IntGaugeVec,
    memory_budget: IntGaugeVec,
    model_loads: IntCounterVec,
    evictions: IntCounterVec,
    load_wait: HistogramVec,
    generation: GenerationFamilies,
}

/// Model states, as the `state` label of `aiaas_model_state` spells them.
const STATES: [&str; 6] = [
    "loading",
    "ready",
    "unloading",
    "unavailable",
    "failed",
    "unloaded",
];

/// Seconds a request may wait for a model to load: from a small model on a fast disk to a
/// large one.
const LOAD_WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn histogram(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram definition")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

/// The labels of per-model metrics.
const MODEL_VERSION: &[&str] = &["model", "version"];

impl Metrics {
    /// Creates and registers every metric; `build` labels the `aiaas_build_info` series.
    pub fn new(build: &BuildInfo) -> Arc<Self> {
        let registry = Registry::new();
        let m = Metrics {
            requests: counter(
                "aiaas_requests_total",
                "Prediction requests by model, version, protocol (http, grpc) and outcome (success, client_error, rejected, timeout, dropped, error).",
                &["model", "version", "protocol", "outcome"],
            ),
            request_duration: histogram(
                "aiaas_request_duration_seconds",
                "End-to-end duration of prediction requests, from the first byte read to the response, in seconds.",
                LATENCY_BUCKETS,
                MODEL_VERSION,
            ),
            queue_duration: histogram(
                "aiaas_queue_duration_seconds",
                "Time items waited in the batch queue before their forward pass started, in seconds.",
                LATENCY_BUCKETS,
                MODEL_VERSION,
            ),
            compute_duration: histogram(
                "aiaas_compute_duration_seconds",
                "Duration of forward passes (stacking inputs and splitting outputs included), in seconds.",
                LATENCY_BUCKETS,
                MODEL_VERSION,
            ),
            batch_size: histogram(
                "aiaas_batch_size",
                "Rows per forward pass.",
                BATCH_BUCKETS,
                MODEL_VERSION,
            ),
            batch_tokens: histogram(
                "aiaas_batch_tokens",
                "Text models: tokens per forward pass, padding included (rows x padded sequence length), the size the token budget bounds.",
                TOKEN_BUCKETS,
                MODEL_VERSION,
            ),
            tokens: counter(
                "aiaas_tokens_total",
                "Text models: tokens computed, kind=\"real\" (the texts' own) or \"padded\" (padding included); padded / real is the padding waste.",
                &["model", "version", "kind"],
            ),
            inferences: counter(
                "aiaas_inferences_total",
                "Rows (examples) inferred successfully.",
                MODEL_VERSION,
            ),
            executions: counter(
                "aiaas_executions_total",
                "Forward passes executed successfully; inferences / executions is the mean batch size.",
                MODEL_VERSION,
            ),
            pending: IntGaugeVec::new(
                Opts::new(
                    "aiaas_pending_requests",
                    "Rows waiting in the batch queue now: the signal to autoscale on.",
                ),
                MODEL_VERSION,
            )
            .expect("valid gauge"),
            model_state: IntGaugeVec::new(
                Opts::new(
                    "aiaas_model_state",
                    "1 for the state each model version is in (loading, ready, unloading, unavailable, failed).",
                ),
                &["model", "version", "state"],
            )
            .expect("valid gauge"),
            load_duration: GaugeVec::new(
                Opts::new(
                    "aiaas_model_load_duration_seconds",
                    "Time the last load of a model version took, warm-up included, in seconds.",
                ),
                MODEL_VERSION,
            )
            .expect("valid gauge"),
            batch_cap: IntGaugeVec::new(
                Opts::new(
                    "aiaas_batch_cap",
                    "Largest batch the queue forms now: max_batch_size, or the adaptive cap under a latency target.",
                ),
                MODEL_VERSION,
            )
            .expect("valid gauge"),
            queue_delay: GaugeVec::new(
                Opts::new(
                    "aiaas_queue_delay_seconds",
                    "How long the oldest request may wait for a batch to fill now: max_queue_delay, or the adaptive delay.",
                ),
                MODEL_VERSION,
            )
            .expect("valid gauge"),
            http_requests: counter(
                "aiaas_http_requests_total",
                "HTTP requests by route template, method and status class.",
                &["route", "method", "status"],
            ),
            http_duration: histogram(
                "aiaas_http_request_duration_seconds",
                "HTTP request duration by route template, in seconds.",
                LATENCY_BUCKETS,
                &["route", "method"],
            ),
            http_in_flight: IntGauge::new(
                "aiaas_http_requests_in_flight",
                "HTTP requests being served now.",
            )
            .expect("valid gauge"),
            grpc_requests: counter(
                "aiaas_grpc_requests_total",
                "gRPC calls by method (the service's RPC names) and status code.",
                &["method", "code"],
            ),
            grpc_duration: histogram(
                "aiaas_grpc_request_duration_seconds",
                "gRPC call duration by method, in seconds (a stream: until it ends).",
                LATENCY_BUCKETS,
                &["method"],
            ),
            grpc_in_flight: IntGauge::new(
                "aiaas_grpc_requests_in_flight",
                "gRPC calls being served now (open streams included).",
            )
            .expect("valid gauge"),
            rejected: counter(
                "aiaas_rejected_requests_total",
                "Requests refused before reaching a model: concurrency_limit, unauthenticated, forbidden.",
                &["reason"],
            ),
            model_memory: IntGaugeVec::new(
                Opts::new(
                    "aiaas_model_memory_bytes",
                    "Memory a loaded model version holds on its device, measured at load after warm-up (growth of the heap bytes in use on CPU).",
                ),
                &["model", "version", "device"],
            )
            .expect("valid gauge"),
            resident_memory: IntGaugeVec::new(
                Opts::new(
                    "aiaas_model_memory_resident_bytes",
                    "Sum of aiaas_model_memory_bytes per device: what counts against --model-memory-budget.",
                ),
                &["device"],
            )
            .expect("valid gauge"),
            gpu_memory: IntGaugeVec::new(
                Opts::new(
                    "aiaas_gpu_memory_bytes",
                    "Bytes libtorch's CUDA caching allocator holds on each GPU: allocated (in tensors) and reserved (taken from the driver: allocated plus cached for reuse). Absent without GPUs.",
                ),
                &["device", "kind"],
            )
            .expect("valid gauge"),
            memory_budget: IntGaugeVec::new(
                Opts::new(
                    "aiaas_model_memory_budget_bytes",
                    "The --model-memory-budget of each device (absent without one).",
                ),
                &["device"],
            )
            .expect("valid gauge"),
            model_loads: counter(
                "aiaas_model_loads_total",
                "Model version loads by reason: startup, on_demand (a request found it not in memory), explicit (management API), poll (new in the repository), reload (files changed or reload asked).",
                &["model", "reason"],
            ),
            evictions: counter(
                "aiaas_model_evictions_total",
                "Models unloaded to make room in the memory budget (least recently used first).",
                &["model"],
            ),
            load_wait: histogram(
                "aiaas_model_load_wait_seconds",
                "Time requests waited for their model to be loaded on demand, in seconds.",
                LOAD_WAIT_BUCKETS,
                &["model"],
            ),
            generation: GenerationFamilies::new(),
            registry,
        };
        let info = IntGaugeVec::new(
            Opts::new(
                "aiaas_build_info",
                "Build and runtime information; the value is always 1.",
            ),
            &["version", "revision", "torch_version", "devices"],
        )
        .expect("valid gauge");
        info.with_label_values(&[
            build.version,
            build.revision,
            build.torch_version,
            &build.devices,
        ])
        .set(1);
        let mut collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.queue_duration.clone()),
            Box::new(m.compute_duration.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.batch_tokens.clone()),
            Box::new(m.tokens.clone()),
            Box::new(m.inferences.clone()),
            Box::new(m.executions.clone()),
            Box::new(m.pending.clone()),
            Box::new(m.model_state.clone()),
            Box::new(m.load_duration.clone()),
            Box::new(m.batch_cap.clone()),
            Box::new(m.queue_delay.clone()),
            Box::new(m.http_requests.clone()),
            Box::new(m.http_duration.clone()),
            Box::new(m.http_in_flight.clone()),
            Box::new(m.grpc_requests.clone()),
            Box::new(m.grpc_duration.clone()),
            Box::new(m.grpc_in_flight.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.model_memory.clone()),
            Box::new(m.resident_memory.clone()),
            Box::new(m.gpu_memory.clone()),
            Box::new(m.memory_budget.clone()),
            Box::new(m.model_loads.clone()),
            Box::new(m.evictions.clone()),
            Box::new(m.load_wait.clone()),
            Box::new(info),
        ];
        collectors.extend(m.generation.collectors());
        for reason in ["concurrency_limit", "unauthenticated", "forbidden"] {
            m.rejected.with_label_values(&[reason]);
        }
        for c in collectors {
            m.registry.register(c).expect("metric registered once");
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registered once");
        Arc::new(m)
    }

    /// Handles for one model version, resolved once.
    pub fn for_model(&self, model: &str, version: u64) -> Arc<ModelMetrics> {
        let v = version.to_string();
        let l = [model, v.as_str()];
        Arc::new(ModelMetrics {
            success: RequestTotals::default(),
            failure: RequestTotals::default(),
            outcomes: Protocol::ALL.map(|p| {
                Outcome::ALL.map(|o| {
                    self.requests
                        .with_label_values(&[model, v.as_str(), p.as_str(), o.as_str()])
                })
            }),
            request_duration: self.request_duration.with_label_values(&l),
            queue_duration: self.queue_duration.with_label_values(&l),
            compute_duration: self.compute_duration.with_label_values(&l),
            batch_size: self.batch_size.with_label_values(&l),
            text: TextSeries {
                batch_tokens: self.batch_tokens.clone(),
                tokens: self.tokens.clone(),
                labels: [model.to_string(), v.clone()],
                resolved: std::sync::OnceLock::new(),
            },
            inferences: self.inferences.with_label_values(&l),
            executions: self.executions.with_label_values(&l),
            load_duration: self.load_duration.with_label_values(&l),
            batch_cap: self.batch_cap.with_label_values(&l),
            queue_delay: self.queue_delay.with_label_values(&l),
        })
    }

    /// A generative model version's handles, resolved once: its scheduler's observer.
    pub fn generation(&self, model: &str, version: u64) -> Arc<GenerationMetrics> {
        Arc::new(self.generation.for_model(model, &version.to_string()))
    }

    /// Removes every series of a model version (after unload), so that dead series do not
    /// linger; counters restart from zero if the version is loaded again, which PromQL's
    /// `rate()` handles as a reset.
    pub fn forget_model(&self, model: &str, version: u64) {
        let v = version.to_string();
        let l = [model, v.as_str()];
        for o in Outcome::ALL {
            let _ = self
                .requests
                .remove_label_values(&[model, v.as_str(), o.as_str()]);
        }
        for h in [
            &self.request_duration,
            &self.queue_duration,
            &self.compute_duration,
            &self.batch_size,
            &self.batch_tokens,
        ] {
            let _ = h.remove_label_values(&l);
        }
        for kind in ["real", "padded"] {
            let _ = self.tokens.remove_label_values(&[model, v.as_str(), kind]);
        }
        let _ = self.inferences.remove_label_values(&l);
        let _ = self.executions.remove_label_values(&l);
        let _ = self.pending.remove_label_values(&l);
        let _ = self.load_duration.remove_label_values(&l);
        let _ = self.batch_cap.remove_label_values(&l);
        let _ = self.queue_delay.remove_label_values(&l);
        self.generation.forget(model, v.as_str());
    }

    /// Marks `state` as the state of a model version (1) and every other state 0.
    pub fn set_state(&self, model: &str, version: u64, state: &str) {
        let v = version.to_string();
        for s in STATES {
            self.model_state
                .with_label_values(&[model, v.as_str(), s])
                .set((s == state) as i64);
        }
    }

    /// Counts a load of a model version and why it happened.
    pub fn model_loaded(&self, model: &str, reason: &str) {
        self.model_loads.with_label_values(&[model, reason]).inc();
    }

    /// Counts an eviction.
    pub fn model_evicted(&self, model: &str) {
        self.evictions.with_label_values(&[model]).inc();
    }

    /// Records how long a request waited for its model to load.
    pub fn load_waited(&self, model: &str, waited: Duration) {
        self.load_wait
            .with_label_values(&[model])
            .observe(waited.as_secs_f64());
    }

    /// The measured footprint of a loaded model version.
    pub fn set_model_memory(&self, model: &str, version: u64, device: &str, bytes: u64) {
        self.model_memory
            .with_label_values(&[model, version.to_string().as_str(), device])
            .set(bytes as i64);
    }

    /// Drops the footprint series of an unloaded model version.
    pub fn forget_model_memory(&self, model: &str, version: u64, device: &str) {
        let _ =
            self.model_memory
                .remove_label_values(&[model, version.to_string().as_str(), device]);
    }

    /// A GPU's allocator bytes.
    pub fn set_gpu_memory(&self, device: &str, allocated: u64, reserved: u64) {
        for (kind, bytes) in [("allocated", allocated), ("reserved", reserved)] {
            self.gpu_memory
                .with_label_values(&[device, kind])
                .set(bytes as i64);
        }
    }

    /// The footprint resident on `device` and its budget, if it has one.
    pub fn set_device_memory(&self, device: &str, resident: u64, budget: Option<u64>) {
        self.resident_memory
            .with_label_values(&[device])
            .set(resident as i64);
        if let Some(budget) = budget {
            self.memory_budget
                .with_label_values(&[device])
                .set(budget as i64);
        }
    }

    /// Drops the state series of a model version that is gone from the repository.
    pub fn forget_state(&self, model: &str, version: u64) {
        let v = version.to_string();
        for s in STATES {
            let _ = self
                .model_state
                .remove_label_values(&[model, v.as_str(), s]);
        }
    }

    /// Rows waiting in a model version's queue.
    pub fn set_pending(&self, model: &str, version: u64, rows: usize) {
        self.pending
            .with_label_values(&[model, version.to_string().as_str()])
            .set(rows as i64);
    }

    /// Counts a request refused before reaching a model.
    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Counts one HTTP request by route template (never the raw path).
    pub fn observe_http(&self, route: &str, method: &str, status: u16, duration: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests
            .with_label_values(&[route, method, class])
            .inc();
        self.http_duration
            .with_label_values(&[route, method])
            .observe(duration.as_secs_f64());
    }

    /// Counts one gRPC call: `method` is one of the service's fixed RPC names and `code` a gRPC
    /// status name, so a client cannot create series.
    pub fn observe_grpc(&self, method: &'static str, code: &'static str, duration: Duration) {
        self.grpc_requests.with_label_values(&[method, code]).inc();
        self.grpc_duration
            .with_label_values(&[method])
            .observe(duration.as_secs_f64());
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// What the binary is and runs on.
#[derive(Debug, Clone)]
pub struct BuildInfo {
    pub version: &'static str,
    pub revision: &'static str,
    pub torch_version: &'static str,
    /// Devices libtorch can use, e.g. `cpu` or `cpu,cuda:0`.
    pub devices: String,
}
