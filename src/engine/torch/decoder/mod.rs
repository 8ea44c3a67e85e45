//! Generative decoder-only language models, run on libtorch from a Hugging Face checkpoint
//! (`config.json` and safetensors; no TorchScript, no Python), with a paged KV cache.
//!
//! [`Decoder`] is all the scheduler sees: token ids, positions and block tables in, each
//! sequence's logits out as `Vec<f32>`, so that sampling, stop rules and the allocation of KV
//! blocks (the scheduler's `BlockPool`) are plain Rust that never touches libtorch. [`TorchDecoder`] is
//! the implementation: `config` reads `config.json`, `weights` the safetensors, `blocks` has the
//! building blocks, `model` the transformer over them, `kv` the paged cache.

mod blocks;
mod config;
mod kv;
mod model;
mod weights;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use self::config::{DecoderConfig, Family, Llama3Scaling};
use self::kv::KvPool;
use self::model::{DecodeBatch, Model, Step, StepSeq};
use self::weights::Checkpoint;
use super::{device_failure, first_line, kind_of, ResolvedDevice};
use crate::config::model_spec::Precision;
use crate::engine::{EngineError, Quantization};

/// A sequence's next-token logits, one per vocabulary entry.
pub type Logits = Vec<f32>;

/// Prompt tokens of one sequence to compute: all of its prompt, or a piece of it (`start` > 0:
/// the positions before are in the cache already).
#[derive(Debug, Clone, Copy)]
pub struct PrefillInput<'a> {
    pub tokens: &'a [u32],
    /// The position of `tokens[0]`.
    pub start: usize,
    /// The sequence's block table, holding at least `start + tokens.len()` positions.
    pub blocks: &'a [u32],
}

/// One running sequence's next token.
#[derive(Debug, Clone, Copy)]
pub struct DecodeInput<'a> {
    pub token: u32,
    /// The token's position (the sequence's length before it).
    pub position: usize,
    /// The sequence's block table, holding at least `position + 1` positions.
    pub blocks: &'a [u32],
}

/// The KV pool's shape, for the scheduler's block allocation and the memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// Positions per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Bytes one block takes over all layers, keys and values.
    pub bytes_per_block: u64,
    /// The most positions one sequence may have (prompt and generated tokens).
    pub context_len: usize,
}

/// A generative model's steps, driven by one scheduler thread. Each call computes the given
/// sequences' new tokens, writes their keys and values into the blocks their tables name, and
/// returns each sequence's logits at its last new position, in the order given. Numbers do not
/// depend on which other sequences share a call beyond float noise.
pub trait Decoder: Send {
    /// Computes prompt tokens (whole prompts or pieces of them).
    fn prefill(&mut self, seqs: &[PrefillInput<'_>]) -> Result<Vec<Logits>, EngineError>;
    /// Computes one new token of each running sequence.
    fn decode(&mut self, seqs: &[DecodeInput<'_>]) -> Result<Vec<Logits>, EngineError>;
    /// The KV pool's shape.
    fn kv(&self) -> KvGeometry;
    /// Whether the KV pool holds memory only for the blocks written, so that the scheduler
    /// grows it as it hands blocks out and gives memory back with [`Decoder::release_kv`]
    /// (otherwise the whole pool is allocated at load).
    fn kv_grows(&self) -> bool {
        false
    }
    /// Gives back the memory of the pool's blocks `from..`, none of them in use.
    fn release_kv(&mut self, _from: usize) {}
}

/// How a decoder is loaded.
#[derive(Debug, Clone)]
pub struct DecoderOptions {
    /// Weights, activations and the KV pool in this precision (fp16 only on CUDA).
    pub precision: Precision,
    pub device: ResolvedDevice,
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool at most (on the CPU, memory is taken as blocks are first used).
    pub kv_blocks: usize,
    /// The longest sequence served; `None`: the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// The blocks' linear layers quantized at load (CPU only); `None`: in `precision`.
    pub quantization: Option<Quantization>,
    /// libtorch intra-op threads on the thread that runs the steps (`None`: libtorch's
    /// default).
    pub intra_op_threads: Option<usize>,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        Self {
            precision: Precision::Fp32,
            device: ResolvedDevice::cpu(),
            block_size: 16,
            kv_blocks: 256,
            max_context: None,
            quantization: None,
            intra_op_threads: None,
        }
    }
}

/// A decoder-only model on libtorch, with its KV pool.
pub struct TorchDecoder {
    config: DecoderConfig,
    model: Model,
    kv: KvPool,
    device: Device,
    geometry: KvGeometry,
    intra_op_threads: Option<usize>,
    /// The thread the thread count was set on (libtorch keeps it per thread).
    configured_on: Option<std::thread::ThreadId>,
}

/// One sequence's new tokens in a step.
struct Chunk<'a> {
    tokens: &'a [u32],
    start: usize,
    blocks: &'a [u32],
}

impl TorchDecoder {
    /// Loads the checkpoint in `dir` (`config.json`, `model.safetensors` or its shards).
    pub fn load(dir: &Path, options: DecoderOptions) -> Result<Self, EngineError> {
        let load_err = |message: String| EngineError::Load {
            path: dir.display().to_string(),
            message,
        };
        let device = options.device.0;
        if options.precision == Precision::Fp16 && device == Device::Cpu {
            return Err(load_err(
                "precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU".into(),
            ));
        }
        if let Some(q) = options.quantization {
            if device != Device::Cpu {
                return Err(load_err(format!(
                    "quantization {} runs on the CPU only (libtorch's packed kernels); \
                     use device = \"cpu\" or leave quantization unset",
                    q.name()
                )));
            }
            if let Quantization::Int4 { group_size } = q {
                if !Quantization::INT4_GROUP_SIZES.contains(&group_size) {
                    return Err(load_err(format!(
                        "quantization_group_size {group_size} is not one of {:?}",
                        Quantization::INT4_GROUP_SIZES
                    )));
                }
            }
        }
        if options.block_size == 0 || options.kv_blocks == 0 {
            return Err(load_err("the KV pool needs a block size and blocks".into()));
        }
        let json = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| load_err(format!("config.json: {e}")))?;
        let config = DecoderConfig::parse(&json).map_err(load_err)?;
        let context = options
            .max_context
            .map_or(config.max_position_embeddings, |m| {
                m.min(config.max_position_embeddings)
            });
        let kind = kind_of(options.precision.dtype());
        let loaded = catch_unwind(AssertUnwindSafe(|| {
            let mut checkpoint = Checkpoint::open(dir, kind, device)?;
            let model = Model::load(
                &config,
                &mut checkpoint,
                context,
                kind,
                device,
                options.quantization,
            )?;
            checkpoint.finish()?;
            let kv = KvPool::new(
                config.num_layers,
                options.kv_blocks,
                options.block_size,
                config.num_kv_heads,
                config.head_dim,
                kind,
                device,
            )?;
            Ok::<_, String>((model, kv))
        }));
        let (model, kv) = loaded
            .map_err(|p| load_err(panic_message(p.as_ref())))?
            .map_err(load_err)?;
        let bytes_per_block = 2
            * config.num_layers
            * options.block_size
            * config.num_kv_heads
            * config.head_dim
            * options.precision.dtype().size();
        Ok(Self {
            geometry: KvGeometry {
                block_size: options.block_size,
                num_blocks: options.kv_blocks,
                bytes_per_block: bytes_per_block as u64,
                context_len: context,
            },
            config,
            model,
            kv,
            device,
            intra_op_threads: options.intra_op_threads,
            configured_on: None,
        })
    }

    /// What the checkpoint's `config.json` says.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Once per thread that runs steps: libtorch's intra-op thread count.
    fn configure_thread(&mut self) {
        let me = std::thread::current().id();
        if self.configured_on != Some(me) {
            if let Some(n) = self.intra_op_threads {
                tch::set_num_threads(n as i32);
            }
            self.configured_on = Some(me);
        }
    }

    /// Checks that each chunk's tokens and blocks are within the model and the pool, and
    /// lays the step out: the chunks of one token (decoding) first, then the others; every
    /// position's slot; the blocks each sequence's attention reads.
    fn plan(&self, chunks: &[Chunk<'_>]) -> Result<Step, EngineError> {
        let bs = self.geometry.block_size;
        let mut tables = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            let bad = |m: String| EngineError::Forward(format!("sequence {i}: {m}"));
            let end = c.start + c.tokens.len();
            if c.tokens.is_empty() {
                return Err(bad("no tokens".into()));
            }
            if end > self.geometry.context_len {
                return Err(bad(format!(
                    "{end} positions, beyond the context of {}",
                    self.geometry.context_len
                )));
            }
            let needed = end.div_ceil(bs);
            if c.blocks.len() < needed {
                return Err(bad(format!(
                    "{end} positions need {needed} blocks, the table has {}",
                    c.blocks.len()
                )));
            }
            let table = &c.blocks[..needed];
            if let Some(b) = table
                .iter()
                .find(|&&b| b as usize >= self.geometry.num_blocks)
            {
                return Err(bad(format!(
                    "block {b} is outside the pool of {}",
                    self.geometry.num_blocks
                )));
            }
            if let Some(t) = c
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(bad(format!(
                    "token {t} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            tables.push(table);
        }
        let decoding: Vec<usize> = (0..chunks.len())
            .filter(|&i| chunks[i].tokens.len() == 1)
            .collect();
        let prompting = (0..chunks.len()).filter(|&i| chunks[i].tokens.len() > 1);
        let (mut tokens, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = vec![0; chunks.len()];
        let mut prompts = Vec::new();
        for i in decoding.iter().copied().chain(prompting) {
            let (c, table) = (&chunks[i], tables[i]);
            if c.tokens.len() > 1 {
                prompts.push(StepSeq {
                    row: tokens.len() as i64,
                    len: c.tokens.len() as i64,
                    start: c.start as i64,
                    blocks: self.on_device(table.iter().map(|&b| b as i64).collect()),
                });
            }
            tokens.extend(c.tokens.iter().map(|&t| t as i64));
            for p in c.start..c.start + c.tokens.len() {
                positions.push(p as i64);
                slots.push((table[p / bs] as usize * bs + p % bs) as i64);
            }
            last[i] = tokens.len() as i64 - 1;
        }
        let decodes = (!decoding.is_empty()).then(|| {
            let seqs: Vec<(usize, &[u32])> = decoding
                .iter()
                .map(|&i| (chunks[i].start, tables[i]))
                .collect();
            self.decode_batch(&seqs)
        });
        Ok(Step {
            tokens: self.on_device(tokens),
            positions: self.on_device(positions),
            slots: self.on_device(slots),
            prompts,
            decodes,
            last: self.on_device(last),
        })
    }

    /// The decoding sequences' shared gather, from each one's position and block table: the
    /// tables padded to the widest (with their first block, masked), and per window setting
    /// among the layers, the mask of the keys each position sees.
    fn decode_batch(&self, seqs: &[(usize, &[u32])]) -> DecodeBatch {
        let width = seqs.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let keys = (width * self.geometry.block_size) as i64;
        let mut blocks = Vec::with_capacity(seqs.len() * width);
        for (_, table) in seqs {
            blocks.extend(table.iter().map(|&b| b as i64));
            blocks.extend(std::iter::repeat_n(table[0] as i64, width - table.len()));
        }
        let mut windows: Vec<Option<i64>> = self
            .config
            .windows
            .iter()
            .map(|w| w.map(|w| w as i64))
            .collect();
        windows.sort_unstable();
        windows.dedup();
        let masks = windows
            .into_iter()
            .map(|window| {
                let sees = |position: i64, key: i64| {
                    key <= position && window.is_none_or(|w| key > position - w)
                };
                let seen: Vec<bool> = seqs
                    .iter()
                    .flat_map(|&(p, _)| (0..keys).map(move |key| sees(p as i64, key)))
                    .collect();
                let mask = (!seen.iter().all(|&s| s)).then(|| {
                    Tensor::from_slice(&seen)
                        .view([seqs.len() as i64, 1, 1, keys])
                        .to_device(self.device)
                });
                (window, mask)
            })
            .collect();
        DecodeBatch {
            room: self.kv.gather_room(blocks.len() as i64),
            blocks: self.on_device(blocks),
            sequences: seqs.len() as i64,
            keys,
            masks,
        }
    }

    fn on_device(&self, values: Vec<i64>) -> Tensor {
        Tensor::from_slice(&values).to_device(self.device)
    }

    /// Runs one step over `chunks`; a libtorch failure is an error, not a panic.
    fn step(&mut self, chunks: &[Chunk<'_>]) -> Result<Vec<Logits>, EngineError> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.configure_thread();
        let ran = catch_unwind(AssertUnwindSafe(|| {
            tch::no_grad(|| {
                let step = self.plan(chunks)?;
                let logits = self
                    .model
                    .forward(&step, &mut self.kv)
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu)
                    .contiguous();
                let vocab = self.config.vocab_size;
                // each row copied once, straight into its vector
                (0..chunks.len() as i64)
                    .map(|i| {
                        let mut row = vec![0.0f32; vocab];
                        logits
                            .get(i)
                            .f_copy_data(&mut row, vocab)
                            .map_err(|e| EngineError::Output(first_line(&e.to_string())))?;
                        Ok(row)
                    })
                    .collect()
            })
        }));
        ran.unwrap_or_else(|p| Err(EngineError::Forward(panic_message(p.as_ref()))))
            .map_err(|e| device_failure(&ResolvedDevice(self.device).to_string(), e))
    }
}

impl Decoder for TorchDecoder {
    fn prefill(&mut self, seqs: &[PrefillInput<'_>]) -> Result<Vec<Logits>, EngineError> {
        let chunks: Vec<Chunk<'_>> = seqs
            .iter()
            .map(|s| Chunk {
                tokens: s.tokens,
                start: s.start,
                blocks: s.blocks,
            })
            .collect();
        self.step(&chunks)
    }

    fn decode(&mut self, seqs: &[DecodeInput<'_>]) -> Result<Vec<Logits>, EngineError> {
        let chunks: Vec<Chunk<'_>> = seqs
            .iter()
            .map(|s| Chunk {
                tokens: std::slice::from_ref(&s.token),
                start: s.position,
                blocks: s.blocks,
            })
            .collect();
        self.step(&chunks)
    }

    fn kv(&self) -> KvGeometry {
        self.geometry
    }

    fn kv_grows(&self) -> bool {
        self.kv.grows()
    }

    fn release_kv(&mut self, from: usize) {
        self.kv.release_from(from);
    }
}

/// A libtorch panic's reason: tch panics with `called Result::unwrap() on an Err value:
/// Torch("<message>\n<C++ backtrace>")`.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("libtorch panicked");
    let text = text
        .split_once("Torch(\"")
        .map_or(text, |(_, message)| message);
    first_line(text.split("\\n").next().unwrap_or(text))
}
