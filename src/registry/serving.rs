//! A serving model version and the seam for how it runs.
//!
//! [`ServingModel`] is what the table hands out: a loaded, warmed-up version with its spec,
//! codec and metrics. How its work is run is its [`Runner`]; the registry's rooms (lifecycle,
//! leases, the memory ledger, polling) ask the runner what they need — queued work, a device
//! failure, retirement — and never look at which kind of runner it is.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::batcher::{BatchConfig, BatchObserver, ModelHandle};
use crate::codec::ModelCodec;
use crate::config::model_spec::ModelSpec;
use crate::engine::Engine;
use crate::telemetry::ModelMetrics;

/// How a serving model runs its work.
#[derive(Debug, Clone)]
pub enum Runner {
    /// A batch queue over its engine instances: requests are answered from batched forward
    /// passes. (Next: `Generative(...)` for a generative scheduler.)
    Batched(ModelHandle),
}

impl Runner {
    /// Starts a batch queue over `engines`, reporting to `metrics`.
    pub(super) fn spawn_batched(
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
        }
    }

    /// Gives up this runner and waits, off the async workers, until every other holder of it
    /// is gone, the work it accepted is answered and its threads have exited (dropping its
    /// engines and so their memory).
    pub(super) async fn retire(self) {
        let retired = match self {
            Runner::Batched(handle) => handle.retire(),
        };
        let _ = tokio::task::spawn_blocking(move || retired.wait()).await;
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
    /// Memory it holds on `device`, measured at load after warm-up (see [`super::memory`]).
    pub memory_bytes: u64,
    /// Requests holding it now ([`super::ModelLease`]s).
    pub(super) leases: AtomicUsize,
    /// When a request last took it, in microseconds since the registry started.
    pub(super) last_used: AtomicU64,
}

impl ServingModel {
    /// The batch queue that takes its work. Every model is batched for now, so this is the
    /// queue itself; with a second kind of runner it becomes an `Option`.
    pub fn batched(&self) -> &ModelHandle {
        match &self.runner {
            Runner::Batched(handle) => handle,
        }
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
