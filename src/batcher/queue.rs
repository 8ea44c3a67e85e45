//! The queue thread: the single owner of one model's queue, forming batches and handing them
//! to free engine instances.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError};

use super::worker::Job;
use super::{adaptive, plan, InferError, Pending, Shared};

/// The single owner of one model's queue, on its own OS thread so that delays are precise to
/// microseconds (tokio's timer resolution is a millisecond). Each round has three steps: wait
/// for an item, wait for a free engine instance (still taking items meanwhile), fill the batch
/// up to its cap or its delay, then dispatch it.
pub(super) fn queue_loop(
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
pub(super) fn recv_polling<T>(rx: &Receiver<T>, window: Duration) -> Result<T, RecvError> {
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
