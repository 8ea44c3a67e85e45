//! What a generative model's scheduler reports as it runs, for metrics. The scheduler knows
//! nothing of Prometheus: telemetry implements [`GenerationObserver`] per model.

use std::time::Duration;

/// Why a sequence ended, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// A stop string or an end-of-sequence token.
    Stop,
    /// `max_tokens`, or the context length.
    Length,
    /// Its client left (disconnected, or dropped the stream).
    Cancelled,
    /// Its deadline passed, or it stalled (a stream nobody read) past its bound.
    TimedOut,
    /// The model failed while computing it.
    Error,
}

impl EndReason {
    /// The reason as a metric label value.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Stop => "stop",
            EndReason::Length => "length",
            EndReason::Cancelled => "cancelled",
            EndReason::TimedOut => "timed_out",
            EndReason::Error => "error",
        }
    }
}

/// Events of one generative model's scheduler. Every method has a no-op default.
pub trait GenerationObserver: Send + Sync + 'static {
    /// A sequence joined the running batch `queue_time` after its request arrived, with
    /// `prompt_tokens` prompt tokens to compute (counted once, not again when a preempted
    /// sequence is recomputed).
    fn admitted(&self, _queue_time: Duration, _prompt_tokens: usize) {}
    /// A sequence's first generated token, `ttft` after its request arrived.
    fn first_token(&self, _ttft: Duration) {}
    /// A sequence's next generated token, `gap` after its previous one.
    fn next_token(&self, _gap: Duration) {}
    /// A sequence ended `e2e` after its request arrived, having generated `generated` tokens.
    fn finished(&self, _e2e: Duration, _generated: usize, _reason: EndReason) {}
    /// A sequence lost its KV blocks to make room for others; it is recomputed later.
    fn preempted(&self) {}
    /// One step of the model: `prompt_tokens` prompt tokens and `decode_tokens` running
    /// sequences' tokens computed in `compute_time`.
    fn step(&self, _prompt_tokens: usize, _decode_tokens: usize, _compute_time: Duration) {}
    /// A sequence was admitted with `queried` tokens, the first `hit` of them found in the
    /// prefix cache (not computed again).
    fn prefix_cache(&self, _queried: usize, _hit: usize) {}
    /// The scheduler's state after a step or a change: sequences running (including those
    /// paused for a slow reader), waiting, KV blocks in use of the pool's total, and blocks in
    /// the prefix cache.
    fn state(
        &self,
        _running: usize,
        _waiting: usize,
        _blocks_used: usize,
        _blocks_total: usize,
        _blocks_cached: usize,
    ) {
    }
}
