//! Lock-free counters of one model's queue, read by metadata and statistics endpoints.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Default)]
pub struct BatchStats {
    requests: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    timed_out: AtomicU64,
    failed_rows: AtomicU64,
    inferred_rows: AtomicU64,
    inferred_items: AtomicU64,
    forward_passes: AtomicU64,
    queue_ns: AtomicU64,
    compute_ns: AtomicU64,
    input_ns: AtomicU64,
    infer_ns: AtomicU64,
    output_ns: AtomicU64,
    last_inference_ms: AtomicU64,
    real_tokens: AtomicU64,
    padded_tokens: AtomicU64,
}

/// Where a forward pass's time went: stacking inputs, the engine, splitting outputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StatsSnapshot {
    /// Items accepted into the queue.
    pub requests: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Items dropped because their client left.
    pub dropped: u64,
    /// Items dropped because their deadline passed before compute.
    pub timed_out: u64,
    /// Rows whose forward pass failed.
    pub failed_rows: u64,
    /// Rows computed successfully.
    pub inferred_rows: u64,
    /// Items computed successfully.
    pub inferred_items: u64,
    /// Successful forward passes.
    pub forward_passes: u64,
    /// Total time items spent queued, in nanoseconds.
    pub queue_ns: u64,
    /// Total time of successful forward passes, in nanoseconds.
    pub compute_ns: u64,
    /// Per item computed, the time spent stacking its batch's inputs (cumulative, ns).
    pub input_ns: u64,
    /// Per item computed, its batch's engine time (cumulative, ns).
    pub infer_ns: u64,
    /// Per item computed, the time spent splitting its batch's outputs (cumulative, ns).
    pub output_ns: u64,
    /// When the last forward pass finished, in milliseconds since the Unix epoch (0: never).
    pub last_inference_ms: u64,
    /// Text models: tokens of the texts computed (their own, unpadded).
    pub real_tokens: u64,
    /// Text models: tokens the forward passes computed, padding included.
    pub padded_tokens: u64,
}

impl StatsSnapshot {
    /// Text models: padded tokens per real token (1.0: no padding); `None` before any.
    pub fn padding_waste(&self) -> Option<f64> {
        (self.real_tokens > 0).then(|| self.padded_tokens as f64 / self.real_tokens as f64)
    }

    /// Mean rows per forward pass.
    pub fn average_batch_size(&self) -> f64 {
        if self.forward_passes == 0 {
            0.0
        } else {
            self.inferred_rows as f64 / self.forward_passes as f64
        }
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl BatchStats {
    pub(super) fn add_requests(&self, n: usize) {
        self.requests.fetch_add(n as u64, Relaxed);
    }
    pub(super) fn add_rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }
    pub(super) fn add_dropped(&self, timed_out: bool) {
        if timed_out {
            self.timed_out.fetch_add(1, Relaxed);
        } else {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
    pub(super) fn add_failed(&self, rows: usize) {
        self.failed_rows.fetch_add(rows as u64, Relaxed);
    }
    pub(super) fn add_batch(&self, rows: usize, items: usize, compute: Duration, phases: Phases) {
        self.inferred_rows.fetch_add(rows as u64, Relaxed);
        self.inferred_items.fetch_add(items as u64, Relaxed);
        self.forward_passes.fetch_add(1, Relaxed);
        self.compute_ns.fetch_add(nanos(compute), Relaxed);
        let n = items as u64;
        self.input_ns.fetch_add(nanos(phases.input) * n, Relaxed);
        self.infer_ns.fetch_add(nanos(phases.infer) * n, Relaxed);
        self.output_ns.fetch_add(nanos(phases.output) * n, Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.store(now, Relaxed);
    }
    pub(super) fn add_tokens(&self, real: usize, padded: usize) {
        self.real_tokens.fetch_add(real as u64, Relaxed);
        self.padded_tokens.fetch_add(padded as u64, Relaxed);
    }
    pub(super) fn add_queue_time(&self, d: Duration) {
        self.queue_ns.fetch_add(nanos(d), Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            failed_rows: self.failed_rows.load(Relaxed),
            inferred_rows: self.inferred_rows.load(Relaxed),
            inferred_items: self.inferred_items.load(Relaxed),
            forward_passes: self.forward_passes.load(Relaxed),
            queue_ns: self.queue_ns.load(Relaxed),
            compute_ns: self.compute_ns.load(Relaxed),
            input_ns: self.input_ns.load(Relaxed),
            infer_ns: self.infer_ns.load(Relaxed),
            output_ns: self.output_ns.load(Relaxed),
            last_inference_ms: self.last_inference_ms.load(Relaxed),
            real_tokens: self.real_tokens.load(Relaxed),
            padded_tokens: self.padded_tokens.load(Relaxed),
        }
    }
}
