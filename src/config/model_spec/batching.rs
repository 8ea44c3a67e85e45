//! How a model's requests are batched (`[batching]`) and which versions are served
//! (`version_policy`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Dynamic batching settings (Triton's `dynamic_batching` block).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSpec {
    /// Largest number of rows in one forward pass; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the oldest queued request may wait for the batch to fill, in milliseconds.
    /// 0 (the default, as in Triton) dispatches as soon as an instance is free; batches still
    /// form under load from requests that queue while the instances compute.
    pub max_queue_delay_ms: f64,
    /// Requests (rows) that may wait; beyond this new requests are refused with 503 at once.
    pub queue_capacity: usize,
    /// Default deadline of one request, queueing and compute, in milliseconds.
    pub timeout_ms: u64,
    /// A p99 latency budget in milliseconds: when set, the batch cap and the queue delay are
    /// tuned at run time to stay within it (bounded by max_batch_size and max_queue_delay_ms).
    pub latency_target_ms: Option<f64>,
    /// Text models: most padded tokens (rows x padded sequence length) in one batch; 0 turns
    /// the budget off. Default [`DEFAULT_MAX_BATCH_TOKENS`].
    pub max_batch_tokens: Option<usize>,
    /// Text models: the sequence lengths a batch is padded up to. Default: 16, 24, 32, 48, 64,
    /// 96, ... below `text.max_length`, and `max_length` itself; `[]` pads to the longest text.
    pub sequence_buckets: Option<Vec<usize>>,
    /// Text models: form batches of texts of similar length (the oldest queued text always
    /// goes into the next batch). Default true.
    pub group_by_length: Option<bool>,
}

/// The default token budget of a text model's batch: text-embeddings-inference's default.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 16_384;

/// How a text model's batches are formed and padded (model.toml's `[batching]`, resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenBatching {
    /// Most padded tokens in one batch (0: no budget).
    pub max_batch_tokens: usize,
    /// Sequence lengths batches are padded up to, ascending, the last `max_length`; empty: the
    /// longest text of the batch.
    pub sequence_buckets: Vec<usize>,
    pub group_by_length: bool,
    /// The longest text, in tokens (the tokenizer truncates to it).
    #[serde(skip)]
    pub max_length: usize,
}

impl TokenBatching {
    /// The model.toml settings for a model whose texts are at most `max_length` tokens.
    pub fn resolve(b: &BatchingSpec, max_length: usize) -> Result<Self, String> {
        let sequence_buckets = match &b.sequence_buckets {
            None => default_buckets(max_length),
            Some(v) if v.is_empty() => Vec::new(),
            Some(v) => {
                if v.contains(&0) || v.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("batching.sequence_buckets must be positive and ascending".into());
                }
                let mut v: Vec<usize> = v.iter().copied().filter(|&n| n < max_length).collect();
                v.push(max_length);
                v
            }
        };
        Ok(Self {
            max_batch_tokens: b.max_batch_tokens.unwrap_or(DEFAULT_MAX_BATCH_TOKENS),
            sequence_buckets,
            group_by_length: b.group_by_length.unwrap_or(true),
            max_length,
        })
    }
}

/// 16, 24, 32, 48, 64, 96, ... (powers of two and halfway between) below `max_length`, then
/// `max_length`: a text is padded by less than half its length, and a 256-token model has 9
/// shapes per batch size.
fn default_buckets(max_length: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(16usize), |n| n.checked_mul(2))
        .flat_map(|n| [n, n + n / 2])
        .take_while(|&n| n < max_length)
        .collect();
    v.push(max_length);
    v
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay_ms: 0.0,
            queue_capacity: 1024,
            timeout_ms: 30_000,
            latency_target_ms: None,
            max_batch_tokens: None,
            sequence_buckets: None,
            group_by_length: None,
        }
    }
}

impl BatchingSpec {
    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_secs_f64(self.max_queue_delay_ms / 1000.0)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    pub fn latency_target(&self) -> Option<Duration> {
        self.latency_target_ms
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
    }
}

/// Which of the versions on disk are served (Triton's `version_policy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPolicy {
    /// The `n` highest version numbers.
    Latest(usize),
    /// Exactly these versions (those present on disk).
    Specific(Vec<u64>),
    /// Every version on disk.
    All(bool),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions to serve among those `available` (ascending).
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Latest(n) => {
                let skip = available.len().saturating_sub(*n);
                available[skip..].to_vec()
            }
            VersionPolicy::Specific(wanted) => available
                .iter()
                .copied()
                .filter(|v| wanted.contains(v))
                .collect(),
            VersionPolicy::All(true) => available.to_vec(),
            VersionPolicy::All(false) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_models_get_token_batching_with_buckets_up_to_max_length() {
        assert_eq!(
            default_buckets(256),
            vec![16, 24, 32, 48, 64, 96, 128, 192, 256]
        );
        assert_eq!(default_buckets(100), vec![16, 24, 32, 48, 64, 96, 100]);
        assert_eq!(default_buckets(8), vec![8]);
        let b = BatchingSpec {
            sequence_buckets: Some(vec![10, 40, 500]),
            ..Default::default()
        };
        let t = TokenBatching::resolve(&b, 128).unwrap();
        assert_eq!(t.sequence_buckets, vec![10, 40, 128]);
        assert_eq!(t.max_batch_tokens, DEFAULT_MAX_BATCH_TOKENS);
        assert!(t.group_by_length);
        for bad in [vec![0, 8], vec![16, 16], vec![32, 16]] {
            let b = BatchingSpec {
                sequence_buckets: Some(bad),
                ..Default::default()
            };
            assert!(TokenBatching::resolve(&b, 128).is_err());
        }
    }
}
