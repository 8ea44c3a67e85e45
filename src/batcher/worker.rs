//! The engine threads: each runs its instance's forward passes and replies to every item of
//! the batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::queue::recv_polling;
use super::{assemble, BatchConfig, InferError, Pending, Phases, Shared};
use crate::engine::{Engine, EngineError};
use crate::tensor::{HostTensor, Inferred, Item};

/// A batch on its way to an engine thread.
pub(super) struct Job {
    pub(super) items: Vec<Pending>,
}

/// Runs jobs on one engine until the queue task goes away.
pub(super) fn engine_thread(
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
