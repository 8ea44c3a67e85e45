//! SLO-aware adaptive batching: with a `latency_target`, the queue tunes its batch cap and its
//! queue delay at run time instead of using fixed values.
//!
//! - **Batch cap** (additive increase, multiplicative decrease, as in Clipper): a request that
//!   just misses a batch waits for it, then runs in the next one, so its latency is about two
//!   forward passes. The cap is therefore steered so that one forward pass takes at most half
//!   the target: a pass slower than that cuts the cap by 10% (at least 1), a pass comfortably
//!   faster (under 80% of it) raises it by 1, up to `max_batch_size`.
//! - **Queue delay**: waiting only pays when the batch fills. A batch dispatched because the
//!   delay ran out before it filled halves the delay; a batch that filled before the delay ran
//!   out lets it grow by 5% of the target, up to `max_queue_delay` and a quarter of the target.
//!
//! Under light load the delay drops to zero (no request waits for company that is not coming);
//! under heavy load batches fill at once and their size follows the latency budget.

use std::time::Duration;

/// The tuned values and the rules that move them.
#[derive(Debug, Clone)]
pub struct Tuner {
    target: Duration,
    max_batch: usize,
    max_delay: Duration,
    cap: usize,
    delay: Duration,
}

impl Tuner {
    pub fn new(target: Duration, max_batch: usize, max_delay: Duration) -> Self {
        Self {
            target,
            max_batch,
            max_delay: max_delay.min(target / 4),
            // start cautious: grow into the budget
            cap: max_batch.clamp(1, 4),
            delay: Duration::ZERO,
        }
    }

    /// The current batch cap (rows).
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The current queue delay.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// A forward pass of a batch took `compute`.
    pub fn on_compute(&mut self, compute: Duration) {
        let budget = self.target / 2;
        if compute > budget {
            let cut = (self.cap as f64 * 0.9).floor() as usize;
            self.cap = cut.min(self.cap.saturating_sub(1)).max(1);
        } else if compute < budget.mul_f64(0.8) {
            self.cap = (self.cap + 1).min(self.max_batch);
        }
    }

    /// A batch was dispatched; `filled` tells whether it reached the cap before the delay ran
    /// out.
    pub fn on_dispatch(&mut self, filled: bool, waited: bool) {
        if filled {
            self.delay = (self.delay + self.target.mul_f64(0.05)).min(self.max_delay);
        } else if waited {
            self.delay /= 2;
            if self.delay < Duration::from_micros(50) {
                self.delay = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_cap_grows_while_passes_are_fast_and_shrinks_when_slow() {
        let mut t = Tuner::new(100 * MS, 32, 10 * MS);
        assert_eq!(t.cap(), 4);
        for _ in 0..100 {
            t.on_compute(10 * MS);
        }
        assert_eq!(t.cap(), 32, "fast passes grow the cap to max_batch_size");
        t.on_compute(80 * MS);
        assert_eq!(t.cap(), 28, "a pass over half the target cuts 10%");
        for _ in 0..100 {
            t.on_compute(200 * MS);
        }
        assert_eq!(t.cap(), 1, "never below one row");
        // in the comfort band nothing moves
        let before = t.cap();
        t.on_compute(45 * MS);
        assert_eq!(t.cap(), before);
    }

    #[test]
    fn the_delay_follows_whether_batches_fill() {
        let mut t = Tuner::new(100 * MS, 32, 20 * MS);
        assert_eq!(t.delay(), Duration::ZERO);
        for _ in 0..10 {
            t.on_dispatch(true, false);
        }
        assert_eq!(
            t.delay(),
            20 * MS,
            "capped by max_queue_delay (and a quarter of the target)"
        );
        t.on_dispatch(false, true);
        assert_eq!(
            t.delay(),
            10 * MS,
            "a wait that did not fill the batch halves the delay"
        );
        for _ in 0..20 {
            t.on_dispatch(false, true);
        }
        assert_eq!(t.delay(), Duration::ZERO);
        // a batch sent at once because an instance was free and nothing else queued changes nothing
        t.on_dispatch(false, false);
        assert_eq!(t.delay(), Duration::ZERO);
        assert_eq!(Tuner::new(40 * MS, 8, 50 * MS).max_delay, 10 * MS);
    }
}
