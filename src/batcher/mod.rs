//! Dynamic batching: one queue per model, owned by a single task, feeding engine instances that
//! run on dedicated OS threads.
//!
//! A request handler holds a cheap [`ModelHandle`]. [`ModelHandle::infer`] reserves room in the
//! bounded queue (refusing at once when it is full), sends its items to the queue task and awaits
//! a oneshot reply. The queue task waits for a free engine instance, then takes queued items in
//! arrival order while they fit in `max_batch_size` and have compatible shapes (text models: the
//! oldest item and others of its length within a token budget, see [`plan`]), waiting at most
//! `max_queue_delay` from the oldest item's arrival for the batch to fill. Items whose client has
//! gone or whose deadline has passed are dropped before compute. The engine thread stacks the
//! items into one tensor per input (padding variable dimensions), runs the forward pass and
//! splits the outputs back into each item's rows.

mod adaptive;
mod assemble;
mod plan;
mod queue;
mod stats;
mod worker;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

pub use self::plan::padded_len;
use self::queue::queue_loop;
pub use self::stats::{BatchStats, Phases, StatsSnapshot};
use self::worker::{engine_thread, Job};
use crate::config::model_spec::TokenBatching;
use crate::engine::{Engine, EngineError};
use crate::tensor::{Inferred, Item};

/// Why an item was not computed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error("the queue of model '{model}' is full ({capacity} waiting); retry later")]
    QueueFull { model: String, capacity: usize },
    #[error("a request of {rows} rows exceeds max_batch_size {max} of model '{model}'")]
    MoreRowsThanMaxBatch {
        model: String,
        rows: usize,
        max: usize,
    },
    #[error("a request of {rows} rows can never fit in the queue of model '{model}' (queue_capacity {capacity}); send at most {capacity} at a time")]
    MoreRowsThanQueue {
        model: String,
        rows: usize,
        capacity: usize,
    },
    #[error("the request's deadline passed before model '{model}' could run it")]
    Timeout { model: String },
    #[error("model '{model}' is shutting down")]
    Stopped { model: String },
    #[error("model '{model}': {source}")]
    Engine { model: String, source: EngineError },
    /// The model generates text (it has a scheduler, not a batch queue).
    #[error(
        "'{model}' is a text-generation model: use POST /v1/chat/completions or /v1/completions"
    )]
    NotBatched { model: String },
}

/// Batching parameters of one model.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Used in error messages and logs.
    pub model: String,
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    /// Rows that may wait in the queue.
    pub queue_capacity: usize,
    /// Per input: the value that pads variable dimensions, or `None` if the input never pads
    /// (then only items of equal shape share a batch).
    pub pad_values: Vec<Option<f64>>,
    /// A p99 latency budget: when set, the batch cap and queue delay are tuned at run time
    /// (see [`adaptive`]), bounded by `max_batch_size` and `max_queue_delay`.
    pub latency_target: Option<Duration>,
    /// After its last item, how long the queue thread and each engine thread keep polling their
    /// channel, yielding the CPU between tries, before they block. Zero blocks at once. A
    /// blocked thread is woken through the kernel, tens of microseconds on a VM whose idle
    /// vCPU has halted; the server sets this with `--idle-poll-us`.
    pub poll_window: Duration,
    /// Text models: the token budget, length grouping and padding buckets that shape their
    /// batches (see [`plan`]); `None` for other models.
    pub tokens: Option<TokenBatching>,
}

/// Receives batch events, e.g. to feed histograms. Every method has a no-op default.
pub trait BatchObserver: Send + Sync + 'static {
    /// An engine took an item up after `queue_time`: queueing, batch forming and the engine
    /// thread's wake-up.
    fn dispatched(&self, _queue_time: Duration) {}
    /// A forward pass of `rows` rows from `items` items took `compute_time`; `ok` tells whether
    /// it succeeded.
    fn batch_done(&self, _rows: usize, _items: usize, _compute_time: Duration, _ok: bool) {}
    /// An item was dropped before compute: its client left (`timed_out` false) or its deadline
    /// passed (`timed_out` true).
    fn dropped(&self, _timed_out: bool) {}
    /// Adaptive batching moved its batch cap or queue delay.
    fn tuned(&self, _cap: usize, _delay: Duration) {}
    /// A text model's forward pass carried `real` tokens in `padded` (rows x padded length).
    fn batch_tokens(&self, _real: usize, _padded: usize) {}
}

/// A no-op observer.
pub struct NoObserver;
impl BatchObserver for NoObserver {}

struct Pending {
    item: Item,
    rows: usize,
    /// The item's sequence length (its first input's second dimension) for token batching.
    len: usize,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Inferred, InferError>>,
}

struct Shared {
    config: BatchConfig,
    /// Rows admitted and not yet dispatched.
    queued_rows: AtomicUsize,
    stats: BatchStats,
    observer: Arc<dyn BatchObserver>,
    /// The queue and engine threads, joined when the model is retired.
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The first device failure of an engine (out of memory, a lost device): the model is
    /// failed from then on.
    failure: std::sync::OnceLock<String>,
}

/// A cheap, cloneable handle to one model's queue. When every handle is dropped the queue task
/// finishes what was accepted, then the engine threads exit and the engines are dropped.
#[derive(Clone)]
pub struct ModelHandle {
    tx: Sender<Vec<Pending>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle")
            .field("model", &self.shared.config.model)
            .finish()
    }
}

impl ModelHandle {
    /// Starts the queue thread and one OS thread per engine.
    pub fn spawn(
        config: BatchConfig,
        engines: Vec<Box<dyn Engine>>,
        observer: Arc<dyn BatchObserver>,
    ) -> ModelHandle {
        assert!(
            !engines.is_empty(),
            "a model needs at least one engine: a bug"
        );
        let shared = Arc::new(Shared {
            config,
            queued_rows: AtomicUsize::new(0),
            stats: BatchStats::default(),
            observer,
            threads: std::sync::Mutex::new(Vec::new()),
            failure: std::sync::OnceLock::new(),
        });
        let mut threads = Vec::with_capacity(engines.len() + 1);
        let (free_tx, free_rx) = crossbeam_channel::unbounded::<(usize, Duration)>();
        let mut instances = Vec::with_capacity(engines.len());
        for (index, engine) in engines.into_iter().enumerate() {
            let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
            let _ = free_tx.send((index, Duration::ZERO));
            let thread_free_tx = free_tx.clone();
            let thread_shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("engine-{index}"))
                .spawn(move || engine_thread(index, engine, job_rx, thread_free_tx, thread_shared))
                .expect("cannot spawn an engine thread");
            threads.push(thread);
            instances.push(job_tx);
        }
        drop(free_tx);
        let (tx, rx) = crossbeam_channel::unbounded();
        let queue_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("batch-queue".into())
            .spawn(move || queue_loop(rx, free_rx, instances, queue_shared))
            .expect("cannot spawn a batch queue thread");
        threads.push(thread);
        *shared.threads.lock().expect("threads lock") = threads;
        ModelHandle { tx, shared }
    }

    /// Gives up this handle. The returned [`Retired`] waits until every other handle is gone,
    /// the queue has drained (accepted items are all answered) and the engine threads have
    /// exited, dropping their engines and so the model's memory.
    pub fn retire(self) -> Retired {
        let threads = std::mem::take(&mut *self.shared.threads.lock().expect("threads lock"));
        Retired(threads)
    }

    /// Queues `items` (all or none) and waits for their results, in order. `deadline` bounds the
    /// time until compute starts; an item still queued then is answered [`InferError::Timeout`].
    ///
    /// Fails at once with [`InferError::QueueFull`] when the queue has no room for them.
    pub async fn infer(
        &self,
        items: Vec<Item>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Inferred>, InferError> {
        let cfg = &self.shared.config;
        let rows: Vec<usize> = items.iter().map(Item::rows).collect();
        if let Some(&big) = rows.iter().find(|&&r| r > cfg.max_batch_size) {
            return Err(InferError::MoreRowsThanMaxBatch {
                model: cfg.model.clone(),
                rows: big,
                max: cfg.max_batch_size,
            });
        }
        let total: usize = rows.iter().sum();
        if total > cfg.queue_capacity {
            // refused for good, not "retry later": it would never fit
            return Err(InferError::MoreRowsThanQueue {
                model: cfg.model.clone(),
                rows: total,
                capacity: cfg.queue_capacity,
            });
        }
        self.reserve(total)?;
        self.shared.stats.add_requests(items.len());
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(items.len());
        let mut submission = Vec::with_capacity(items.len());
        for (item, rows) in items.into_iter().zip(rows) {
            let (reply, rx) = oneshot::channel();
            let len = item
                .inputs
                .first()
                .and_then(|t| t.shape.get(1))
                .copied()
                .unwrap_or(0);
            submission.push(Pending {
                item,
                len,
                rows,
                enqueued: now,
                deadline,
                reply,
            });
            receivers.push(rx);
        }
        // One message per request, so that its items are queued together and can share a pass.
        if self.tx.send(submission).is_err() {
            self.shared.queued_rows.fetch_sub(total, Ordering::AcqRel);
            return Err(InferError::Stopped {
                model: cfg.model.clone(),
            });
        }
        let mut results = Vec::with_capacity(receivers.len());
        for rx in receivers {
            let result = rx.await.unwrap_or_else(|_| {
                Err(InferError::Stopped {
                    model: cfg.model.clone(),
                })
            });
            results.push(result?);
        }
        Ok(results)
    }

    fn reserve(&self, rows: usize) -> Result<(), InferError> {
        let cap = self.shared.config.queue_capacity;
        self.shared
            .queued_rows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + rows <= cap).then_some(q + rows)
            })
            .map(|_| ())
            .map_err(|_| {
                self.shared.stats.add_rejected();
                InferError::QueueFull {
                    model: self.shared.config.model.clone(),
                    capacity: cap,
                }
            })
    }

    /// The device failure that stopped this model, if one did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.get().cloned()
    }

    /// Rows waiting in the queue now (the autoscaling signal).
    pub fn queued(&self) -> usize {
        self.shared.queued_rows.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

/// A model being shut down; see [`ModelHandle::retire`].
pub struct Retired(Vec<std::thread::JoinHandle<()>>);

impl Retired {
    /// Blocks until the queue and engine threads have exited.
    pub fn wait(self) {
        for t in self.0 {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
