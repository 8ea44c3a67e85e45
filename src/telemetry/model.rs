//! One model version's metric handles, resolved once at load, and what the batcher reports
//! through them.

use std::time::Duration;

use prometheus::{Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge};

use super::{Outcome, Protocol};
use crate::batcher::BatchObserver;

/// One model version's metric handles, and request totals for the v2 statistics extension.
pub struct ModelMetrics {
    /// Successful requests and their cumulative duration (ns).
    pub success: RequestTotals,
    /// Failed requests and their cumulative duration (ns).
    pub failure: RequestTotals,
    pub(super) outcomes: [[IntCounter; 6]; 2],
    pub(super) request_duration: Histogram,
    pub(super) queue_duration: Histogram,
    pub(super) compute_duration: Histogram,
    pub(super) batch_size: Histogram,
    pub(super) text: TextSeries,
    pub(super) inferences: IntCounter,
    pub(super) executions: IntCounter,
    pub(super) load_duration: Gauge,
    pub(super) batch_cap: IntGauge,
    pub(super) queue_delay: Gauge,
}

/// A text model's token series, created at its first batch (other models never have them).
pub(super) struct TextSeries {
    pub(super) batch_tokens: HistogramVec,
    pub(super) tokens: IntCounterVec,
    pub(super) labels: [String; 2],
    /// (batch tokens, real tokens, padded tokens)
    pub(super) resolved: std::sync::OnceLock<(Histogram, IntCounter, IntCounter)>,
}

impl TextSeries {
    fn observe(&self, real: usize, padded: usize) {
        let (batch, real_total, padded_total) = self.resolved.get_or_init(|| {
            let [model, version] = &self.labels;
            let l = [model.as_str(), version.as_str()];
            let kind = |k: &str| self.tokens.with_label_values(&[l[0], l[1], k]);
            (
                self.batch_tokens.with_label_values(&l),
                kind("real"),
                kind("padded"),
            )
        });
        batch.observe(padded as f64);
        real_total.inc_by(real as u64);
        padded_total.inc_by(padded as u64);
    }
}

impl ModelMetrics {
    /// Records a finished request: its outcome and, for successes, its duration.
    pub fn request(&self, protocol: Protocol, outcome: Outcome, duration: Duration) {
        let i = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("outcome in ALL");
        let p = Protocol::ALL
            .iter()
            .position(|o| *o == protocol)
            .expect("protocol in ALL");
        self.outcomes[p][i].inc();
        if outcome == Outcome::Success {
            self.request_duration.observe(duration.as_secs_f64());
            self.success.add(duration);
        } else {
            self.failure.add(duration);
        }
    }

    pub fn loaded(&self, took: Duration) {
        self.load_duration.set(took.as_secs_f64());
    }
}

impl BatchObserver for ModelMetrics {
    fn dispatched(&self, queue_time: Duration) {
        self.queue_duration.observe(queue_time.as_secs_f64());
    }
    fn tuned(&self, cap: usize, delay: Duration) {
        self.batch_cap.set(cap as i64);
        self.queue_delay.set(delay.as_secs_f64());
    }
    fn batch_tokens(&self, real: usize, padded: usize) {
        self.text.observe(real, padded);
    }
    fn batch_done(&self, rows: usize, _items: usize, compute_time: Duration, ok: bool) {
        if ok {
            self.batch_size.observe(rows as f64);
            self.compute_duration.observe(compute_time.as_secs_f64());
            self.inferences.inc_by(rows as u64);
            self.executions.inc();
        }
    }
}

/// A count of requests and their total duration.
#[derive(Debug, Default)]
pub struct RequestTotals {
    count: std::sync::atomic::AtomicU64,
    ns: std::sync::atomic::AtomicU64,
}

impl RequestTotals {
    fn add(&self, d: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        self.ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// (count, total nanoseconds)
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.count.load(Relaxed), self.ns.load(Relaxed))
    }
}
