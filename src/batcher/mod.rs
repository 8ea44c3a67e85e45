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
mod stats;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError};
use tokio::sync::oneshot;

pub use self::plan::padded_len;
pub use self::stats::{BatchStats, Phases, StatsSnapshot};
use crate::config::model_spec::TokenBatching;
use crate::engine::{Engine, EngineError};
use crate::tensor::{HostTensor, Inferred, Item};

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

/// A batch on its way to an engine thread.
struct Job {
    items: Vec<Pending>,
}

/// The single owner of one model's queue, on its own OS thread so that delays are precise to
/// microseconds (tokio's timer resolution is a millisecond). Each round has three steps: wait
/// for an item, wait for a free engine instance (still taking items meanwhile), fill the batch
/// up to its cap or its delay, then dispatch it.
fn queue_loop(
    rx: Receiver<Vec<Pending>>,
    free_rx: Receiver<(usize, Duration)>,
    instances: Vec<Sender<Job>>,
    shared: Arc<Shared>,
) {
    let mut q = BatchQueue::new(rx, free_rx, instances, shared);
    while q.wait_for_items() {
        let Some(instance) = q.wait_for_instance() else {
            return;
        };
        let waited = q.fill();
        q.dispatch(instance, waited);
    }
}

/// The queue thread's state: queued items, free engine instances, and the batch cap and delay
/// (fixed, or tuned at run time by adaptive batching).
struct BatchQueue {
    rx: Receiver<Vec<Pending>>,
    /// False once every handle is gone: what is queued is still answered, nothing new comes.
    open: bool,
    queue: VecDeque<Pending>,
    /// Instances report here when they finish a batch, with its compute time.
    free_rx: Receiver<(usize, Duration)>,
    /// Free instances, most recently used last.
    idle: Vec<usize>,
    instances: Vec<Sender<Job>>,
    tuner: Option<adaptive::Tuner>,
    shared: Arc<Shared>,
}

/// What woke the queue thread while it waited for a free instance.
enum Wake {
    Free(Result<(usize, Duration), RecvError>),
    Items(Result<Vec<Pending>, RecvError>),
    /// The earliest deadline in the queue may have passed.
    Deadline,
}

impl BatchQueue {
    fn new(
        rx: Receiver<Vec<Pending>>,
        free_rx: Receiver<(usize, Duration)>,
        instances: Vec<Sender<Job>>,
        shared: Arc<Shared>,
    ) -> Self {
        let cfg = &shared.config;
        let tuner = cfg
            .latency_target
            .map(|t| adaptive::Tuner::new(t, cfg.max_batch_size, cfg.max_queue_delay));
        if let Some(t) = &tuner {
            shared.observer.tuned(t.cap(), t.delay());
        }
        Self {
            rx,
            open: true,
            queue: VecDeque::new(),
            free_rx,
            idle: Vec::with_capacity(instances.len()),
            instances,
            tuner,
            shared,
        }
    }

    /// Blocks until something is queued; false when the queue is empty and closed for good.
    fn wait_for_items(&mut self) -> bool {
        if !self.queue.is_empty() {
            return true;
        }
        if !self.open {
            return false;
        }
        match recv_polling(&self.rx, self.shared.config.poll_window) {
            Ok(p) => {
                self.queue.extend(p);
                true
            }
            Err(_) => false,
        }
    }

    /// A free engine instance, the one that finished last first (its caches, and its copy of
    /// the weights, are the warmest). While none is free, items keep joining the queue and
    /// items whose deadline passes are answered. `None` when every engine thread is gone.
    fn wait_for_instance(&mut self) -> Option<usize> {
        while let Ok(back) = self.free_rx.try_recv() {
            self.came_back(back);
        }
        if let Some(i) = self.idle.pop() {
            return Some(i);
        }
        let never = crossbeam_channel::never::<Vec<Pending>>();
        loop {
            let timeout = earliest_deadline(&self.queue)
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            let incoming = if self.open { &self.rx } else { &never };
            let wake = crossbeam_channel::select! {
                recv(self.free_rx) -> free => Wake::Free(free),
                recv(incoming) -> p => Wake::Items(p),
                default(timeout) => Wake::Deadline,
            };
            match wake {
                Wake::Free(Ok(back)) => {
                    self.came_back(back);
                    return self.idle.pop();
                }
                Wake::Free(Err(_)) => {
                    // Every engine thread is gone: a bug (they catch panics).
                    fail_all(&mut self.queue, &self.rx, &self.shared);
                    return None;
                }
                Wake::Items(Ok(p)) => self.queue.extend(p),
                Wake::Items(Err(_)) => self.open = false,
                Wake::Deadline => purge(&mut self.queue, &self.shared),
            }
        }
    }

    /// An instance finished a batch; its compute time steers an adaptive batch cap.
    fn came_back(&mut self, (instance, compute): (usize, Duration)) {
        if let (Some(t), false) = (&mut self.tuner, compute.is_zero()) {
            t.on_compute(compute);
            self.shared.observer.tuned(t.cap(), t.delay());
        }
        self.idle.push(instance);
    }

    fn cap(&self) -> usize {
        self.tuner
            .as_ref()
            .map_or(self.shared.config.max_batch_size, adaptive::Tuner::cap)
    }

    fn delay(&self) -> Duration {
        self.tuner
            .as_ref()
            .map_or(self.shared.config.max_queue_delay, adaptive::Tuner::delay)
    }

    /// Lets the batch grow until it is full, the queue closes, or the delay from the oldest
    /// item's arrival runs out. Returns whether it waited at all.
    fn fill(&mut self) -> bool {
        let (cap, delay) = (self.cap(), self.delay());
        let mut waited = false;
        loop {
            drain(&self.rx, &mut self.queue, &mut self.open);
            purge(&mut self.queue, &self.shared);
            let Some(oldest) = self.queue.front() else {
                return waited;
            };
            let full = plan::plan(&self.queue, cap, &self.shared.config).full;
            if full || !self.open {
                return waited;
            }
            let until = oldest.enqueued + delay;
            let now = Instant::now();
            if now >= until {
                return waited;
            }
            waited = true;
            match self.rx.recv_timeout(until - now) {
                Ok(p) => self.queue.extend(p),
                Err(RecvTimeoutError::Timeout) => return waited,
                Err(RecvTimeoutError::Disconnected) => self.open = false,
            }
        }
    }

    /// Sends the batch at the front of the queue to `instance`; when everything queued was
    /// dropped meanwhile, the instance stays free.
    fn dispatch(&mut self, instance: usize, waited: bool) {
        let plan = plan::plan(&self.queue, self.cap(), &self.shared.config);
        if plan.picks.is_empty() {
            self.idle.push(instance);
            return;
        }
        if let Some(t) = &mut self.tuner {
            t.on_dispatch(plan.full, waited);
            self.shared.observer.tuned(t.cap(), t.delay());
        }
        let items = plan::take(&mut self.queue, &plan.picks);
        let rows: usize = items.iter().map(|p| p.rows).sum();
        self.shared.queued_rows.fetch_sub(rows, Ordering::AcqRel);
        if let Err(crossbeam_channel::SendError(job)) = self.instances[instance].send(Job { items })
        {
            for p in job.items {
                let _ = p.reply.send(Err(InferError::Stopped {
                    model: self.shared.config.model.clone(),
                }));
            }
        }
    }
}

/// Receives from `rx`, first polling it for `window` (yielding the CPU between tries to any
/// thread that wants it), then blocking.
fn recv_polling<T>(rx: &Receiver<T>, window: Duration) -> Result<T, RecvError> {
    if !window.is_zero() {
        let until = Instant::now() + window;
        loop {
            match rx.try_recv() {
                Ok(v) => return Ok(v),
                Err(TryRecvError::Disconnected) => return Err(RecvError),
                Err(TryRecvError::Empty) if Instant::now() < until => std::thread::yield_now(),
                Err(TryRecvError::Empty) => break,
            }
        }
    }
    rx.recv()
}

fn earliest_deadline(queue: &VecDeque<Pending>) -> Option<Instant> {
    queue.iter().filter_map(|p| p.deadline).min()
}

fn drain(rx: &Receiver<Vec<Pending>>, queue: &mut VecDeque<Pending>, open: &mut bool) {
    loop {
        match rx.try_recv() {
            Ok(p) => queue.extend(p),
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                *open = false;
                return;
            }
        }
    }
}

/// Drops items whose client left or whose deadline passed, wherever they are in the queue.
fn purge(queue: &mut VecDeque<Pending>, shared: &Shared) {
    let now = Instant::now();
    let dead = |p: &Pending| p.reply.is_closed() || p.deadline.is_some_and(|d| now >= d);
    if !queue.iter().any(dead) {
        return;
    }
    let mut kept = VecDeque::with_capacity(queue.len());
    for p in queue.drain(..) {
        if !dead(&p) {
            kept.push_back(p);
            continue;
        }
        let timed_out = !p.reply.is_closed();
        shared.queued_rows.fetch_sub(p.rows, Ordering::AcqRel);
        shared.stats.add_dropped(timed_out);
        shared.observer.dropped(timed_out);
        if timed_out {
            let _ = p.reply.send(Err(InferError::Timeout {
                model: shared.config.model.clone(),
            }));
        }
    }
    *queue = kept;
}

fn fail_all(queue: &mut VecDeque<Pending>, rx: &Receiver<Vec<Pending>>, shared: &Shared) {
    while let Ok(p) = rx.try_recv() {
        queue.extend(p);
    }
    for p in queue.drain(..) {
        shared.queued_rows.fetch_sub(p.rows, Ordering::AcqRel);
        let _ = p.reply.send(Err(InferError::Stopped {
            model: shared.config.model.clone(),
        }));
    }
}

/// Runs jobs on one engine until the queue task goes away.
fn engine_thread(
    index: usize,
    mut engine: Box<dyn Engine>,
    jobs: Receiver<Job>,
    free_tx: Sender<(usize, Duration)>,
    shared: Arc<Shared>,
) {
    while let Ok(job) = recv_polling(&jobs, shared.config.poll_window) {
        let started = std::time::Instant::now();
        run_job(engine.as_mut(), job, &shared);
        if free_tx.send((index, started.elapsed())).is_err() {
            break;
        }
    }
    tracing::debug!(model = %shared.config.model, instance = index, "engine thread exits");
}

fn run_job(engine: &mut dyn Engine, job: Job, shared: &Shared) {
    let cfg = &shared.config;
    // Queue time ends here, when an engine takes the items up (as in Triton's queue
    // duration), so the engine thread's wake-up counts as queueing, not as nothing.
    let picked = Instant::now();
    // A client may have left while the job waited for this thread.
    let (items, gone): (Vec<Pending>, Vec<Pending>) =
        job.items.into_iter().partition(|p| !p.reply.is_closed());
    for _ in &gone {
        shared.stats.add_dropped(false);
        shared.observer.dropped(false);
    }
    if items.is_empty() {
        return;
    }
    for p in &items {
        shared.observer.dispatched(picked - p.enqueued);
    }
    let started = std::time::Instant::now();
    let result = forward(engine, &items, cfg);
    match result {
        Ok(outputs) => reply_all(items, outputs, picked, started, shared),
        Err(err) if err.is_device_failure() => {
            // the device, not an item, failed: no retries one by one on it
            tracing::error!(model = %cfg.model, error = %err, items = items.len(),
                "device failure: the batch fails and the model stops taking requests");
            // the first failure is the reason the model gives from then on
            let _ = shared.failure.set(err.to_string());
            for p in items {
                fail(p, err.clone(), started, shared);
            }
        }
        Err(err) if items.len() > 1 => {
            // One bad item must not fail its neighbours: run each alone to find it.
            tracing::warn!(model = %cfg.model, error = %err, items = items.len(),
                "batched forward failed; retrying items one by one");
            shared
                .observer
                .batch_done(0, items.len(), started.elapsed(), false);
            for p in items {
                let single_start = std::time::Instant::now();
                match forward(engine, std::slice::from_ref(&p), cfg) {
                    Ok(outputs) => reply_all(vec![p], outputs, picked, single_start, shared),
                    Err(err) => fail(p, err, single_start, shared),
                }
            }
        }
        Err(err) => {
            let p = items.into_iter().next().expect("one item");
            fail(p, err, started, shared)
        }
    }
}

fn fail(p: Pending, err: EngineError, started: std::time::Instant, shared: &Shared) {
    shared.stats.add_failed(p.rows);
    shared
        .observer
        .batch_done(p.rows, 1, started.elapsed(), false);
    // logged once, with the request, by whoever answers the request
    let _ = p.reply.send(Err(InferError::Engine {
        model: shared.config.model.clone(),
        source: err,
    }));
}

/// Outputs per item, the time spent stacking inputs, in the forward pass and splitting, and
/// for text models the padded tokens of the batch.
struct Forwarded {
    outputs: Vec<Vec<HostTensor>>,
    phases: Phases,
    padded_tokens: Option<usize>,
}

/// Stacks the items, runs the engine, and returns per item its output rows.
fn forward(
    engine: &mut dyn Engine,
    items: &[Pending],
    cfg: &BatchConfig,
) -> Result<Forwarded, EngineError> {
    let t0 = std::time::Instant::now();
    let parts: Vec<&Item> = items.iter().map(|p| &p.item).collect();
    let buckets = cfg.tokens.as_ref().map_or(&[][..], |t| &t.sequence_buckets);
    let inputs = assemble::stack(&parts, &cfg.pad_values, buckets)?;
    let total: usize = items.iter().map(|p| p.rows).sum();
    // a text batch's inputs are [rows, padded length]
    let padded_tokens = cfg
        .tokens
        .as_ref()
        .and_then(|_| inputs.first())
        .map(|t| t.shape.iter().product());
    let t1 = std::time::Instant::now();
    let outputs = engine.forward(inputs)?;
    let t2 = std::time::Instant::now();
    let outputs = assemble::split(&outputs, items.iter().map(|p| p.rows), total)?;
    Ok(Forwarded {
        outputs,
        phases: Phases {
            input: t1 - t0,
            infer: t2 - t1,
            output: t2.elapsed(),
        },
        padded_tokens,
    })
}

fn reply_all(
    items: Vec<Pending>,
    forwarded: Forwarded,
    picked: Instant,
    started: std::time::Instant,
    shared: &Shared,
) {
    let compute_time = started.elapsed();
    let rows: usize = items.iter().map(|p| p.rows).sum();
    let outputs = forwarded.outputs;
    shared
        .stats
        .add_batch(rows, items.len(), compute_time, forwarded.phases);
    shared
        .observer
        .batch_done(rows, items.len(), compute_time, true);
    if let Some(padded) = forwarded.padded_tokens {
        let real = items.iter().map(|p| p.item.tokens).sum();
        shared.stats.add_tokens(real, padded);
        shared.observer.batch_tokens(real, padded);
    }
    for (p, outputs) in items.into_iter().zip(outputs) {
        let queue_time = picked - p.enqueued;
        shared.stats.add_queue_time(queue_time);
        let _ = p.reply.send(Ok(Inferred {
            outputs,
            tokens: p.item.tokens,
            batch_size: rows,
            queue_time,
            compute_time,
        }));
    }
}

#[cfg(test)]
mod tests;
