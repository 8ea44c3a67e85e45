//! The scheduler over a fake decoder whose next token depends on every token in the
//! sequence's KV blocks: a wrong block table, a lost block or a wrong recomputation after
//! preemption changes the answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::engine::{DecodeInput, EngineError, Logits};
use crate::generate::sampling::SamplingParams;

const VOCAB: usize = 50;

/// Keeps the tokens written at each KV slot; the next token of a sequence is a function of all
/// of its positions, read back through its block table.
struct Fake {
    geometry: KvGeometry,
    /// Whether the pool grows with use; the blocks `release_kv` was last asked to free from.
    grows: bool,
    released_from: Arc<Mutex<Option<usize>>>,
    slots: Vec<Option<u32>>,
    /// Tokens computed per call.
    calls: Arc<Mutex<Vec<usize>>>,
}

impl Fake {
    fn new(blocks: usize, block_size: usize, context: usize) -> (Self, Arc<Mutex<Vec<usize>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fake = Self {
            geometry: KvGeometry {
                block_size,
                num_blocks: blocks,
                bytes_per_block: 1,
                context_len: context,
            },
            slots: vec![None; blocks * block_size],
            calls: calls.clone(),
            grows: false,
            released_from: Arc::default(),
        };
        (fake, calls)
    }

    fn slot(&self, blocks: &[u32], position: usize) -> usize {
        let bs = self.geometry.block_size;
        blocks[position / bs] as usize * bs + position % bs
    }
}

impl Decoder for Fake {
    fn prefill(&mut self, seqs: &[PrefillInput<'_>]) -> Result<Vec<Logits>, EngineError> {
        self.calls
            .lock()
            .unwrap()
            .push(seqs.iter().map(|s| s.tokens.len()).sum());
        let mut out = Vec::new();
        for s in seqs {
            for (k, &t) in s.tokens.iter().enumerate() {
                let slot = self.slot(s.blocks, s.start + k);
                self.slots[slot] = Some(t);
            }
            let end = s.start + s.tokens.len();
            let mut h: usize = 0;
            for p in 0..end {
                let t = self.slots[self.slot(s.blocks, p)].expect("a position never written");
                h = (h * 31 + t as usize * (p + 1)) % 1_000_003;
            }
            let mut logits = vec![0.0; VOCAB];
            logits[h % VOCAB] = 10.0;
            out.push(logits);
        }
        Ok(out)
    }

    fn decode(&mut self, seqs: &[DecodeInput<'_>]) -> Result<Vec<Logits>, EngineError> {
        let inputs: Vec<PrefillInput<'_>> = seqs
            .iter()
            .map(|s| PrefillInput {
                tokens: std::slice::from_ref(&s.token),
                start: s.position,
                blocks: s.blocks,
            })
            .collect();
        self.prefill(&inputs)
    }

    fn kv(&self) -> KvGeometry {
        self.geometry
    }

    fn kv_grows(&self) -> bool {
        self.grows
    }

    fn release_kv(&mut self, from: usize) {
        let bs = self.geometry.block_size;
        // the memory is gone: what was there reads as never written
        for slot in &mut self.slots[from * bs..] {
            *slot = None;
        }
        *self.released_from.lock().unwrap() = Some(from);
    }
}

/// Token `t` is the letter `'a' + t % 26`.
struct Letters;
impl Decode for Letters {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        Ok(ids
            .iter()
            .map(|&t| (b'a' + (t % 26) as u8) as char)
            .collect())
    }
}

#[derive(Default)]
struct Counts {
    preempted: AtomicUsize,
}
impl GenerationObserver for Counts {
    fn preempted(&self) {
        self.preempted.fetch_add(1, Ordering::Relaxed);
    }
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        model: "fake".into(),
        max_sequences: 64,
        max_waiting: 64,
        max_step_tokens: 64,
        stream_buffer: 4,
        stall_timeout: Duration::from_secs(30),
        prefix_caching: true,
        max_decode_slowdown: 0.0,
    }
}

fn spawn(fake: Fake, config: SchedulerConfig) -> (SchedulerHandle, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let handle = SchedulerHandle::spawn(
        Box::new(fake),
        Arc::new(Letters),
        config,
        counts.clone(),
        Arc::new(Unbudgeted),
    );
    (handle, counts)
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> SequenceRequest {
    SequenceRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens,
        stop: Vec::new(),
        stop_tokens: Vec::new(),
        logprobs: None,
        constraint: None,
        special_text: false,
        arrived: Instant::now(),
        deadline: Instant::now() + Duration::from_secs(60),
    }
}

/// Every event of one receiver: its tokens, then how it ended.
fn collect(mut rx: mpsc::Receiver<Event>) -> (Vec<u32>, Result<Finish, SequenceError>) {
    let mut tokens = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token { token, .. } => tokens.push(token.id),
            Event::End { finish, .. } => return (tokens, Ok(finish)),
            Event::Error(e) => return (tokens, Err(e)),
        }
    }
    panic!("the stream ended without an end event");
}

fn run_one(handle: &SchedulerHandle, prompt: Vec<u32>, max_tokens: usize) -> Vec<u32> {
    let rx = handle.submit(vec![request(prompt, max_tokens)]).unwrap();
    let (tokens, end) = collect(rx.into_iter().next().unwrap());
    assert_eq!(end, Ok(Finish::Length));
    tokens
}

fn wait_until(handle: &SchedulerHandle, what: impl Fn(SchedulerState) -> bool) -> SchedulerState {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = handle.state();
        if what(s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "scheduler state never came: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The scheduler's state once it has nothing running or waiting and holds no block (its
/// counters are published after each step, so `running` may reach 0 a moment before the
/// blocks are counted free); a block never given back makes this time out.
fn settled(handle: &SchedulerHandle) -> SchedulerState {
    wait_until(handle, |s| {
        s.running == 0 && s.waiting == 0 && s.blocks_used == 0
    })
}

fn prompts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| (0..len).map(|k| ((i * 7 + k * 3) % VOCAB) as u32).collect())
        .collect()
}

#[test]
fn answers_are_the_same_alone_and_in_a_crowd() {
    let (fake, _) = Fake::new(256, 4, 128);
    let (handle, _) = spawn(fake, config());
    let prompts = prompts(20, 9);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run_one(&handle, p.clone(), 30))
        .collect();
    let receivers = handle
        .submit(prompts.iter().map(|p| request(p.clone(), 30)).collect())
        .unwrap();
    let together: Vec<Vec<u32>> = receivers.into_iter().map(|rx| collect(rx).0).collect();
    assert_eq!(together, alone);
    assert_eq!(settled(&handle).blocks_used, 0);
}

#[test]
fn a_pool_too_small_preempts_the_newest_and_recomputes_it_unchanged() {
    // 12 blocks of 4: six sequences growing to 40 positions need 60
    let (fake, _) = Fake::new(12, 4, 128);
    let (handle, counts) = spawn(fake, config());
    let prompts = prompts(6, 5);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run_one(&handle, p.clone(), 35))
        .collect();
    let receivers = handle
        .submit(prompts.iter().map(|p| request(p.clone(), 35)).collect())
        .unwrap();
    let together: Vec<Vec<u32>> = receivers.into_iter().map(|rx| collect(rx).0).collect();
    assert_eq!(together, alone);
    assert!(counts.preempted.load(Ordering::Relaxed) > 0);
    let s = settled(&handle);
    assert_eq!(s.blocks_used, 0);
}

#[test]
fn a_client_that_leaves_frees_its_blocks_within_a_step() {
    let (fake, _) = Fake::new(64, 4, 256);
    let (handle, _) = spawn(fake, config());
    let mut rx = handle.submit(vec![request(vec![1, 2, 3], 200)]).unwrap();
    let mut rx = rx.remove(0);
    assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    wait_until(&handle, |s| s.blocks_used > 0);
    drop(rx);
    let s = settled(&handle);
    assert_eq!(s.blocks_used, 0);
}

#[test]
fn an_unread_stream_pauses_gives_its_blocks_to_others_and_ends_at_the_stall_bound() {
    let (fake, _) = Fake::new(16, 4, 64);
    let (handle, _) = spawn(
        fake,
        SchedulerConfig {
            stall_timeout: Duration::from_millis(300),
            ..config()
        },
    );
    // nobody reads this one: it stops after its buffer
    let unread = handle.submit(vec![request(vec![1, 2], 60)]).unwrap();
    let paused = wait_until(&handle, |s| s.paused == 1);
    assert_eq!(paused.running, 1);
    // a reader that needs most of the pool gets it: the paused sequence's blocks are taken
    let tokens = run_one(&handle, vec![3, 4, 5], 55);
    assert_eq!(tokens.len(), 55);
    // and the unread one ends at the stall bound, its buffer holding what it made
    let s = settled(&handle);
    assert_eq!(s.blocks_used, 0);
    let (tokens, end) = collect(unread.into_iter().next().unwrap());
    assert!(
        tokens.len() <= config().stream_buffer,
        "{} tokens buffered",
        tokens.len()
    );
    assert!(
        matches!(end, Err(SequenceError::TimedOut { .. })),
        "{end:?}"
    );
}

#[test]
fn long_prompts_are_computed_in_pieces_while_others_keep_decoding() {
    let (fake, calls) = Fake::new(128, 4, 256);
    let (handle, _) = spawn(
        fake,
        SchedulerConfig {
            max_step_tokens: 16,
            // the long prompt is computed twice (alone, then beside the short one)
            prefix_caching: false,
            ..config()
        },
    );
    let short = prompts(1, 3).remove(0);
    let long = prompts(2, 100).remove(1);
    let alone = (
        run_one(&handle, short.clone(), 40),
        run_one(&handle, long.clone(), 5),
    );
    calls.lock().unwrap().clear();
    let rx = handle
        .submit(vec![request(short, 40), request(long, 5)])
        .unwrap();
    let mut rx = rx.into_iter();
    let (a, b) = (collect(rx.next().unwrap()), collect(rx.next().unwrap()));
    assert_eq!((a.0, b.0), alone);
    let calls = calls.lock().unwrap();
    assert!(calls.iter().all(|&n| n <= 16), "{calls:?}");
    // the 100-token prompt took several steps, each also carrying the short one's token
    assert!(calls.iter().filter(|&&n| n == 16).count() >= 6, "{calls:?}");
}

#[test]
fn the_queue_is_bounded_and_deadlines_are_kept() {
    let (fake, _) = Fake::new(64, 4, 256);
    let (handle, _) = spawn(
        fake,
        SchedulerConfig {
            max_waiting: 2,
            max_sequences: 1,
            ..config()
        },
    );
    let err = handle
        .submit((0..3).map(|_| request(vec![1], 5)).collect())
        .unwrap_err();
    assert_eq!(err, SubmitError::QueueFull { waiting: 0 });
    let mut late = request(vec![1, 2], 50);
    late.deadline = Instant::now();
    let (tokens, end) = collect(handle.submit(vec![late]).unwrap().remove(0));
    assert!(tokens.is_empty());
    assert_eq!(end, Err(SequenceError::TimedOut { generated: 0 }));
    let mut stop = request(vec![1, 2], 50);
    stop.stop_tokens = run_one(&handle, vec![1, 2], 3)[2..].to_vec();
    let (tokens, end) = collect(handle.submit(vec![stop]).unwrap().remove(0));
    assert_eq!((tokens.len(), end), (2, Ok(Finish::Stop)));
}

/// A tokenizer whose token `t` is the letter of [`Letters`] (`'a' + t % 26`): letters, then
/// sentencepiece byte tokens for the second round.
fn letters_tokenizer() -> tokenizers::Tokenizer {
    let mut vocab = serde_json::Map::new();
    for t in 0..VOCAB {
        let letter = b'a' + (t % 26) as u8;
        let name = if t < 26 {
            (letter as char).to_string()
        } else {
            format!("<0x{letter:02X}>")
        };
        vocab.insert(name, serde_json::json!(t));
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    })
    .to_string()
    .parse()
    .expect("a valid tokenizer")
}

#[test]
fn a_grammar_holds_through_preemption_and_ends_the_answer() {
    use crate::generate::constraint::{GrammarSpec, Grammars};
    let grammars = Grammars::new(Arc::new(letters_tokenizer()), VOCAB);
    let constraint = grammars
        .compile(&GrammarSpec::Regex("[c-f]{6}x[a-z]{0,20}y".into()))
        .unwrap();
    let constrained = |prompt: Vec<u32>| SequenceRequest {
        constraint: Some(constraint.clone()),
        ..request(prompt, 40)
    };
    let text = |tokens: &[u32]| Letters.decode(tokens).unwrap();
    // 12 blocks of 4: six sequences growing to 40 positions need 60
    let (fake, _) = Fake::new(12, 4, 128);
    let (handle, counts) = spawn(fake, config());
    let prompts = prompts(6, 5);
    let alone: Vec<(Vec<u32>, Result<Finish, SequenceError>)> = prompts
        .iter()
        .map(|p| {
            collect(
                handle
                    .submit(vec![constrained(p.clone())])
                    .unwrap()
                    .remove(0),
            )
        })
        .collect();
    for (tokens, end) in &alone {
        let t = text(tokens);
        let (head, rest) = t.split_at(6);
        assert!(head.chars().all(|c| ('c'..='f').contains(&c)), "{t}");
        assert!(rest.starts_with('x') && rest.ends_with('y'), "{t}");
        // complete: the grammar ends the answer before max_tokens
        assert_eq!(end, &Ok(Finish::Stop), "{t}");
    }
    let receivers = handle
        .submit(prompts.iter().map(|p| constrained(p.clone())).collect())
        .unwrap();
    let together: Vec<_> = receivers.into_iter().map(collect).collect();
    assert_eq!(together, alone);
    assert!(counts.preempted.load(Ordering::Relaxed) > 0);
    assert_eq!(settled(&handle).blocks_used, 0);
}

/// Tokens computed over the calls since `calls` was last cleared.
fn computed(calls: &Mutex<Vec<usize>>) -> usize {
    std::mem::take(&mut *calls.lock().unwrap()).iter().sum()
}

#[test]
fn a_cached_prefix_is_not_computed_again_and_answers_do_not_change() {
    // a 40-token "system prompt" shared by every request, then each one's own question
    let system: Vec<u32> = (0..40).map(|k| (k * 7 % VOCAB) as u32).collect();
    let prompts: Vec<Vec<u32>> = prompts(4, 6)
        .into_iter()
        .map(|q| system.iter().copied().chain(q).collect())
        .collect();
    let answers = |caching: bool| {
        let (fake, calls) = Fake::new(64, 4, 128);
        let (handle, _) = spawn(
            fake,
            SchedulerConfig {
                prefix_caching: caching,
                ..config()
            },
        );
        let answers: Vec<(Vec<u32>, usize)> = prompts
            .iter()
            .map(|p| {
                let tokens = run_one(&handle, p.clone(), 10);
                (tokens, computed(&calls))
            })
            .collect();
        let s = settled(&handle);
        (answers, s)
    };
    let (off, off_state) = answers(false);
    let (on, on_state) = answers(true);
    let tokens = |a: &[(Vec<u32>, usize)]| a.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
    assert_eq!(tokens(&on), tokens(&off));
    // without the cache every request computes its 46 prompt tokens and 9 more
    assert!(off.iter().all(|&(_, n)| n == 46 + 9), "{off:?}");
    assert_eq!(off_state.blocks_cached, 0);
    // with it the first does; the others find the 40 shared tokens (10 blocks of 4) cached
    assert_eq!(on[0].1, 46 + 9);
    assert!(on[1..].iter().all(|&(_, n)| n == 6 + 9), "{on:?}");
    // nothing is held, and the blocks stay cached for later
    assert_eq!(on_state.blocks_used, 0);
    assert!(on_state.blocks_cached >= 10, "{on_state:?}");
}

#[test]
fn the_choices_of_one_request_compute_its_prompt_once() {
    let prompt: Vec<u32> = (0..33).map(|k| (k * 5 % VOCAB) as u32).collect();
    let (fake, calls) = Fake::new(128, 4, 128);
    let (handle, _) = spawn(fake, config());
    let alone = run_one(&handle, prompt.clone(), 8);
    // a fresh scheduler: the first choice computes the prompt, the others its last token
    let (fake, calls2) = Fake::new(128, 4, 128);
    let (handle2, _) = spawn(fake, config());
    let receivers = handle2
        .submit((0..3).map(|_| request(prompt.clone(), 8)).collect())
        .unwrap();
    let answers: Vec<Vec<u32>> = receivers.into_iter().map(|rx| collect(rx).0).collect();
    assert!(answers.iter().all(|a| *a == alone), "{answers:?}");
    assert_eq!(computed(&calls), 33 + 7);
    // 33 prompt tokens once, the 33rd again for each other choice, 7 decode steps each
    assert_eq!(computed(&calls2), 33 + 2 + 3 * 7);
    assert_eq!(settled(&handle2).blocks_used, 0);
}

#[test]
fn under_pressure_cached_blocks_make_room_and_preempted_sequences_find_their_prefix() {
    // 12 blocks of 4: the cache must give its blocks up, and preemption still gives the
    // answers computed alone
    let (fake, _) = Fake::new(12, 4, 128);
    let (handle, counts) = spawn(fake, config());
    let system: Vec<u32> = vec![3; 8];
    let prompts: Vec<Vec<u32>> = prompts(6, 5)
        .into_iter()
        .map(|q| system.iter().copied().chain(q).collect())
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run_one(&handle, p.clone(), 30))
        .collect();
    let receivers = handle
        .submit(prompts.iter().map(|p| request(p.clone(), 30)).collect())
        .unwrap();
    let together: Vec<Vec<u32>> = receivers.into_iter().map(|rx| collect(rx).0).collect();
    assert_eq!(together, alone);
    assert!(counts.preempted.load(Ordering::Relaxed) > 0);
    let s = settled(&handle);
    assert_eq!(s.blocks_used, 0);
    assert!(s.blocks_cached <= 12);
}

/// Every receiver's tokens, each read by a thread of its own (no stream pauses).
fn collect_all(receivers: Vec<mpsc::Receiver<Event>>) -> Vec<Vec<u32>> {
    let readers: Vec<_> = receivers
        .into_iter()
        .map(|rx| std::thread::spawn(move || collect(rx).0))
        .collect();
    readers.into_iter().map(|r| r.join().unwrap()).collect()
}

/// A budget that lets a pool grow to `limit` bytes, and counts what it was asked.
struct Capped {
    limit: u64,
    held: Mutex<u64>,
    refused: AtomicUsize,
}

impl KvMemory for Capped {
    fn grow(&self, bytes: u64) -> bool {
        let held = *self.held.lock().unwrap();
        let ok = held + bytes <= self.limit;
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
    fn resized(&self, bytes: u64) {
        *self.held.lock().unwrap() = bytes;
    }
}

#[test]
fn a_growing_pool_starts_small_grows_by_chunks_within_its_budget_and_gives_back() {
    // at most 64 blocks of 4 (one byte each): chunks of 4; the budget allows 24
    let (mut fake, _) = Fake::new(64, 4, 256);
    fake.grows = true;
    let released = fake.released_from.clone();
    let budget = Arc::new(Capped {
        limit: 24,
        held: Mutex::new(4),
        refused: AtomicUsize::new(0),
    });
    let handle = SchedulerHandle::spawn(
        Box::new(fake),
        Arc::new(Letters),
        // streams hold every token: no sequence pauses while its reader thread starts
        SchedulerConfig {
            stream_buffer: 64,
            ..config()
        },
        Arc::new(Counts::default()),
        budget.clone(),
    );
    assert_eq!(handle.state().blocks_total, 4);
    assert_eq!(handle.state().blocks_max, 64);
    assert_eq!(handle.kv_bytes(), Some(4));
    // three sequences of 30 positions need 24 blocks: the pool grows to the budget, no more
    let prompts = prompts(3, 6);
    let receivers = handle
        .submit(prompts.iter().map(|p| request(p.clone(), 24)).collect())
        .unwrap();
    let together = collect_all(receivers);
    let s = settled(&handle);
    assert!(s.blocks_total > 4 && s.blocks_total <= 24, "{s:?}");
    assert_eq!(*budget.held.lock().unwrap(), s.blocks_total as u64);
    // the answers are those of an unbudgeted pool
    let (fake, _) = Fake::new(64, 4, 256);
    let (plain, _) = spawn(fake, config());
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run_one(&plain, p.clone(), 24))
        .collect();
    assert_eq!(together, alone);
    // a fourth sequence at once finds no room to grow: it waits, then runs
    let receivers = handle
        .submit(
            prompts
                .iter()
                .chain(&prompts[..1])
                .map(|p| request(p.clone(), 24))
                .collect(),
        )
        .unwrap();
    let again = collect_all(receivers);
    assert_eq!(again[..3], alone[..]);
    assert_eq!(again[3], alone[0]);
    assert!(budget.refused.load(Ordering::Relaxed) > 0);
    // idle: everything can be given back, and the decoder is told where from
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    settled(&handle);
    let total = handle.state().blocks_total;
    assert_eq!(rt.block_on(handle.give_back(3)), 3);
    assert_eq!(handle.state().blocks_total, total - 3);
    assert_eq!(*released.lock().unwrap(), Some(total - 3));
    assert_eq!(*budget.held.lock().unwrap(), total as u64 - 3);
    assert_eq!(rt.block_on(handle.give_back(100)), total as u64 - 3);
    assert_eq!(handle.kv_bytes(), Some(0));
    // and it grows again when asked to work
    assert_eq!(run_one(&handle, prompts[0].clone(), 24), alone[0]);
    assert!(handle.state().blocks_total >= 8);
}

#[test]
fn a_pool_allocated_whole_gives_nothing_back() {
    let (fake, _) = Fake::new(16, 4, 64);
    let (handle, _) = spawn(fake, config());
    assert_eq!(handle.state().blocks_total, 16);
    assert_eq!(handle.kv_bytes(), None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(handle.give_back(100)), 0);
}

/// A budget that never lets the pool hold more than its ceiling (which the test may move).
struct Ceiled(Capped, Mutex<KvCeiling>);

impl KvMemory for Ceiled {
    fn grow(&self, bytes: u64) -> bool {
        self.0.grow(bytes)
    }
    fn resized(&self, bytes: u64) {
        self.0.resized(bytes)
    }
    fn ceiling(&self) -> Option<KvCeiling> {
        Some(*self.1.lock().unwrap())
    }
}

/// A scheduler over a fake pool of `blocks` blocks of 4 (one byte each; growing with use or
/// allocated whole) under a budget that leaves it `room` bytes once its model's 1,000 bytes of
/// weights are counted, and holds `held` bytes of it now.
fn ceiled(blocks: usize, grows: bool, room: u64, held: u64) -> (SchedulerHandle, Arc<Ceiled>) {
    let (mut fake, _) = Fake::new(blocks, 4, blocks * 4);
    fake.grows = grows;
    let memory = Arc::new(Ceiled(
        Capped {
            limit: room,
            held: Mutex::new(held),
            refused: AtomicUsize::new(0),
        },
        Mutex::new(KvCeiling {
            budget: 1000 + room,
            weights: 1000,
            kept: 0,
        }),
    ));
    let handle = SchedulerHandle::spawn(
        Box::new(fake),
        Arc::new(Letters),
        config(),
        Arc::new(Counts::default()),
        memory.clone(),
    );
    (handle, memory)
}

#[test]
fn a_budget_below_the_pools_size_bounds_it_in_whole_blocks_and_the_pool_reaches_it() {
    // at most 64 blocks, chunks of 4; the budget leaves 10 (two and a half chunks) once the
    // weights are counted
    let (handle, _) = ceiled(64, true, 10, 4);
    assert_eq!(handle.max_blocks(), 10);
    assert_eq!(handle.budget().map(|c| c.bytes()), Some(10));
    assert_eq!(handle.state().blocks_max, 64);
    // one sequence of 40 positions needs all 10 blocks: the pool grows to them, by a part of
    // a chunk at the end
    let prompt = prompts(1, 20).remove(0);
    let tokens = run_one(&handle, prompt.clone(), 20);
    assert_eq!(tokens.len(), 20);
    assert_eq!(settled(&handle).blocks_total, 10);
    let (fake, _) = Fake::new(64, 4, 256);
    let (plain, _) = spawn(fake, config());
    assert_eq!(tokens, run_one(&plain, prompt, 20));
    // a budget that leaves the pool its whole size does not bound it
    let (handle, _) = ceiled(64, true, 64, 4);
    assert_eq!((handle.max_blocks(), handle.budget()), (64, None));
    // the ceiling moves as models that are never evicted load and unload beside it, but
    // never below what the pool holds (its first chunk of 4 here)
    let (handle, memory) = ceiled(64, true, 10, 4);
    memory.1.lock().unwrap().kept = 4;
    assert_eq!(handle.max_blocks(), 6);
    memory.1.lock().unwrap().kept = 9;
    assert_eq!(handle.max_blocks(), 4);
    memory.1.lock().unwrap().kept = 0;
    assert_eq!(handle.max_blocks(), 10);
    // a pool allocated whole is counted whole at load: no budget bounds it further
    let (handle, _) = ceiled(16, false, 4, 16);
    assert_eq!((handle.max_blocks(), handle.budget()), (16, None));
}
