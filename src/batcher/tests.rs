//! Batcher behaviour with a fake engine (no libtorch). Delays are checked as lower bounds (an
//! item never leaves before its delay); "it did not wait" as a queue time under the configured
//! delay, or under [`HAND_OFF`] where there is none, so a slow machine cannot fail them.

use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use super::*;
use crate::tensor::{DType, HostTensor};

/// Doubles its single FP32 input; records every batch's row count; optionally waits for a
/// permit before each forward pass; fails any batch that contains the value 666.
struct FakeEngine {
    batches: Arc<Mutex<Vec<usize>>>,
    gate: Option<std_mpsc::Receiver<()>>,
    /// Simulated compute time per row.
    per_row: Duration,
}

impl Engine for FakeEngine {
    fn forward(&mut self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError> {
        if let Some(gate) = &self.gate {
            gate.recv()
                .map_err(|_| EngineError::Forward("gate closed".into()))?;
        }
        let x = &inputs[0];
        self.batches.lock().unwrap().push(x.rows());
        std::thread::sleep(self.per_row * x.rows() as u32);
        let values: Vec<f32> = x.to_f32_vec();
        if values.contains(&666.0) {
            return Err(EngineError::Forward("poisoned input".into()));
        }
        let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        Ok(vec![
            HostTensor::from_f32(x.shape.clone(), &doubled).unwrap()
        ])
    }
}

/// More than the hand-off from the caller through the queue thread to an engine thread takes on
/// a loaded machine (microseconds when idle): a queue time under it was not a wait for anything.
const HAND_OFF: Duration = Duration::from_millis(500);

struct Harness {
    handle: ModelHandle,
    batches: Arc<Mutex<Vec<usize>>>,
    gate: Option<std_mpsc::Sender<()>>,
}

/// The fake model's batching: what each test sets, the rest as [`Setup::default`].
#[derive(Debug, Clone, Copy)]
struct Setup {
    max_batch: usize,
    delay_ms: u64,
    capacity: usize,
    /// Each forward pass waits for a permit sent through [`Harness::gate`].
    gated: bool,
    poll_window: Duration,
}

impl Setup {
    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms)
    }
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            max_batch: 8,
            delay_ms: 0,
            capacity: 1024,
            gated: false,
            poll_window: Duration::ZERO,
        }
    }
}

fn harness(setup: Setup) -> Harness {
    let Setup {
        max_batch,
        delay_ms,
        capacity,
        gated,
        poll_window,
    } = setup;
    let batches = Arc::new(Mutex::new(Vec::new()));
    let (gate_tx, gate_rx) = std_mpsc::channel();
    let engine = FakeEngine {
        batches: batches.clone(),
        gate: gated.then_some(gate_rx),
        per_row: Duration::ZERO,
    };
    let config = BatchConfig {
        model: "fake".into(),
        max_batch_size: max_batch,
        max_queue_delay: Duration::from_millis(delay_ms),
        queue_capacity: capacity,
        pad_values: vec![None],
        latency_target: None,
        poll_window,
        tokens: None,
    };
    Harness {
        handle: ModelHandle::spawn(config, vec![Box::new(engine)], Arc::new(NoObserver)),
        batches,
        gate: gated.then_some(gate_tx),
    }
}

fn item(values: &[f32]) -> Item {
    Item::new(vec![
        HostTensor::from_f32(vec![values.len(), 1], values).unwrap()
    ])
}

async fn infer_one(handle: &ModelHandle, v: f32) -> Result<Inferred, InferError> {
    handle
        .infer(vec![item(&[v])], None)
        .await
        .map(|mut r| r.remove(0))
}

/// Lets the queue task and engine thread make progress without advancing the paused clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[tokio::test]
async fn max_batch_size_is_respected_and_requests_are_grouped() {
    let h = harness(Setup {
        max_batch: 8,
        delay_ms: 5,
        ..Setup::default()
    });
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let handle = h.handle.clone();
            tokio::spawn(async move { infer_one(&handle, i as f32).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap().unwrap();
        assert_eq!(
            r.outputs[0].to_f32_vec(),
            vec![2.0 * i as f32],
            "item {i} got another's row"
        );
        assert!(r.batch_size <= 8);
    }
    let batches = h.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 50);
    assert!(batches.iter().all(|&b| b <= 8), "{batches:?}");
    assert!(batches.len() < 50, "no batching happened: {batches:?}");
    let stats = h.handle.stats();
    assert_eq!(stats.inferred_rows, 50);
    assert_eq!(stats.forward_passes as usize, batches.len());
}

#[tokio::test]
async fn a_lone_request_waits_the_max_queue_delay_then_goes() {
    let setup = Setup {
        max_batch: 8,
        delay_ms: 40,
        ..Setup::default()
    };
    let h = harness(setup);
    let r = infer_one(&h.handle, 1.0).await.unwrap();
    assert_eq!(r.batch_size, 1);
    // its batch of 8 never fills: it leaves when the delay runs out, and no later
    assert!(r.queue_time >= setup.delay(), "{:?}", r.queue_time);
    assert!(
        r.queue_time < setup.delay() + HAND_OFF,
        "{:?}: held past its delay",
        r.queue_time
    );
}

#[tokio::test]
async fn a_request_arriving_within_the_delay_joins_the_batch() {
    let setup = Setup {
        max_batch: 8,
        delay_ms: 1000,
        ..Setup::default()
    };
    let h = harness(setup);
    let first = {
        let handle = h.handle.clone();
        tokio::spawn(async move { infer_one(&handle, 1.0).await })
    };
    // more than HAND_OFF after the first: a wait for a delay of its own would show
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = infer_one(&h.handle, 2.0).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.batch_size, 2);
    assert_eq!(second.batch_size, 2);
    // the delay counts from the oldest item's arrival, not the newest: both left when the first
    // had waited it, before the second had
    assert!(first.queue_time >= setup.delay(), "{:?}", first.queue_time);
    assert!(
        second.queue_time < setup.delay(),
        "{:?}: the batch waited for the second item's delay",
        second.queue_time
    );
}

#[tokio::test]
async fn a_full_batch_is_dispatched_without_waiting() {
    // a delay no machine's stall comes near: a wait for it would show
    let setup = Setup {
        max_batch: 4,
        delay_ms: 10_000,
        ..Setup::default()
    };
    let h = harness(setup);
    let results = h
        .handle
        .infer((0..4).map(|i| item(&[i as f32])).collect(), None)
        .await
        .unwrap();
    for r in &results {
        assert_eq!(r.batch_size, 4);
        assert!(
            r.queue_time < setup.delay(),
            "{:?}: the full batch waited for max_queue_delay",
            r.queue_time
        );
    }
}

#[tokio::test]
async fn zero_delay_dispatches_at_once() {
    let h = harness(Setup {
        max_batch: 8,
        ..Setup::default()
    });
    let r = infer_one(&h.handle, 3.0).await.unwrap();
    // its batch of 8 never fills, and with no delay nothing holds it back for company
    assert_eq!(r.batch_size, 1);
    assert!(
        r.queue_time < HAND_OFF,
        "{:?}: held back with no delay",
        r.queue_time
    );
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let h = harness(Setup {
        max_batch: 1,
        capacity: 3,
        gated: true,
        ..Setup::default()
    });
    let gate = h.gate.as_ref().unwrap();
    // one in the engine (blocked on the gate), three queued
    let mut tasks = Vec::new();
    for i in 0..4 {
        let handle = h.handle.clone();
        tasks.push(tokio::spawn(
            async move { infer_one(&handle, i as f32).await },
        ));
        settle().await;
    }
    assert_eq!(h.handle.queued(), 3);
    let refused = infer_one(&h.handle, 9.0).await;
    assert!(
        matches!(refused, Err(InferError::QueueFull { capacity: 3, .. })),
        "{refused:?}"
    );
    // a request of several items is admitted all or nothing
    let refused = h.handle.infer(vec![item(&[1.0]), item(&[2.0])], None).await;
    assert!(matches!(refused, Err(InferError::QueueFull { .. })));
    for _ in 0..4 {
        gate.send(()).unwrap();
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(h.handle.queued(), 0);
    assert_eq!(h.handle.stats().rejected, 2);
}

#[tokio::test]
async fn requests_whose_client_left_are_not_computed() {
    let h = harness(Setup {
        max_batch: 1,
        capacity: 16,
        gated: true,
        ..Setup::default()
    });
    let gate = h.gate.as_ref().unwrap();
    let busy = {
        let handle = h.handle.clone();
        tokio::spawn(async move { infer_one(&handle, 1.0).await })
    };
    settle().await;
    let leaving = {
        let handle = h.handle.clone();
        tokio::spawn(async move { infer_one(&handle, 2.0).await })
    };
    settle().await;
    leaving.abort(); // the client hangs up while queued
    let staying = {
        let handle = h.handle.clone();
        tokio::spawn(async move { infer_one(&handle, 3.0).await })
    };
    settle().await;
    gate.send(()).unwrap();
    gate.send(()).unwrap();
    assert_eq!(
        busy.await.unwrap().unwrap().outputs[0].to_f32_vec(),
        vec![2.0]
    );
    assert_eq!(
        staying.await.unwrap().unwrap().outputs[0].to_f32_vec(),
        vec![6.0]
    );
    assert_eq!(
        h.batches.lock().unwrap().len(),
        2,
        "the abandoned item was computed"
    );
    assert_eq!(h.handle.stats().dropped, 1);
    assert_eq!(h.handle.queued(), 0);
}

#[tokio::test]
async fn requests_past_their_deadline_are_answered_timeout_and_not_computed() {
    let h = harness(Setup {
        max_batch: 1,
        capacity: 16,
        gated: true,
        ..Setup::default()
    });
    let gate = h.gate.as_ref().unwrap();
    let busy = {
        let handle = h.handle.clone();
        tokio::spawn(async move { infer_one(&handle, 1.0).await })
    };
    settle().await;
    let deadline = Instant::now() + Duration::from_millis(20);
    let asked = Instant::now();
    let late = {
        let handle = h.handle.clone();
        tokio::spawn(async move { handle.infer(vec![item(&[2.0])], Some(deadline)).await })
    };
    // answered at its deadline, while the engine is still busy with the first item
    let late = late.await.unwrap();
    assert!(matches!(late, Err(InferError::Timeout { .. })), "{late:?}");
    assert!(asked.elapsed() >= Duration::from_millis(20));
    gate.send(()).unwrap();
    busy.await.unwrap().unwrap();
    assert_eq!(h.batches.lock().unwrap().len(), 1);
    assert_eq!(h.handle.stats().timed_out, 1);
}

#[tokio::test]
async fn one_failing_item_does_not_fail_its_batch_neighbours() {
    let h = harness(Setup {
        max_batch: 8,
        delay_ms: 10,
        capacity: 64,
        ..Setup::default()
    });
    let results: Vec<_> = futures_join(
        [1.0, 666.0, 3.0]
            .into_iter()
            .map(|v| {
                let handle = h.handle.clone();
                tokio::spawn(async move { infer_one(&handle, v).await })
            })
            .collect(),
    )
    .await;
    assert_eq!(
        results[0].as_ref().unwrap().outputs[0].to_f32_vec(),
        vec![2.0]
    );
    assert!(matches!(results[1], Err(InferError::Engine { .. })));
    assert_eq!(
        results[2].as_ref().unwrap().outputs[0].to_f32_vec(),
        vec![6.0]
    );
    assert_eq!(h.handle.stats().failed_rows, 1);
}

#[tokio::test]
async fn multi_row_items_get_exactly_their_rows() {
    let h = harness(Setup {
        max_batch: 16,
        delay_ms: 5,
        capacity: 64,
        ..Setup::default()
    });
    let a = h.handle.clone();
    let b = h.handle.clone();
    let (ra, rb) = tokio::join!(
        async move { a.infer(vec![item(&[1.0, 2.0, 3.0, 4.0])], None).await },
        async move { b.infer(vec![item(&[10.0])], None).await },
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra[0].outputs[0].to_f32_vec(), vec![2.0, 4.0, 6.0, 8.0]);
    assert_eq!(rb[0].outputs[0].to_f32_vec(), vec![20.0]);
    assert_eq!(ra[0].batch_size, 5);
    let too_big = h.handle.infer(vec![item(&[0.0; 17])], None).await;
    assert!(matches!(
        too_big,
        Err(InferError::MoreRowsThanMaxBatch {
            rows: 17,
            max: 16,
            ..
        })
    ));
    // more rows than the queue ever holds: refused for good, not "queue full, retry"
    let items: Vec<Item> = (0..65).map(|_| item(&[1.0])).collect();
    let never = h.handle.infer(items, None).await;
    assert!(matches!(
        never,
        Err(InferError::MoreRowsThanQueue {
            rows: 65,
            capacity: 64,
            ..
        })
    ));
}

#[tokio::test]
async fn dropping_the_registry_handle_lets_queued_requests_complete() {
    let h = harness(Setup {
        max_batch: 1,
        capacity: 16,
        gated: true,
        ..Setup::default()
    });
    let gate = h.gate.clone().unwrap();
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let handle = h.handle.clone();
            tokio::spawn(async move { infer_one(&handle, i as f32).await })
        })
        .collect();
    settle().await;
    drop(h.handle); // the tasks still hold clones; they are what keeps the queue alive
    for _ in 0..3 {
        gate.send(()).unwrap();
    }
    for t in tasks {
        assert!(t.await.unwrap().is_ok());
    }
}

#[tokio::test]
async fn items_of_different_shapes_do_not_share_a_batch_without_padding() {
    let h = harness(Setup {
        max_batch: 8,
        delay_ms: 5,
        capacity: 64,
        ..Setup::default()
    });
    let wide = Item::new(vec![HostTensor::zeros(DType::Fp32, vec![1, 2])]);
    let a = h.handle.clone();
    let b = h.handle.clone();
    let (ra, rb) = tokio::join!(async move { infer_one(&a, 1.0).await }, async move {
        b.infer(vec![wide], None).await
    },);
    assert_eq!(ra.unwrap().batch_size, 1);
    assert_eq!(rb.unwrap()[0].batch_size, 1);
}

#[tokio::test]
async fn retiring_waits_for_queued_work_then_drops_the_engine() {
    let h = harness(Setup {
        max_batch: 1,
        capacity: 16,
        gated: true,
        ..Setup::default()
    });
    let gate = h.gate.clone().unwrap();
    let task = {
        let handle = h.handle.clone();
        tokio::spawn(async move { infer_one(&handle, 4.0).await })
    };
    settle().await;
    let retired = h.handle.retire();
    let waiter = std::thread::spawn(move || retired.wait());
    settle().await;
    assert!(
        !waiter.is_finished(),
        "retired while a request was in flight"
    );
    gate.send(()).unwrap();
    assert_eq!(
        task.await.unwrap().unwrap().outputs[0].to_f32_vec(),
        vec![8.0]
    );
    waiter.join().unwrap();
    // the engine (and its gate receiver) is gone once the threads have exited
    assert!(gate.send(()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adaptive_batching_keeps_passes_within_half_the_latency_target() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let engine = FakeEngine {
        batches: batches.clone(),
        gate: None,
        per_row: Duration::from_millis(2),
    };
    let config = BatchConfig {
        model: "adaptive".into(),
        max_batch_size: 64,
        max_queue_delay: Duration::from_millis(5),
        queue_capacity: 4096,
        pad_values: vec![None],
        // a pass may take 10 ms: 5 rows at 2 ms each
        latency_target: Some(Duration::from_millis(20)),
        poll_window: Duration::ZERO,
        tokens: None,
    };
    let handle = ModelHandle::spawn(config, vec![Box::new(engine)], Arc::new(NoObserver));
    // 32 clients in a closed loop
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let handle = handle.clone();
            tokio::spawn(async move {
                for _ in 0..12 {
                    infer_one(&handle, 1.0).await.unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let sizes = batches.lock().unwrap().clone();
    let settled = &sizes[sizes.len() / 2..];
    let largest = settled.iter().copied().max().unwrap();
    assert!(
        (3..=6).contains(&largest),
        "batch cap did not settle near 5 rows: {settled:?}"
    );
    // alone again: the delay halves at every batch that did not fill, to nothing
    let mut waits = Vec::new();
    for _ in 0..12 {
        waits.push(infer_one(&handle, 2.0).await.unwrap().queue_time);
    }
    eprintln!("{waits:?}");
    // the last few: one of them may be stretched by the machine (a busy CPU), not by the delay
    assert!(
        waits[8..].iter().min().unwrap() < &Duration::from_millis(1),
        "{waits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_threads_batch_answer_and_retire_like_blocking_ones() {
    let h = harness(Setup {
        max_batch: 8,
        delay_ms: 5,
        poll_window: Duration::from_millis(30),
        ..Setup::default()
    });
    // concurrent requests are grouped and each gets its own row
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let handle = h.handle.clone();
            tokio::spawn(async move { infer_one(&handle, i as f32).await })
        })
        .collect();
    for (i, r) in futures_join(tasks).await.into_iter().enumerate() {
        assert_eq!(r.unwrap().outputs[0].to_f32_vec(), vec![2.0 * i as f32]);
    }
    let batches = h.batches.lock().unwrap().clone();
    assert!(batches.len() < 24, "no batching happened: {batches:?}");
    // requests arriving within the window (found by polling) and after it (the threads have
    // blocked by then) are both answered
    for (k, gap) in [1u64, 60, 2, 80].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let r = infer_one(&h.handle, k as f32).await.unwrap();
        assert_eq!(r.outputs[0].to_f32_vec(), vec![2.0 * k as f32]);
    }
    // retired while its threads are still polling: they notice and exit
    let retired = h.handle.retire();
    let waiter = std::thread::spawn(move || retired.wait());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !waiter.is_finished() {
        assert!(Instant::now() < deadline, "polling threads did not exit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    waiter.join().unwrap();
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
