//! One generative model's scheduler: continuous batching over its paged KV cache.
//!
//! One OS thread owns the model's [`Decoder`], its [`BlockPool`] and every sequence (the
//! batcher's single-owner pattern: no locks around them). Each iteration it
//! 1. takes new requests into the waiting queue, and ends sequences whose client left, whose
//!    deadline passed, or whose stream has been unread for longer than the stall bound;
//! 2. admits waiting sequences, oldest first, while the running batch has room and the pool has
//!    free blocks for their tokens; a sequence whose tokens begin with a cached prefix takes its
//!    blocks and computes only the rest (the choices of one request wait for the first one's
//!    prompt, then share it);
//! 3. plans one step: each running sequence's next token, then prompt tokens, oldest first,
//!    within the step's token budget (long prompts are computed in pieces over several steps).
//!    A sequence that needs a block when none is free takes one from a paused sequence, else
//!    from the newest running one, which is preempted: its blocks go back to the pool, and it
//!    waits at the head of the queue to be recomputed (prompt and answer so far);
//! 4. runs the step as one forward pass over all of them, caches the blocks it filled, and
//!    samples, detokenises and stops each sequence whose tokens are all computed.
//!
//! A sequence joins the batch at the step after it arrives and leaves at the step it finishes,
//! freeing its blocks at once. Its events go through a bounded channel: a client that stops
//! reading fills it, and its sequence pauses (it is not stepped, and its blocks are the first
//! taken when others need them) until the client reads again or the stall bound ends it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::constraint::Constraint;
use super::detok::{Decode, Detokenizer};
use super::observe::{EndReason, GenerationObserver};
use super::sampling::{Sampler, SamplingParams};
use super::stop::StopStrings;
use crate::engine::{Decoder, KvGeometry, PrefillInput};

mod blocks;
mod pace;

pub use blocks::{BlockPool, Hit, OutOfBlocks, ROOT};

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Checked sampling parameters.
    pub sampling: SamplingParams,
    /// Tokens to generate at most (the prompt and these fit in the context).
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Tokens that end the answer (end-of-sequence ids); empty: none do.
    pub stop_tokens: Vec<u32>,
    /// Log-probabilities to report: `None`, or the chosen token's and this many alternatives.
    pub logprobs: Option<usize>,
    /// The grammar the answer follows (structured output), compiled; each choice its own.
    pub constraint: Option<Constraint>,
    /// The streamed text keeps special tokens (tool-call markers such as `[TOOL_CALLS]`).
    pub special_text: bool,
    pub arrived: Instant,
    pub deadline: Instant,
}

/// A generated token, with its log-probability and the best alternatives when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why an answer ended, as OpenAI's `finish_reason` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a sequence's client receives, in order: tokens, then one end or one error.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it releases (empty while text is held back: an
    /// incomplete character, or what may begin a stop string). An end-of-sequence token has
    /// no event.
    Token { text: String, token: TokenInfo },
    /// The answer ended: the text still held, and the counts for `usage`.
    End {
        text: String,
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The sequence failed.
    Error(SequenceError),
}

/// Why a sequence ended without an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error("the request's deadline passed after {generated} generated tokens")]
    TimedOut { generated: usize },
    #[error("the model failed: {0}")]
    Model(String),
    #[error("the answer's grammar failed: {0}")]
    Grammar(String),
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("{waiting} sequences are waiting, the most this model queues; retry later")]
    QueueFull { waiting: usize },
    #[error("the model is shutting down")]
    Closed,
}

/// How the scheduler runs (from the model's `[generation]` settings).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub model: String,
    pub max_sequences: usize,
    pub max_waiting: usize,
    pub max_step_tokens: usize,
    /// Token events a stream holds unread before its sequence pauses.
    pub stream_buffer: usize,
    pub stall_timeout: Duration,
    /// Keep full KV blocks for later sequences that begin with the same tokens.
    pub prefix_caching: bool,
    /// Beside decoding sequences, a step carries at most the prompt tokens that make it take
    /// this many times a decode-only step (0: only `max_step_tokens` bounds it).
    pub max_decode_slowdown: f64,
}

enum Command {
    Submit(Vec<(SequenceRequest, mpsc::Sender<Event>)>),
    /// Give back up to this many bytes of the KV pool's memory; the reply says how many.
    GiveBack(u64, tokio::sync::oneshot::Sender<u64>),
}

/// What a memory budget lets a growing KV pool hold at most: the budget less its own
/// model's memory and the memory of the models that are never evicted for it (every other
/// model can be evicted, or give its pool's memory back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCeiling {
    /// The budget of the model's device, in bytes.
    pub budget: u64,
    /// What the model holds besides its KV pool (its weights, measured at load).
    pub weights: u64,
    /// What the other models on the device that are never evicted hold besides their KV
    /// pools (pinned ones; every one without lazy model control): the ceiling moves as they
    /// load and unload.
    pub kept: u64,
}

impl KvCeiling {
    /// Bytes the pool may hold at most.
    pub fn bytes(&self) -> u64 {
        self.budget
            .saturating_sub(self.weights)
            .saturating_sub(self.kept)
    }
}

/// The memory budget as a growing KV pool sees it.
pub trait KvMemory: Send + Sync + 'static {
    /// Whether the pool may take `bytes` more now. `false`: not now (room may be being made
    /// meanwhile); the scheduler asks again a little later.
    fn grow(&self, bytes: u64) -> bool;
    /// The pool holds `bytes` now (after it grew or gave memory back).
    fn resized(&self, _bytes: u64) {}
    /// The most the pool can hold under the budget while the models that stay loaded do
    /// (`None`: no budget bounds it). Asked at each admission and growth: keep it cheap.
    fn ceiling(&self) -> Option<KvCeiling> {
        None
    }
}

/// No budget: a pool grows whenever it needs to, up to its largest size.
pub struct Unbudgeted;

impl KvMemory for Unbudgeted {
    fn grow(&self, _bytes: u64) -> bool {
        true
    }
}

/// Blocks a growing pool adds at a time (and starts with): a sixteenth of its largest size.
pub fn growth_chunk(max_blocks: usize) -> usize {
    max_blocks.div_ceil(16).max(1)
}

/// How long a scheduler waits before asking again for memory the budget refused.
const GROW_RETRY: Duration = Duration::from_millis(50);

struct Shared {
    commands: Mutex<Option<Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Sequences submitted and not yet admitted (the queue bound).
    waiting: AtomicUsize,
    /// Sequences admitted and not finished.
    running: AtomicUsize,
    /// Running sequences paused for a slow reader.
    paused: AtomicUsize,
    /// Blocks in use.
    blocks_used: AtomicUsize,
    /// Blocks in the prefix cache.
    blocks_cached: AtomicUsize,
    /// Blocks the pool has now (of `geometry.num_blocks` at most).
    capacity: AtomicUsize,
    /// Whether the pool grows with use (its memory is then `capacity` blocks).
    grows: bool,
    /// The budget a pool that grows with use grows within.
    memory: Arc<dyn KvMemory>,
    failure: Mutex<Option<String>>,
    config: SchedulerConfig,
    geometry: KvGeometry,
}

impl Shared {
    /// Blocks the pool can have now, and the budget where that keeps it below its largest
    /// size. A pool allocated whole was counted whole at load: no budget bounds it further; a
    /// growing one keeps what it holds (room was made for it).
    fn bound(&self) -> (usize, Option<KvCeiling>) {
        let max = self.geometry.num_blocks;
        let Some(c) = self.grows.then(|| self.memory.ceiling()).flatten() else {
            return (max, None);
        };
        let fit = (c.bytes() / self.geometry.bytes_per_block.max(1)) as usize;
        let fit = fit.max(self.capacity.load(Ordering::Acquire));
        if fit < max {
            (fit, Some(c))
        } else {
            (max, None)
        }
    }
}

/// The handle of a model's scheduler: cheap to clone, shared by its requests.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle")
            .field("model", &self.shared.config.model)
            .finish()
    }
}

/// A scheduler's counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SchedulerState {
    /// Sequences waiting for a place in the running batch.
    pub waiting: usize,
    /// Sequences in the running batch (paused ones included).
    pub running: usize,
    /// Running sequences paused because their client is not reading.
    pub paused: usize,
    /// KV blocks held by sequences, of the pool's blocks now (a pool that grows with use has
    /// `blocks_max` at most).
    pub blocks_used: usize,
    pub blocks_total: usize,
    pub blocks_max: usize,
    /// KV blocks in the prefix cache (held by sequences or kept for later ones).
    pub blocks_cached: usize,
}

/// A retired scheduler's thread, to wait for.
pub struct Retired(Option<JoinHandle<()>>);

impl Retired {
    /// Blocks until the scheduler has answered what it accepted and exited.
    pub fn wait(self) {
        if let Some(t) = self.0 {
            let _ = t.join();
        }
    }
}

impl SchedulerHandle {
    /// Starts the scheduler thread over `decoder`.
    pub fn spawn(
        decoder: Box<dyn Decoder>,
        text: Arc<dyn Decode + Send + Sync>,
        config: SchedulerConfig,
        observer: Arc<dyn GenerationObserver>,
        memory: Arc<dyn KvMemory>,
    ) -> Self {
        let geometry = decoder.kv();
        let grows = decoder.kv_grows();
        let capacity = match grows {
            true => growth_chunk(geometry.num_blocks),
            false => geometry.num_blocks,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            commands: Mutex::new(Some(tx)),
            thread: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            paused: AtomicUsize::new(0),
            blocks_used: AtomicUsize::new(0),
            blocks_cached: AtomicUsize::new(0),
            capacity: AtomicUsize::new(capacity),
            grows,
            memory,
            failure: Mutex::new(None),
            config: config.clone(),
            geometry,
        });
        let worker = Worker {
            allocator: BlockPool::new(geometry.block_size, capacity, config.prefix_caching),
            refused_at: None,
            pace: pace::Pace::new(config.max_decode_slowdown),
            decoder,
            text,
            observer,
            shared: shared.clone(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            next_order: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("generate-{}", config.model))
            .spawn(move || worker.run(rx))
            .expect("spawn the scheduler thread");
        *shared.thread.lock().expect("thread lock") = Some(thread);
        Self { shared }
    }

    /// The KV pool's shape.
    pub fn geometry(&self) -> KvGeometry {
        self.shared.geometry
    }

    /// Blocks the KV pool can have: its largest size, or what the memory budget leaves it
    /// where that is less ([`SchedulerHandle::budget`]).
    pub fn max_blocks(&self) -> usize {
        self.shared.bound().0
    }

    /// The memory budget, where it keeps the KV pool below its largest size.
    pub fn budget(&self) -> Option<KvCeiling> {
        self.shared.bound().1
    }

    /// [`SchedulerHandle::max_blocks`] and [`SchedulerHandle::budget`] from one look at the
    /// budget (each look walks the registry's models).
    pub fn bound(&self) -> (usize, Option<KvCeiling>) {
        self.shared.bound()
    }

    /// Queues sequences (all or none: one request's choices); each gets its events through
    /// its receiver. Fails at once when the queue is full.
    pub fn submit(
        &self,
        requests: Vec<SequenceRequest>,
    ) -> Result<Vec<mpsc::Receiver<Event>>, SubmitError> {
        let n = requests.len();
        let max = self.shared.config.max_waiting;
        self.shared
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w + n <= max).then_some(w + n)
            })
            .map_err(|waiting| SubmitError::QueueFull { waiting })?;
        // `stream_buffer` token events, plus room for the end, which is never refused (a
        // sequence is stepped only while its channel has room for a token and the end)
        let capacity = self.shared.config.stream_buffer + 1;
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::channel(capacity)).unzip();
        match self.send(Command::Submit(requests.into_iter().zip(senders).collect())) {
            true => Ok(receivers),
            false => {
                self.shared.waiting.fetch_sub(n, Ordering::AcqRel);
                Err(SubmitError::Closed)
            }
        }
    }

    /// Hands the scheduler thread a command; false once it is shutting down.
    fn send(&self, command: Command) -> bool {
        let commands = self.shared.commands.lock().expect("commands lock");
        commands.as_ref().is_some_and(|tx| tx.send(command).is_ok())
    }

    /// Bytes the KV pool holds now, where it grows with use (`None`: allocated whole at load,
    /// and counted with the model's other memory).
    pub fn kv_bytes(&self) -> Option<u64> {
        let s = &self.shared;
        s.grows
            .then(|| s.capacity.load(Ordering::Acquire) as u64 * s.geometry.bytes_per_block)
    }

    /// Asks the scheduler to give back up to `bytes` of its KV pool's memory: the blocks at the
    /// top of the pool that no sequence holds (free, or kept for the prefix cache). The answer
    /// says how many bytes it gave back (none when it is shutting down).
    pub async fn give_back(&self, bytes: u64) -> u64 {
        if !self.shared.grows {
            return 0;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.send(Command::GiveBack(bytes, tx)) {
            true => rx.await.unwrap_or(0),
            false => 0,
        }
    }

    /// Sequences waiting or running.
    pub fn queued(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire) + self.shared.running.load(Ordering::Acquire)
    }

    /// Where the scheduler stands now.
    pub fn state(&self) -> SchedulerState {
        let s = &self.shared;
        SchedulerState {
            waiting: s.waiting.load(Ordering::Acquire),
            running: s.running.load(Ordering::Acquire),
            paused: s.paused.load(Ordering::Acquire),
            blocks_used: s.blocks_used.load(Ordering::Acquire),
            blocks_total: s.capacity.load(Ordering::Acquire),
            blocks_max: s.geometry.num_blocks,
            blocks_cached: s.blocks_cached.load(Ordering::Acquire),
        }
    }

    /// The device failure that stopped the model, if one did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().expect("failure lock").clone()
    }

    /// Stops taking requests; the scheduler answers what it accepted and exits.
    pub fn retire(self) -> Retired {
        self.shared.commands.lock().expect("commands lock").take();
        Retired(self.shared.thread.lock().expect("thread lock").take())
    }
}

/// One sequence the scheduler owns.
struct Seq {
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Leading blocks of `blocks` known to the prefix cache, and the last one's hash.
    hashed: usize,
    chain: u64,
    /// The request's arrival order when it asked for several choices: they share its prompt.
    group: Option<u64>,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopStrings,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    logprobs: Option<usize>,
    constraint: Option<Constraint>,
    arrived: Instant,
    deadline: Instant,
    tx: mpsc::Sender<Event>,
    /// Admitted before (its prompt is counted; a preempted sequence comes back).
    admitted: bool,
    last_token: Option<Instant>,
    paused_since: Option<Instant>,
    /// Arrival order: the newest is preempted first.
    order: u64,
    /// Taken out of the running batch this step (preempted or ended).
    out: Option<Out>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Preempted,
    Ended,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens whose keys and values are still to compute.
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Forgets what was computed (its blocks are given back).
    fn reset(&mut self) {
        self.computed = 0;
        self.hashed = 0;
        self.chain = ROOT;
    }
}

struct Worker {
    decoder: Box<dyn Decoder>,
    allocator: BlockPool,
    /// When the budget last refused the pool more memory.
    refused_at: Option<Instant>,
    /// What steps cost, for the prompt tokens a step beside decoding sequences may carry.
    pace: pace::Pace,
    text: Arc<dyn Decode + Send + Sync>,
    observer: Arc<dyn GenerationObserver>,
    shared: Arc<Shared>,
    waiting: VecDeque<Seq>,
    /// The running batch, oldest admitted first.
    active: Vec<Seq>,
    next_order: u64,
}

/// How long the scheduler sleeps while it has work it cannot step (paused streams, prompts
/// waiting for blocks) before it looks again.
const RECHECK: Duration = Duration::from_millis(5);

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        let mut open = true;
        loop {
            let idle = self.active.is_empty() && self.waiting.is_empty();
            if idle && !open {
                return;
            }
            if open {
                open = self.intake(&rx, idle);
            }
            self.update_pauses();
            self.reap();
            self.admit();
            let stepped = self.step();
            self.publish();
            if !stepped && open && !(self.active.is_empty() && self.waiting.is_empty()) {
                // nothing could run: wait for a reader, a new request or a deadline
                match rx.recv_timeout(RECHECK) {
                    Ok(c) => self.take(c),
                    Err(RecvTimeoutError::Disconnected) => open = false,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            } else if !stepped && !open && !self.active.is_empty() {
                std::thread::sleep(RECHECK);
            }
        }
    }

    /// Takes new requests: blocks while idle; returns whether the handle is still open.
    fn intake(&mut self, rx: &Receiver<Command>, idle: bool) -> bool {
        if idle {
            match rx.recv() {
                Ok(c) => self.take(c),
                Err(_) => return false,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => self.take(c),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn take(&mut self, command: Command) {
        let requests = match command {
            Command::Submit(requests) => requests,
            Command::GiveBack(bytes, reply) => {
                let _ = reply.send(self.give_back(bytes));
                return;
            }
        };
        let group = (requests.len() > 1).then_some(self.next_order);
        for (r, tx) in requests {
            let order = self.next_order;
            self.next_order += 1;
            self.waiting.push_back(Seq {
                prompt_len: r.prompt.len(),
                sampler: Sampler::new(r.sampling, &r.prompt),
                tokens: r.prompt,
                computed: 0,
                blocks: Vec::new(),
                hashed: 0,
                chain: ROOT,
                group,
                detok: if r.special_text {
                    Detokenizer::with_special()
                } else {
                    Detokenizer::new()
                },
                stops: StopStrings::new(r.stop),
                max_tokens: r.max_tokens,
                stop_tokens: r.stop_tokens,
                logprobs: r.logprobs,
                constraint: r.constraint,
                arrived: r.arrived,
                deadline: r.deadline,
                tx,
                admitted: false,
                last_token: None,
                paused_since: None,
                order,
                out: None,
            });
        }
    }

    /// Ends sequences whose client left, whose deadline passed or whose stream stalled.
    fn reap(&mut self) {
        let now = Instant::now();
        let stall = self.shared.config.stall_timeout;
        let verdict = |s: &Seq| -> Option<EndReason> {
            if s.tx.is_closed() {
                Some(EndReason::Cancelled)
            } else if now >= s.deadline || s.paused_since.is_some_and(|p| now - p >= stall) {
                Some(EndReason::TimedOut)
            } else {
                None
            }
        };
        let mut i = 0;
        while i < self.waiting.len() {
            match verdict(&self.waiting[i]) {
                Some(reason) => {
                    let s = self.waiting.remove(i).expect("index within the queue");
                    self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    self.tell_end(&s, reason);
                }
                None => i += 1,
            }
        }
        for i in 0..self.active.len() {
            if let Some(reason) = verdict(&self.active[i]) {
                self.tell_end(&self.active[i], reason);
                self.active[i].out = Some(Out::Ended);
            }
        }
        self.sweep();
    }

    /// Reports a sequence's end to its client (a timeout: when there is room) and the observer.
    fn tell_end(&self, s: &Seq, reason: EndReason) {
        let generated = s.generated();
        if reason == EndReason::TimedOut {
            let _ =
                s.tx.try_send(Event::Error(SequenceError::TimedOut { generated }));
        }
        self.observer
            .finished(s.arrived.elapsed(), generated, reason);
    }

    /// Removes the sequences taken out of the running batch: ended ones give their blocks
    /// back, preempted ones go back to the head of the queue, oldest first.
    fn sweep(&mut self) {
        if self.active.iter().all(|s| s.out.is_none()) {
            return;
        }
        let mut back = Vec::new();
        let mut kept = Vec::with_capacity(self.active.len());
        for mut s in self.active.drain(..) {
            match s.out.take() {
                None => kept.push(s),
                Some(out) => {
                    self.allocator.release(&mut s.blocks);
                    self.shared.running.fetch_sub(1, Ordering::AcqRel);
                    if out == Out::Preempted {
                        s.reset();
                        back.push(s);
                    }
                }
            }
        }
        self.active = kept;
        back.sort_by_key(|s| std::cmp::Reverse(s.order));
        for s in back {
            self.shared.waiting.fetch_add(1, Ordering::AcqRel);
            self.waiting.push_front(s);
        }
    }

    /// Grows a pool that grows with use by at least `blocks` blocks (whole chunks, up to its
    /// largest size or what the budget can ever leave it), where the memory budget lets it
    /// now; returns whether it grew.
    fn try_grow(&mut self, blocks: usize) -> bool {
        let capacity = self.allocator.capacity();
        if !self.shared.grows || capacity >= self.shared.geometry.num_blocks || blocks == 0 {
            return false;
        }
        let max = self.shared.bound().0;
        if !self.shared.grows || capacity >= max || blocks == 0 {
            return false;
        }
        if self.refused_at.is_some_and(|t| t.elapsed() < GROW_RETRY) {
            return false;
        }
        let chunk = growth_chunk(self.shared.geometry.num_blocks);
        let add = (blocks.div_ceil(chunk) * chunk).min(max - capacity);
        let bytes_per_block = self.shared.geometry.bytes_per_block;
        // what it needs, else one chunk at least (asked once where they are the same)
        let smaller = (add > chunk).then_some(chunk);
        let granted = std::iter::once(add)
            .chain(smaller)
            .find(|&n| self.shared.memory.grow(n as u64 * bytes_per_block));
        let Some(add) = granted else {
            self.refused_at = Some(Instant::now());
            return false;
        };
        self.refused_at = None;
        self.allocator.grow(add);
        self.resized();
        true
    }

    /// Gives back up to `bytes` of the pool's memory (the unreferenced blocks at its top);
    /// returns the bytes given back.
    fn give_back(&mut self, bytes: u64) -> u64 {
        if !self.shared.grows {
            return 0;
        }
        let bytes_per_block = self.shared.geometry.bytes_per_block.max(1);
        let blocks = bytes.div_ceil(bytes_per_block) as usize;
        let given = self.allocator.shrink(blocks);
        if given > 0 {
            self.decoder.release_kv(self.allocator.capacity());
            self.resized();
            tracing::debug!(model = %self.shared.config.model, blocks = given, "KV cache memory given back");
        }
        given as u64 * bytes_per_block
    }

    /// Tells the handle and the budget the pool's new size.
    fn resized(&self) {
        let capacity = self.allocator.capacity();
        self.shared.capacity.store(capacity, Ordering::Release);
        self.shared
            .memory
            .resized(capacity as u64 * self.shared.geometry.bytes_per_block);
    }

    /// Blocks a small reserve keeps free at admission, so that running sequences can grow for a
    /// while before anyone is preempted.
    fn watermark(&self) -> usize {
        (self.shared.geometry.num_blocks / 100).max(1)
    }

    /// Admits waiting sequences, oldest first, while the batch has room and the pool has
    /// blocks for all of their tokens (stalled streams' blocks are taken for them). A sequence
    /// takes the cached blocks of its longest cached prefix and computes only the rest; the
    /// other choices of a request wait until the first one's prompt is computed, to share it.
    fn admit(&mut self) {
        let max = self.shared.config.max_sequences;
        let bs = self.allocator.block_size();
        let mut promised = 0;
        loop {
            let running = self.active.iter().filter(|s| s.out.is_none()).count();
            if running >= max {
                break;
            }
            // a sibling whose prompt is being computed: wait for its blocks to be cached
            let sharing = |s: &Seq| {
                s.group.is_some_and(|g| {
                    self.active
                        .iter()
                        .any(|a| a.out.is_none() && a.group == Some(g) && a.computed < a.prompt_len)
                })
            };
            // the oldest waiting sequence whose client takes its tokens (a preempted stream
            // nobody reads waits for its reader)
            let Some(at) = self
                .waiting
                .iter()
                .position(|s| s.paused_since.is_none() && !sharing(s))
            else {
                break;
            };
            let reserve = if running == 0 { 0 } else { self.watermark() };
            let (hits, need, cost) = loop {
                let tokens = &self.waiting[at].tokens;
                let hits = self.allocator.lookup(tokens);
                let need = self.allocator.blocks_for(tokens.len() + 1) - hits.len();
                // taking a cached block nobody holds takes it from the available ones too
                let cost = need + self.allocator.idle_among(&hits);
                let short = (promised + cost + reserve).saturating_sub(self.allocator.available());
                if short == 0 || self.try_grow(short) {
                    break (hits, need, cost);
                }
                match self.paused_victim(usize::MAX) {
                    Some(victim) => self.preempt(victim),
                    None => break (hits, need, cost),
                }
            };
            if self.allocator.available() < promised + cost + reserve && running > 0 {
                break;
            }
            let mut s = self.waiting.remove(at).expect("index within the queue");
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            self.shared.running.fetch_add(1, Ordering::AcqRel);
            if !s.admitted {
                s.admitted = true;
                self.observer.admitted(s.arrived.elapsed(), s.prompt_len);
            }
            if self.shared.config.prefix_caching {
                self.observer.prefix_cache(s.tokens.len(), hits.len() * bs);
            }
            self.allocator.share(&mut s.blocks, &hits);
            if let Some(last) = hits.last() {
                s.hashed = hits.len();
                s.chain = last.hash;
                s.computed = hits.len() * bs;
            }
            // the cached blocks are taken now; the others when its steps need them
            promised += need;
            self.active.push(s);
        }
        self.sweep();
    }

    /// Caches the full blocks sequence `i` has computed and not cached yet.
    fn cache_full_blocks(&mut self, i: usize) {
        if !self.shared.config.prefix_caching {
            return;
        }
        let bs = self.allocator.block_size();
        let s = &mut self.active[i];
        while (s.hashed + 1) * bs <= s.computed {
            let from = s.hashed * bs;
            s.chain =
                self.allocator
                    .register(s.blocks[s.hashed], s.chain, &s.tokens[from..from + bs]);
            s.hashed += 1;
        }
    }

    /// Marks the sequences whose client is not reading: a step's token and the end must fit
    /// in a stream, else its sequence pauses (the stall bound counts from then).
    fn update_pauses(&mut self) {
        let now = Instant::now();
        for s in self.active.iter_mut().chain(self.waiting.iter_mut()) {
            if s.tx.capacity() < 2 {
                s.paused_since.get_or_insert(now);
            } else {
                s.paused_since = None;
            }
        }
    }

    /// A paused sequence holding blocks, other than `except`.
    fn paused_victim(&self, except: usize) -> Option<usize> {
        self.active.iter().enumerate().position(|(i, s)| {
            i != except && s.out.is_none() && s.paused_since.is_some() && !s.blocks.is_empty()
        })
    }

    fn preempt(&mut self, i: usize) {
        let s = &mut self.active[i];
        self.allocator.release(&mut s.blocks);
        s.reset();
        s.out = Some(Out::Preempted);
        self.observer.preempted();
    }

    /// Plans and runs one step; returns whether anything ran.
    fn step(&mut self) -> bool {
        let budget_max = self.shared.config.max_step_tokens;
        // running sequences' next tokens first, then prompts, each oldest first
        let mut order: Vec<usize> = (0..self.active.len()).collect();
        order.sort_by_key(|&i| (self.active[i].pending() > 1, self.active[i].order));
        let mut chosen: Vec<(usize, usize)> = Vec::new();
        let mut budget = budget_max;
        // prompt tokens this step may still carry (bounded beside decoding sequences)
        let mut prompt_left: Option<usize> = None;
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.active[i];
            if s.out.is_some() || s.paused_since.is_some() {
                continue;
            }
            let mut len = s.pending().min(budget);
            if len > 1 {
                // the first prompt of the step: the decoding sequences are all chosen by now
                let left = *prompt_left.get_or_insert_with(|| match chosen.is_empty() {
                    true => usize::MAX,
                    false => self
                        .pace
                        .prompt_limit(self.allocator.block_size(), s.computed)
                        .unwrap_or(usize::MAX),
                });
                len = len.min(left);
                if len == 0 {
                    break;
                }
                prompt_left = Some(left - len);
            }
            let mut fits = true;
            loop {
                let s = &mut self.active[i];
                if self
                    .allocator
                    .reserve(&mut s.blocks, s.computed + len)
                    .is_ok()
                {
                    break;
                }
                let short = self.allocator.blocks_for(s.computed + len) - s.blocks.len();
                if self.try_grow(short) {
                    continue;
                }
                let planned = |j: usize| chosen.iter().any(|&(c, _)| c == j);
                // a paused sequence's blocks first, else the newest sequence's
                let victim = self.paused_victim(i).or_else(|| {
                    (0..self.active.len())
                        .filter(|&j| {
                            j != i
                                && !planned(j)
                                && self.active[j].out.is_none()
                                && !self.active[j].blocks.is_empty()
                        })
                        .max_by_key(|&j| self.active[j].order)
                });
                match victim {
                    Some(v) => self.preempt(v),
                    None => {
                        // everyone older is in the step: this one waits for them
                        self.preempt(i);
                        fits = false;
                        break;
                    }
                }
            }
            if fits {
                chosen.push((i, len));
                budget -= len;
            }
        }
        if chosen.is_empty() {
            self.sweep();
            return false;
        }
        // the grammars' next masks, computed on another thread while the forward pass runs
        let mut masks: Vec<(usize, Constraint)> = Vec::new();
        for &(i, len) in &chosen {
            let s = &mut self.active[i];
            if s.computed + len == s.tokens.len()
                && s.constraint.as_ref().is_some_and(|c| !c.ready())
            {
                masks.extend(s.constraint.take().map(|c| (i, c)));
            }
        }
        let (mut prompt_tokens, mut decode_tokens, mut prompt_pairs) = (0, 0, 0.0);
        let inputs: Vec<PrefillInput<'_>> = chosen
            .iter()
            .map(|&(i, len)| {
                let s = &self.active[i];
                if s.computed + len < s.tokens.len() || s.computed < s.prompt_len {
                    prompt_tokens += len;
                    prompt_pairs += pace::pairs(s.computed, len);
                } else {
                    decode_tokens += len;
                }
                PrefillInput {
                    tokens: &s.tokens[s.computed..s.computed + len],
                    start: s.computed,
                    blocks: &s.blocks,
                }
            })
            .collect();
        let started = Instant::now();
        let decoder = &mut self.decoder;
        let result = if masks.is_empty() {
            decoder.prefill(&inputs)
        } else {
            std::thread::scope(|scope| {
                let worker = scope.spawn(|| masks.iter_mut().for_each(|(_, c)| c.prepare()));
                let result = decoder.prefill(&inputs);
                let _ = worker.join();
                result
            })
        };
        drop(inputs);
        for (i, c) in masks {
            self.active[i].constraint = Some(c);
        }
        let took = started.elapsed();
        self.pace.observe(
            prompt_tokens,
            prompt_pairs,
            decode_tokens,
            took.as_secs_f64(),
        );
        tracing::trace!(
            model = %self.shared.config.model,
            prompt_tokens,
            decode_tokens,
            ms = took.as_secs_f64() * 1e3,
            pace = ?self.pace,
            "step"
        );
        self.observer.step(prompt_tokens, decode_tokens, took);
        match result {
            Ok(logits) => {
                for (&(i, len), logits) in chosen.iter().zip(logits) {
                    self.active[i].computed += len;
                    self.cache_full_blocks(i);
                    if self.active[i].pending() == 0 {
                        self.next_token(i, &logits);
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                if e.is_device_failure() {
                    *self.shared.failure.lock().expect("failure lock") = Some(message.clone());
                    chosen = (0..self.active.len()).map(|i| (i, 0)).collect();
                }
                tracing::error!(model = %self.shared.config.model, error = %message, "generation step failed");
                for &(i, _) in &chosen {
                    let s = &mut self.active[i];
                    let _ =
                        s.tx.try_send(Event::Error(SequenceError::Model(message.clone())));
                    s.out = Some(Out::Ended);
                    self.observer
                        .finished(s.arrived.elapsed(), s.generated(), EndReason::Error);
                }
            }
        }
        self.sweep();
        true
    }

    /// Samples sequence `i`'s next token from `logits` and tells its client.
    fn next_token(&mut self, i: usize, logits: &[f32]) {
        // the grammar is complete: nothing may follow
        let mut complete = false;
        let s = &mut self.active[i];
        let top = s.logprobs.unwrap_or(0);
        let sampled = match s.constraint.as_mut() {
            None => Ok(s.sampler.sample(logits, top)),
            Some(c) => {
                let stops = &s.stop_tokens;
                s.sampler
                    .sample_masked(logits, top, &mut |scores| c.apply(scores, stops))
                    .and_then(|sampled| {
                        let end = stops.contains(&sampled.token);
                        c.commit(sampled.token, end).map(|done| (sampled, done))
                    })
                    .map(|(sampled, done)| {
                        complete = done;
                        sampled
                    })
            }
        };
        let sampled = match sampled {
            Ok(sampled) => sampled,
            Err(message) => {
                let _ = s.tx.try_send(Event::Error(SequenceError::Grammar(message)));
                s.out = Some(Out::Ended);
                self.observer
                    .finished(s.arrived.elapsed(), s.generated(), EndReason::Error);
                return;
            }
        };
        let now = Instant::now();
        match s.last_token {
            None => self.observer.first_token(now - s.arrived),
            Some(t) => self.observer.next_token(now - t),
        }
        s.last_token = Some(now);
        s.tokens.push(sampled.token);
        let info = TokenInfo {
            id: sampled.token,
            logprob: sampled.logprob,
            top: sampled.top,
        };
        let context = self.shared.geometry.context_len;
        let mut finish = None;
        let mut by_string = false;
        if s.stop_tokens.contains(&sampled.token) {
            finish = Some(Finish::Stop);
        } else {
            let piece = s
                .detok
                .push(self.text.as_ref(), sampled.token)
                .unwrap_or_default();
            let step = s.stops.push(&piece);
            if step.stopped {
                finish = Some(Finish::Stop);
                by_string = true;
            }
            let _ = s.tx.try_send(Event::Token {
                text: step.text,
                token: info,
            });
        }
        if finish.is_none() && complete {
            finish = Some(Finish::Stop);
        }
        if finish.is_none() && (s.generated() >= s.max_tokens || s.tokens.len() >= context) {
            finish = Some(Finish::Length);
        }
        let Some(finish) = finish else {
            return;
        };
        if let Some(c) = &s.constraint {
            let t = c.mask_time();
            tracing::debug!(model = %self.shared.config.model, tokens = s.generated(), mask_us_per_token = t.as_micros() as u64 / s.generated().max(1) as u64, "grammar masks");
        }
        let mut text = String::new();
        if !by_string {
            let rest = s.detok.finish(self.text.as_ref()).unwrap_or_default();
            let step = s.stops.push(&rest);
            text = step.text;
            if !step.stopped {
                text.push_str(&s.stops.finish());
            }
        }
        let _ = s.tx.try_send(Event::End {
            text,
            finish,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.generated(),
        });
        self.observer.finished(
            s.arrived.elapsed(),
            s.generated(),
            match finish {
                Finish::Stop => EndReason::Stop,
                Finish::Length => EndReason::Length,
            },
        );
        s.out = Some(Out::Ended);
    }

    /// Tells the shared counters and the observer where things stand.
    fn publish(&self) {
        let total = self.allocator.capacity();
        let used = self.allocator.in_use();
        let cached = self.allocator.cached_blocks();
        self.shared.blocks_used.store(used, Ordering::Release);
        self.shared.blocks_cached.store(cached, Ordering::Release);
        let paused = self
            .active
            .iter()
            .filter(|s| s.paused_since.is_some())
            .count();
        self.shared.paused.store(paused, Ordering::Release);
        self.observer
            .state(self.active.len(), self.waiting.len(), used, total, cached);
    }
}

#[cfg(test)]
mod tests;
