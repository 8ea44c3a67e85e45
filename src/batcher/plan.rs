//! Which queued items form the next batch.
//!
//! Without token batching (images, tensors) a batch is the longest run of compatible items
//! from the front of the queue that fits in the row cap, in arrival order. Text models add
//! three rules (model.toml's `[batching]`, see [`TokenBatching`]):
//! - **token budget**: a batch's padded size (rows x its padded sequence length) stays within
//!   `max_batch_tokens`; an item over the budget alone still runs, alone;
//! - **length grouping**: a batch holds texts of one padding bucket, the oldest item's, picked
//!   from anywhere in the queue, so a 5-token text never pays for a 256-token neighbour (on a
//!   CPU a forward pass costs about its padded tokens, so a mixed batch only wastes compute);
//!   the oldest item always goes, so none waits for more batches than were queued before it;
//! - **padding buckets**: sequences are padded up to the next of a few fixed lengths
//!   ([`padded_len`]), so the engine sees a bounded set of shapes.

use std::collections::VecDeque;

use super::{assemble, BatchConfig, Pending};
use crate::config::model_spec::TokenBatching;

/// The next batch: indices into the queue, ascending, and whether it is closed (full, or the
/// next item cannot join it), so that waiting longer would not grow it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    pub picks: Vec<usize>,
    pub full: bool,
}

/// The length a sequence of `len` tokens is padded to: the smallest bucket that holds it, else
/// `len` itself (no buckets, or a length beyond the last).
pub fn padded_len(buckets: &[usize], len: usize) -> usize {
    buckets.iter().copied().find(|&b| b >= len).unwrap_or(len)
}

/// Plans the next batch of at most `cap` rows from `queue`.
pub(super) fn plan(queue: &VecDeque<Pending>, cap: usize, cfg: &BatchConfig) -> Plan {
    let Some(first) = queue.front() else {
        return Plan {
            picks: Vec::new(),
            full: false,
        };
    };
    let joins = |p: &Pending| assemble::compatible(&first.item, &p.item, &cfg.pad_values);
    match &cfg.tokens {
        None => prefix(queue, cap, joins),
        Some(t) => by_tokens(queue, cap, t, joins),
    }
}

/// The compatible run from the front, up to `cap` rows.
fn prefix(queue: &VecDeque<Pending>, cap: usize, joins: impl Fn(&Pending) -> bool) -> Plan {
    let mut rows = 0;
    for (i, p) in queue.iter().enumerate() {
        if i > 0 && (rows + p.rows > cap || !joins(p)) {
            return Plan {
                picks: (0..i).collect(),
                full: true,
            };
        }
        rows += p.rows;
    }
    Plan {
        picks: (0..queue.len()).collect(),
        full: rows >= cap,
    }
}

/// The oldest item, then others in arrival order while the batch stays within `cap` rows and
/// the token budget; with length grouping, only those of the oldest item's length group.
fn by_tokens(
    queue: &VecDeque<Pending>,
    cap: usize,
    t: &TokenBatching,
    joins: impl Fn(&Pending) -> bool,
) -> Plan {
    let first = &queue[0];
    let bucket = |len| padded_len(&t.sequence_buckets, len);
    let home = length_group(&t.sequence_buckets, first.len);
    let mut picks = vec![0];
    let (mut rows, mut longest) = (first.rows, first.len);
    let mut full = false;
    for (i, p) in queue.iter().enumerate().skip(1) {
        if t.group_by_length && length_group(&t.sequence_buckets, p.len) != home {
            // another length's batch: it goes when it is the oldest, or with its own group
            continue;
        }
        let tokens = (rows + p.rows) * bucket(longest.max(p.len));
        if !joins(p)
            || rows + p.rows > cap
            || (t.max_batch_tokens > 0 && tokens > t.max_batch_tokens)
        {
            full = true;
            break;
        }
        picks.push(i);
        rows += p.rows;
        longest = longest.max(p.len);
    }
    // no further text of this length fits in the budget either
    let budget_spent = t.max_batch_tokens > 0 && (rows + 1) * bucket(longest) > t.max_batch_tokens;
    Plan {
        picks,
        full: full || rows >= cap || budget_spent,
    }
}

/// Texts that may share a batch under length grouping: those padded to the same bucket (without
/// buckets, the same power of two from 16 up).
fn length_group(buckets: &[usize], len: usize) -> usize {
    if buckets.is_empty() {
        len.next_power_of_two().max(16)
    } else {
        padded_len(buckets, len)
    }
}

/// Removes the planned items from the queue, in queue order.
pub(super) fn take(queue: &mut VecDeque<Pending>, picks: &[usize]) -> Vec<Pending> {
    if picks.last().is_some_and(|&last| last + 1 == picks.len()) {
        return queue.drain(..picks.len()).collect();
    }
    let mut batch = Vec::with_capacity(picks.len());
    let mut rest = VecDeque::with_capacity(queue.len() - picks.len());
    let mut next = picks.iter().peekable();
    for (i, p) in queue.drain(..).enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            batch.push(p);
        } else {
            rest.push_back(p);
        }
    }
    *queue = rest;
    batch
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::tensor::HostTensor;
    use crate::tensor::Item;

    fn text(len: usize) -> Pending {
        let ids = HostTensor::from_i64(vec![1, len], &vec![7; len]).unwrap();
        Pending {
            item: Item::with_tokens(vec![ids], len),
            rows: 1,
            len,
            enqueued: Instant::now(),
            deadline: None,
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn config(max_batch_tokens: usize, group_by_length: bool) -> BatchConfig {
        BatchConfig {
            model: "t".into(),
            max_batch_size: 4,
            max_queue_delay: Duration::ZERO,
            queue_capacity: 100,
            pad_values: vec![Some(0.0)],
            latency_target: None,
            poll_window: Duration::ZERO,
            tokens: Some(TokenBatching {
                max_batch_tokens,
                sequence_buckets: vec![16, 32, 64, 128],
                group_by_length,
                max_length: 128,
            }),
        }
    }

    fn queue(lens: &[usize]) -> VecDeque<Pending> {
        lens.iter().map(|&l| text(l)).collect()
    }

    #[test]
    fn buckets_round_up_and_keep_longer_lengths() {
        let b = [16, 32, 64];
        assert_eq!(padded_len(&b, 1), 16);
        assert_eq!(padded_len(&b, 16), 16);
        assert_eq!(padded_len(&b, 17), 32);
        assert_eq!(padded_len(&b, 65), 65);
        assert_eq!(padded_len(&[], 9), 9);
    }

    #[test]
    fn groups_by_length_and_always_takes_the_oldest() {
        // the oldest is long: it goes, with the other long ones; the short ones wait
        let q = queue(&[100, 5, 120, 6, 7, 110]);
        let p = plan(&q, 4, &config(0, true));
        assert_eq!(p.picks, vec![0, 2, 5]);
        assert!(!p.full, "more long texts may still join");
        // the oldest is short: the short ones go
        let q = queue(&[5, 100, 6, 120, 7]);
        assert_eq!(plan(&q, 4, &config(0, true)).picks, vec![0, 2, 4]);
        let p = plan(&q, 2, &config(0, true));
        assert_eq!(p.picks, vec![0, 2]);
        assert!(p.full);
        // without buckets, powers of two group them
        let mut cfg = config(0, true);
        cfg.tokens.as_mut().unwrap().sequence_buckets.clear();
        assert_eq!(plan(&queue(&[40, 9, 60, 100]), 4, &cfg).picks, vec![0, 2]);
    }

    #[test]
    fn arrival_order_without_grouping() {
        let q = queue(&[5, 100, 6, 120, 7]);
        let p = plan(&q, 4, &config(0, false));
        assert_eq!(p.picks, vec![0, 1, 2, 3]);
    }

    #[test]
    fn the_token_budget_closes_a_batch() {
        // 3 rows of bucket 32 = 96 tokens fit in 100; a fourth does not
        for group in [false, true] {
            let q = queue(&[20, 30, 25, 31]);
            let p = plan(&q, 4, &config(100, group));
            assert_eq!(p.picks, vec![0, 1, 2]);
            assert!(p.full);
        }
        // without grouping, a long text closes the batch at once: it would raise its padding
        let q = queue(&[20, 128, 30]);
        assert_eq!(plan(&q, 4, &config(100, false)).picks, vec![0]);
        assert_eq!(plan(&q, 4, &config(100, true)).picks, vec![0, 2]);
    }

    #[test]
    fn an_item_over_the_budget_runs_alone() {
        let q = queue(&[128, 5, 6]);
        for group in [false, true] {
            let p = plan(&q, 4, &config(64, group));
            assert_eq!(p.picks, vec![0]);
            assert!(p.full);
        }
    }

    #[test]
    fn take_removes_the_picks_in_queue_order() {
        let mut q = queue(&[1, 2, 3, 4, 5]);
        let batch = take(&mut q, &[0, 2, 3]);
        assert_eq!(batch.iter().map(|p| p.len).collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(q.iter().map(|p| p.len).collect::<Vec<_>>(), [2, 5]);
        let batch = take(&mut q, &[0]);
        assert_eq!(batch[0].len, 2);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn without_token_batching_the_compatible_prefix_forms_the_batch() {
        let mut cfg = config(0, true);
        cfg.tokens = None;
        cfg.pad_values = vec![None];
        // lengths differ and do not pad: the second closes the batch
        let q = queue(&[3, 3, 4, 3]);
        let p = plan(&q, 4, &cfg);
        assert_eq!(p.picks, vec![0, 1]);
        assert!(p.full);
    }
}
