//! A generative model version's metrics: the metric families (registered once with the others)
//! and [`GenerationMetrics`], the handles of one model version, resolved at load, through which
//! its scheduler reports as a [`GenerationObserver`].

use std::time::Duration;

use prometheus::{
    core::Collector, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts,
};

use super::{counter, histogram, LATENCY_BUCKETS, MODEL_VERSION};
use crate::generate::observe::{EndReason, GenerationObserver};

/// Seconds from a request's arrival to its first token: a short prompt alone to a long queue.
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Seconds between two tokens of a sequence (1 ms to 5 s), densest where decode steps are.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 0.75, 1.0, 2.5, 5.0,
];
/// Seconds from a request's arrival to its last token: a few tokens to thousands.
const E2E_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Seconds a request waited before its sequence joined the running batch.
const QUEUE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Tokens computed in one step: one running sequence's token to long prompts.
const STEP_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];

/// Every reason a sequence ends, in the order of [`reason_index`].
const REASONS: [EndReason; 5] = [
    EndReason::Stop,
    EndReason::Length,
    EndReason::Cancelled,
    EndReason::TimedOut,
    EndReason::Error,
];

fn reason_index(reason: EndReason) -> usize {
    match reason {
        EndReason::Stop => 0,
        EndReason::Length => 1,
        EndReason::Cancelled => 2,
        EndReason::TimedOut => 3,
        EndReason::Error => 4,
    }
}

fn gauge(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["model", "version", "state"]).expect("valid gauge")
}

/// The generation metric families, registered once; series per model version.
pub(super) struct GenerationFamilies {
    ttft: HistogramVec,
    inter_token: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generated_tokens: IntCounterVec,
    preemptions: IntCounterVec,
    step_time: HistogramVec,
    step_tokens: HistogramVec,
    sequences: IntGaugeVec,
    kv_blocks: IntGaugeVec,
    prefix_queried: IntCounterVec,
    prefix_hit: IntCounterVec,
}

impl GenerationFamilies {
    pub(super) fn new() -> GenerationFamilies {
        GenerationFamilies {
            ttft: histogram(
                "aiaas_generation_time_to_first_token_seconds",
                "Generative models: time from a request's arrival to its first generated token (queue and prompt computation included), in seconds.",
                TTFT_BUCKETS,
                MODEL_VERSION,
            ),
            inter_token: histogram(
                "aiaas_generation_inter_token_latency_seconds",
                "Generative models: time between two consecutive generated tokens of a sequence, in seconds.",
                INTER_TOKEN_BUCKETS,
                MODEL_VERSION,
            ),
            e2e: histogram(
                "aiaas_generation_e2e_seconds",
                "Generative models: time from a request's arrival to the end of its sequence, whatever ended it, in seconds.",
                E2E_BUCKETS,
                MODEL_VERSION,
            ),
            queue: histogram(
                "aiaas_generation_queue_seconds",
                "Generative models: time a request waited before its sequence joined the running batch, in seconds.",
                QUEUE_BUCKETS,
                MODEL_VERSION,
            ),
            requests: counter(
                "aiaas_generation_requests_total",
                "Generative models: sequences ended, by reason (stop: a stop string or end-of-sequence token; length: max_tokens or the context; cancelled: the client left; timed_out: its deadline passed or its reader stalled; error).",
                &["model", "version", "reason"],
            ),
            prompt_tokens: counter(
                "aiaas_generation_prompt_tokens_total",
                "Generative models: prompt tokens of admitted sequences (counted once, not again when a preempted sequence is recomputed).",
                MODEL_VERSION,
            ),
            generated_tokens: counter(
                "aiaas_generation_generated_tokens_total",
                "Generative models: tokens generated; its rate is the output tokens per second.",
                MODEL_VERSION,
            ),
            preemptions: counter(
                "aiaas_generation_preemptions_total",
                "Generative models: sequences that lost their KV blocks to make room for others and are recomputed later.",
                MODEL_VERSION,
            ),
            step_time: histogram(
                "aiaas_generation_step_seconds",
                "Generative models: compute time of one scheduler step (one forward pass over the running sequences), in seconds.",
                LATENCY_BUCKETS,
                MODEL_VERSION,
            ),
            step_tokens: histogram(
                "aiaas_generation_step_tokens",
                "Generative models: tokens computed in one scheduler step, prompt tokens and one per decoding sequence.",
                STEP_TOKEN_BUCKETS,
                MODEL_VERSION,
            ),
            sequences: gauge(
                "aiaas_generation_sequences",
                "Generative models: sequences now running (in the batch, those paused for a slow reader included) and waiting (queued for KV blocks), by state.",
            ),
            kv_blocks: gauge(
                "aiaas_generation_kv_blocks",
                "Generative models: KV-cache blocks of the model's pool, state=\"used\" (held by sequences), \"cached\" (in the prefix cache, held or kept for later sequences) and \"total\".",
            ),
            prefix_queried: counter(
                "aiaas_generation_prefix_cache_queried_tokens_total",
                "Generative models: tokens of admitted sequences looked up in the prefix cache (a preempted sequence's again when it comes back).",
                MODEL_VERSION,
            ),
            prefix_hit: counter(
                "aiaas_generation_prefix_cache_hit_tokens_total",
                "Generative models: tokens found in the prefix cache (not computed again); over the queried tokens, the cache's hit rate.",
                MODEL_VERSION,
            ),
        }
    }

    pub(super) fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.ttft.clone()),
            Box::new(self.inter_token.clone()),
            Box::new(self.e2e.clone()),
            Box::new(self.queue.clone()),
            Box::new(self.requests.clone()),
            Box::new(self.prompt_tokens.clone()),
            Box::new(self.generated_tokens.clone()),
            Box::new(self.preemptions.clone()),
            Box::new(self.step_time.clone()),
            Box::new(self.step_tokens.clone()),
            Box::new(self.sequences.clone()),
            Box::new(self.kv_blocks.clone()),
            Box::new(self.prefix_queried.clone()),
            Box::new(self.prefix_hit.clone()),
        ]
    }

    /// The series of one model version (created now: they show as zeros until it generates).
    pub(super) fn for_model(&self, model: &str, version: &str) -> GenerationMetrics {
        let l = [model, version];
        let state = |g: &IntGaugeVec, s: &str| g.with_label_values(&[model, version, s]);
        GenerationMetrics {
            ttft: self.ttft.with_label_values(&l),
            inter_token: self.inter_token.with_label_values(&l),
            e2e: self.e2e.with_label_values(&l),
            queue: self.queue.with_label_values(&l),
            ends: REASONS.map(|r| {
                self.requests
                    .with_label_values(&[model, version, r.label()])
            }),
            prompt_tokens: self.prompt_tokens.with_label_values(&l),
            generated_tokens: self.generated_tokens.with_label_values(&l),
            preemptions: self.preemptions.with_label_values(&l),
            step_time: self.step_time.with_label_values(&l),
            step_tokens: self.step_tokens.with_label_values(&l),
            running: state(&self.sequences, "running"),
            waiting: state(&self.sequences, "waiting"),
            blocks_used: state(&self.kv_blocks, "used"),
            blocks_total: state(&self.kv_blocks, "total"),
            blocks_cached: state(&self.kv_blocks, "cached"),
            prefix_queried: self.prefix_queried.with_label_values(&l),
            prefix_hit: self.prefix_hit.with_label_values(&l),
        }
    }

    /// Removes every series of a model version.
    pub(super) fn forget(&self, model: &str, version: &str) {
        let l = [model, version];
        for h in [
            &self.ttft,
            &self.inter_token,
            &self.e2e,
            &self.queue,
            &self.step_time,
            &self.step_tokens,
        ] {
            let _ = h.remove_label_values(&l);
        }
        for c in [
            &self.prompt_tokens,
            &self.generated_tokens,
            &self.preemptions,
            &self.prefix_queried,
            &self.prefix_hit,
        ] {
            let _ = c.remove_label_values(&l);
        }
        for r in REASONS {
            let _ = self
                .requests
                .remove_label_values(&[model, version, r.label()]);
        }
        for (g, s) in [
            (&self.sequences, "running"),
            (&self.sequences, "waiting"),
            (&self.kv_blocks, "used"),
            (&self.kv_blocks, "total"),
            (&self.kv_blocks, "cached"),
        ] {
            let _ = g.remove_label_values(&[model, version, s]);
        }
    }
}

/// One generative model version's metric handles: its scheduler's observer.
pub struct GenerationMetrics {
    ttft: Histogram,
    inter_token: Histogram,
    e2e: Histogram,
    queue: Histogram,
    /// `aiaas_generation_requests_total` by reason, in the order of [`REASONS`]
    ends: [IntCounter; 5],
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    preemptions: IntCounter,
    step_time: Histogram,
    step_tokens: Histogram,
    running: IntGauge,
    waiting: IntGauge,
    blocks_used: IntGauge,
    blocks_total: IntGauge,
    blocks_cached: IntGauge,
    prefix_queried: IntCounter,
    prefix_hit: IntCounter,
}

impl GenerationObserver for GenerationMetrics {
    fn admitted(&self, queue_time: Duration, prompt_tokens: usize) {
        self.queue.observe(queue_time.as_secs_f64());
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }
    fn first_token(&self, ttft: Duration) {
        self.ttft.observe(ttft.as_secs_f64());
        self.generated_tokens.inc();
    }
    fn next_token(&self, gap: Duration) {
        self.inter_token.observe(gap.as_secs_f64());
        self.generated_tokens.inc();
    }
    fn finished(&self, e2e: Duration, _generated: usize, reason: EndReason) {
        self.e2e.observe(e2e.as_secs_f64());
        self.ends[reason_index(reason)].inc();
    }
    fn preempted(&self) {
        self.preemptions.inc();
    }
    fn step(&self, prompt_tokens: usize, decode_tokens: usize, compute_time: Duration) {
        self.step_time.observe(compute_time.as_secs_f64());
        self.step_tokens
            .observe((prompt_tokens + decode_tokens) as f64);
    }
    fn prefix_cache(&self, queried: usize, hit: usize) {
        self.prefix_queried.inc_by(queried as u64);
        self.prefix_hit.inc_by(hit as u64);
    }
    fn state(
        &self,
        running: usize,
        waiting: usize,
        blocks_used: usize,
        blocks_total: usize,
        blocks_cached: usize,
    ) {
        self.running.set(running as i64);
        self.waiting.set(waiting as i64);
        self.blocks_used.set(blocks_used as i64);
        self.blocks_total.set(blocks_total as i64);
        self.blocks_cached.set(blocks_cached as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use super::super::{BuildInfo, Metrics};
    use super::*;

    fn metrics() -> std::sync::Arc<Metrics> {
        Metrics::new(&BuildInfo {
            version: "test",
            revision: "test",
            torch_version: "test",
            devices: "cpu".to_string(),
        })
    }

    /// The samples of the exposition text: (name, labels) -> value.
    fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            out.insert((name.to_string(), labels), value.parse().unwrap());
        }
        out
    }

    /// The value of one series of model "chat" version 3, with `extra` labels.
    fn value(text: &str, name: &str, extra: &[(&str, &str)]) -> f64 {
        let mut labels: BTreeMap<String, String> = [("model", "chat"), ("version", "3")]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if name.ends_with("_bucket") {
            labels.entry("le".into()).or_insert_with(|| "+Inf".into());
        }
        *samples(text)
            .get(&(name.to_string(), labels.clone()))
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    }

    fn families(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    }

    /// One sequence's life as a scheduler reports it: the series hold what it reported.
    #[test]
    fn observer_calls_become_series_with_model_and_version() {
        let m = metrics();
        let g = m.generation("chat", 3);
        let ms = Duration::from_millis;
        g.admitted(ms(20), 27);
        g.step(27, 0, ms(250));
        g.first_token(ms(70));
        g.step(0, 1, ms(125));
        g.next_token(ms(12));
        g.next_token(ms(3000));
        g.preempted();
        g.prefix_cache(40, 32);
        g.prefix_cache(27, 0);
        g.state(2, 5, 7, 64, 3);
        g.finished(ms(1500), 3, EndReason::Stop);
        g.finished(ms(250), 1, EndReason::Cancelled);
        let text = m.render();
        let v = |name: &str, extra: &[(&str, &str)]| value(&text, name, extra);

        assert_eq!(v("aiaas_generation_queue_seconds_count", &[]), 1.0);
        assert_eq!(v("aiaas_generation_queue_seconds_sum", &[]), 0.02);
        assert_eq!(v("aiaas_generation_prompt_tokens_total", &[]), 27.0);
        assert_eq!(v("aiaas_generation_generated_tokens_total", &[]), 3.0);
        assert_eq!(
            v("aiaas_generation_time_to_first_token_seconds_count", &[]),
            1.0
        );
        assert_eq!(
            v("aiaas_generation_time_to_first_token_seconds_sum", &[]),
            0.07
        );
        let itl = "aiaas_generation_inter_token_latency_seconds_bucket";
        assert_eq!(v(itl, &[("le", "0.015")]), 1.0);
        assert_eq!(v(itl, &[("le", "2.5")]), 1.0);
        assert_eq!(v(itl, &[("le", "5")]), 2.0);
        assert_eq!(v("aiaas_generation_e2e_seconds_count", &[]), 2.0);
        assert_eq!(v("aiaas_generation_e2e_seconds_sum", &[]), 1.75);
        for (reason, n) in [
            ("stop", 1.0),
            ("length", 0.0),
            ("cancelled", 1.0),
            ("timed_out", 0.0),
            ("error", 0.0),
        ] {
            let got = v("aiaas_generation_requests_total", &[("reason", reason)]);
            assert_eq!(got, n, "{reason}");
        }
        assert_eq!(v("aiaas_generation_preemptions_total", &[]), 1.0);
        assert_eq!(v("aiaas_generation_step_seconds_count", &[]), 2.0);
        assert_eq!(v("aiaas_generation_step_seconds_sum", &[]), 0.375);
        let tokens = "aiaas_generation_step_tokens_bucket";
        assert_eq!(v(tokens, &[("le", "1")]), 1.0);
        assert_eq!(v(tokens, &[("le", "16")]), 1.0);
        assert_eq!(v(tokens, &[("le", "32")]), 2.0);
        assert_eq!(v("aiaas_generation_step_tokens_sum", &[]), 28.0);
        let seq = "aiaas_generation_sequences";
        assert_eq!(v(seq, &[("state", "running")]), 2.0);
        assert_eq!(v(seq, &[("state", "waiting")]), 5.0);
        assert_eq!(v("aiaas_generation_kv_blocks", &[("state", "used")]), 7.0);
        assert_eq!(v("aiaas_generation_kv_blocks", &[("state", "total")]), 64.0);
        assert_eq!(v("aiaas_generation_kv_blocks", &[("state", "cached")]), 3.0);
        let queried = "aiaas_generation_prefix_cache_queried_tokens_total";
        assert_eq!(v(queried, &[]), 67.0);
        assert_eq!(
            v("aiaas_generation_prefix_cache_hit_tokens_total", &[]),
            32.0
        );
        // every family has its help text
        for family in families(&text)
            .iter()
            .filter(|f| f.starts_with("aiaas_generation_"))
        {
            assert!(
                text.contains(&format!("# HELP {family} Generative models: ")),
                "{family}"
            );
        }
    }

    /// Unloading a version removes its series (as forget_model removes a model's), and only its.
    #[test]
    fn unloading_removes_the_versions_series() {
        let m = metrics();
        let chat = m.generation("chat", 3);
        let other = m.generation("other", 1);
        for g in [&chat, &other] {
            g.first_token(Duration::from_millis(5));
            g.state(1, 0, 2, 8, 1);
        }
        m.forget_model("chat", 3);
        let text = m.render();
        assert!(!text.contains("model=\"chat\""), "{text}");
        let other_lines = text
            .lines()
            .filter(|l| l.starts_with("aiaas_generation_") && l.contains("model=\"other\""))
            .count();
        // 4 histograms x 19-24 lines each and the rest: every family still has its series
        assert!(other_lines > 40, "{text}");
        assert_eq!(
            families(&text)
                .iter()
                .filter(|f| f.starts_with("aiaas_generation_"))
                .count(),
            14
        );
        m.forget_model("other", 1);
        assert!(!m.render().contains("aiaas_generation_"));
    }

    /// The dashboard's generation panels query series a generative model exports. (The
    /// server test of the dashboard, tests/observability.rs, runs the bundled models, which
    /// include no generative one.)
    #[test]
    fn the_dashboard_queries_generation_series_that_exist() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/grafana/dashboards/aiaas.json");
        let dashboard = std::fs::read_to_string(path).unwrap();
        let m = metrics();
        m.generation("chat", 3);
        let exported = families(&m.render());
        let mut queried = BTreeSet::new();
        for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("aiaas_generation_") {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                queried.insert(format!("aiaas_generation_{base}"));
            }
        }
        for needed in [
            "aiaas_generation_time_to_first_token_seconds",
            "aiaas_generation_inter_token_latency_seconds",
            "aiaas_generation_generated_tokens_total",
            "aiaas_generation_sequences",
            "aiaas_generation_kv_blocks",
            "aiaas_generation_preemptions_total",
        ] {
            assert!(
                queried.contains(needed),
                "the dashboard has no panel on {needed}"
            );
        }
        for name in &queried {
            assert!(
                exported.contains(name),
                "the dashboard queries {name}, never exported"
            );
        }
    }
}
