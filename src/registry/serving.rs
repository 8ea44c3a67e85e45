//! A serving model version and the seam for how it runs.
//!
//! [`ServingModel`] is what the table hands out: a loaded, warmed-up version with its spec,
//! codec and metrics. How its work is run is its [`Runner`]; the registry's rooms (lifecycle,
//! leases, the memory ledger, polling) ask the runner what they need — queued work, a device
//! failure, retirement — and never look at which kind of runner it is.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::prepare::Work;
use crate::batcher::{BatchConfig, BatchObserver, InferError, ModelHandle, StatsSnapshot};
use crate::codec::ModelCodec;
use crate::config::model_spec::ModelSpec;
use crate::engine::Engine;
use crate::generate::generator::Generator;
use crate::generate::observe::GenerationObserver;
use crate::generate::scheduler::{KvMemory, SchedulerConfig, SchedulerHandle};
use crate::telemetry::ModelMetrics;

/// How a serving model runs its work.
#[derive(Debug, Clone)]
pub enum Runner {
    /// A batch queue over its engine instances: requests are answered from batched forward
    /// passes.
    Batched(ModelHandle),
    /// A generative model's scheduler: sequences stepped together over a paged KV cache.
    Generative(Arc<Generator>),
}

impl Runner {
    /// Starts what runs a prepared model: its batch queue, or its generative scheduler
    /// reporting to `observer`.
    pub(super) fn spawn(
        work: Work,
        model: &str,
        metrics: Arc<ModelMetrics>,
        observer: Arc<dyn GenerationObserver>,
        memory: Arc<dyn KvMemory>,
    ) -> Runner {
        let parts = match work {
            Work::Batched { engines, config } => {
                return Self::spawn_batched(config, engines, metrics)
            }
            Work::Generative(parts) => *parts,
        };
        let s = &parts.settings;
        let config = SchedulerConfig {
            model: model.to_string(),
            max_sequences: s.max_sequences,
            max_waiting: s.max_waiting,
            max_step_tokens: s.max_step_tokens,
            stream_buffer: s.stream_buffer,
            stall_timeout: s.stall_timeout(),
            prefix_caching: s.prefix_caching,
            max_decode_slowdown: s.max_decode_slowdown,
        };
        let scheduler = SchedulerHandle::spawn(
            parts.decoder,
            parts.text.tokenizer.clone(),
            config,
            observer,
            memory,
        );
        Runner::Generative(Arc::new(Generator::new(
            scheduler,
            parts.text,
            parts.settings,
            parts.vocab_size,
        )))
    }

    /// Starts a batch queue over `engines`, reporting to `metrics`.
    fn spawn_batched(
        config: BatchConfig,
        engines: Vec<Box<dyn Engine>>,
        metrics: Arc<ModelMetrics>,
    ) -> Runner {
        // fixed batching settings; an adaptive queue overwrites them as it tunes
        metrics.tuned(config.max_batch_size, config.max_queue_delay);
        Runner::Batched(ModelHandle::spawn(config, engines, metrics))
    }

    /// Rows waiting for compute now (the pending-requests gauge).
    pub fn queued(&self) -> usize {
        match self {
            Runner::Batched(handle) => handle.queued(),
            Runner::Generative(g) => g.scheduler().queued(),
        }
    }

    /// Bytes of a KV pool that grows with use, held now (counted beside the memory measured
    /// at load).
    pub fn kv_bytes(&self) -> u64 {
        match self {
            Runner::Batched(_) => 0,
            Runner::Generative(g) => g.scheduler().kv_bytes().unwrap_or(0),
        }
    }

    /// Whether work is waiting in it.
    pub(super) fn busy(&self) -> bool {
        self.queued() > 0
    }

    /// The device failure that stopped it, if one did.
    pub fn failure(&self) -> Option<String> {
        match self {
            Runner::Batched(handle) => handle.failure(),
            Runner::Generative(g) => g.scheduler().failure(),
        }
    }

    /// Gives up this runner and waits, off the async workers, until every other holder of it
    /// is gone, the work it accepted is answered and its threads have exited (dropping its
    /// engines and so their memory).
    pub(super) async fn retire(self) {
        match self {
            Runner::Batched(handle) => {
                let retired = handle.retire();
                let _ = tokio::task::spawn_blocking(move || retired.wait()).await;
            }
            Runner::Generative(g) => {
                let retired = g.scheduler().clone().retire();
                drop(g);
                let _ = tokio::task::spawn_blocking(move || retired.wait()).await;
            }
        }
    }
}

/// A loaded, warmed-up model version that can take requests.
pub struct ServingModel {
    pub name: String,
    pub version: u64,
    pub spec: Arc<ModelSpec>,
    pub codec: Arc<ModelCodec>,
    /// How its work runs.
    pub runner: Runner,
    /// The device of its first instance, e.g. `cpu` or `cuda:0`: the one the memory budget
    /// counts it on.
    pub device: String,
    /// Each engine instance's device, in order.
    pub instance_devices: Vec<String>,
    pub metrics: Arc<ModelMetrics>,
    pub load_time: Duration,
    pub warmup_time: Duration,
    pub loaded_at: SystemTime,
    /// Content fingerprint of the files it was loaded from.
    pub(super) fingerprint: u64,
    /// Memory it holds on `device`, measured at load after warm-up (see [`super::memory`]),
    /// less a KV pool that grows with use (counted apart: [`ServingModel::footprint`]).
    pub memory_bytes: u64,
    /// Requests holding it now ([`super::ModelLease`]s).
    pub(super) leases: AtomicUsize,
    /// When a request last took it, in microseconds since the registry started.
    pub(super) last_used: AtomicU64,
}

impl ServingModel {
    /// The batch queue that takes its work; a generative model has none.
    pub fn batched(&self) -> Result<&ModelHandle, InferError> {
        match &self.runner {
            Runner::Batched(handle) => Ok(handle),
            Runner::Generative(_) => Err(InferError::NotBatched {
                model: self.name.clone(),
            }),
        }
    }

    /// Its batch queue's counters (zero for a generative model).
    pub fn stats(&self) -> StatsSnapshot {
        self.batched().map(|q| q.stats()).unwrap_or_default()
    }

    /// The generative model, if it is one.
    pub fn generator(&self) -> Option<&Arc<Generator>> {
        match &self.runner {
            Runner::Generative(g) => Some(g),
            Runner::Batched(_) => None,
        }
    }

    /// What it holds on `device` now, as the memory budget counts it: the memory measured at
    /// load and its KV pool's blocks.
    pub fn footprint(&self) -> u64 {
        self.memory_bytes + self.runner.kv_bytes()
    }

    /// Whether requests are using it or waiting in its queue.
    pub(super) fn busy(&self) -> bool {
        self.leases.load(Ordering::Acquire) > 0 || self.runner.busy()
    }
}

impl std::fmt::Debug for ServingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("device", &self.device)
            .finish()
    }
}
