//! Loading one model version: parse its spec, build its codec, load every engine instance
//! through the registry's [`EngineFactory`], warm each up and check its outputs against the
//! declared signature. Blocking work, run off the async workers.

use std::path::Path;
use std::time::{Duration, Instant};

use super::RegistrySettings;
use crate::batcher::BatchConfig;
use crate::codec::kinds::text_generation;
use crate::codec::ModelCodec;
use crate::config::model_spec::{ModelSpec, Precision, SpecError};
use crate::engine::{
    DecodeInput, Decoder, DecoderConfig, DecoderKv, Engine, EngineError, EngineFactory,
    PrefillInput, Quantization,
};
use crate::generate::generator::CheckpointText;
use crate::generate::scheduler::growth_chunk;
use crate::generate::settings::GenerationSettings;
use crate::repository::VersionSource;

/// A model version loaded and warmed up, before its queue starts.
pub(super) struct Prepared {
    pub spec: ModelSpec,
    pub codec: ModelCodec,
    /// What runs it.
    pub work: Work,
    /// Each instance's device, in order (`cpu`, `cuda:0`, ...).
    pub devices: Vec<String>,
    pub load_time: Duration,
    pub warmup_time: Duration,
}

/// What a prepared model runs on: engine instances behind a batch queue, or a decoder behind
/// a scheduler.
pub(super) enum Work {
    Batched {
        engines: Vec<Box<dyn Engine>>,
        config: BatchConfig,
    },
    Generative(Box<GenerativeParts>),
}

/// A generative model's pieces, before its scheduler starts.
pub(super) struct GenerativeParts {
    pub decoder: Box<dyn Decoder>,
    pub text: CheckpointText,
    pub settings: GenerationSettings,
    pub vocab_size: usize,
}

impl Prepared {
    /// The first instance's device: the one the memory budget counts the model on.
    pub fn device(&self) -> &str {
        self.devices.first().map_or("cpu", String::as_str)
    }

    /// Bytes of its KV pool counted apart from the memory measured at load: a pool that grows
    /// with use, as loaded (its first chunk).
    pub fn kv_counted_apart(&self) -> u64 {
        match &self.work {
            Work::Generative(parts) if parts.decoder.kv_grows() => {
                let kv = parts.decoder.kv();
                growth_chunk(kv.num_blocks) as u64 * kv.bytes_per_block
            }
            _ => 0,
        }
    }

    /// Its devices for a log line: `cpu`, or `cuda:0, cuda:1` where instances differ.
    pub fn devices_summary(&self) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for d in &self.devices {
            if !seen.contains(&d.as_str()) {
                seen.push(d);
            }
        }
        seen.join(", ")
    }
}

/// Why a model version could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Its model.toml cannot be read or is not valid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A component the kind needs (e.g. its tokenizer) cannot be loaded.
    #[error("{0}")]
    Codec(String),
    /// The runtime cannot load it (file, device, libtorch).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// It loaded but its warm-up forward pass failed. (Outputs other than model.toml
    /// declares are [`LoadError::Engine`] with [`EngineError::Output`].)
    #[error("warm-up at batch {rows} failed: {source}")]
    Warmup { rows: usize, source: EngineError },
    /// The memory budget has no room for it (see [`super::memory`]).
    #[error("not loaded: {0}")]
    NoRoom(#[from] super::memory::NoRoom),
    /// The loading task itself failed (a panic: a bug).
    #[error("loading failed: {0}")]
    Task(String),
}

/// Reads the version's model.toml: blocking work.
pub(super) fn parse(
    name: &str,
    config: &std::path::Path,
    v: &VersionSource,
) -> Result<ModelSpec, LoadError> {
    Ok(super::spec::load_spec(name, config, &v.dir)?)
}

/// Builds the codec, loads every engine instance and warms each up: blocking work.
pub(super) fn prepare(
    spec: ModelSpec,
    settings: &RegistrySettings,
    engines: &dyn EngineFactory,
) -> Result<Prepared, LoadError> {
    let started = Instant::now();
    let codec = ModelCodec::new(&spec, settings.image_limits, settings.max_text_bytes)
        .map_err(LoadError::Codec)?;
    if spec.kind == text_generation::KIND.name {
        return prepare_generative(spec, codec, engines, started);
    }
    let mut loaded: Vec<Box<dyn Engine>> = Vec::with_capacity(spec.instances);
    let mut devices = Vec::with_capacity(spec.instances);
    for index in 0..spec.instances {
        let instance = engines.load(&spec, index)?;
        devices.push(instance.device);
        loaded.push(instance.engine);
    }
    let load_time = started.elapsed();
    let warm = Instant::now();
    let on_gpu = devices.iter().any(|d| d.starts_with("cuda"));
    let shapes = warmup_shapes(&spec, on_gpu);
    for engine in &mut loaded {
        for &(rows, var_len) in &shapes {
            let item = codec.warmup_item(rows, var_len);
            let outputs = engine
                .forward(item.inputs)
                .map_err(|source| LoadError::Warmup { rows, source })?;
            check_outputs(&spec, &outputs, rows)?;
        }
    }
    let batch_config = BatchConfig {
        model: spec.name.clone(),
        max_batch_size: spec.batching.max_batch_size,
        max_queue_delay: spec.batching.max_queue_delay(),
        queue_capacity: spec.batching.queue_capacity,
        pad_values: codec.pad_values(),
        latency_target: spec.batching.latency_target(),
        poll_window: settings.idle_polling.window(),
        tokens: spec.token_batching.clone(),
    };
    Ok(Prepared {
        devices,
        warmup_time: warm.elapsed(),
        load_time,
        spec,
        codec,
        work: Work::Batched {
            engines: loaded,
            config: batch_config,
        },
    })
}

/// The least memory a model holds once loaded, known before loading it: its file's size, or
/// for a generative model its checkpoint's weights and its KV cache as loaded (its first
/// chunk on the CPU, where it grows with use; whole on a GPU).
pub(super) fn footprint_floor(spec: &ModelSpec, engines: &dyn EngineFactory) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    if spec.kind != text_generation::KIND.name {
        return size(&spec.file);
    }
    let Ok(settings) = text_generation::generation_settings(spec) else {
        return 0;
    };
    let dir = text_generation::checkpoint_dir(spec, &settings);
    let weights: u64 = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .map(|p| size(&p))
                .sum()
        })
        .unwrap_or(0);
    let Ok((per_token, config)) = kv_bytes_per_token(&dir, spec.precision) else {
        return weights;
    };
    let kv = settings.kv_blocks(per_token).map_or(0, |blocks| {
        let blocks = match engines.device(spec).as_str() {
            "cpu" => growth_chunk(blocks),
            _ => blocks,
        };
        blocks as u64 * settings.block_size as u64 * per_token
    });
    let weights = match settings.quantization() {
        Some(q) => quantized_weights(&config, weights, q),
        None => weights,
    };
    weights + kv
}

/// The weights' bytes once the blocks' linear layers are quantized: the checkpoint's
/// `file_bytes` less its linear layers' share (by parameter count), plus those layers'
/// quantized size.
fn quantized_weights(config: &DecoderConfig, file_bytes: u64, q: Quantization) -> u64 {
    let c = config;
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    let (q_out, kv_out) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    // (out, in) of each block's linear layers, as the decoder joins them
    let linears = [
        (q_out + 2 * kv_out, hidden),
        (hidden, q_out),
        (2 * inter, hidden),
        (hidden, inter),
    ];
    let per_layer = |f: &dyn Fn(usize, usize) -> u64| -> u64 {
        c.num_layers as u64 * linears.iter().map(|&(o, i)| f(o, i)).sum::<u64>()
    };
    let linear_params = per_layer(&|o, i| (o * i) as u64);
    let heads = if c.tie_word_embeddings { 1 } else { 2 };
    let other_params =
        (heads * c.vocab_size * hidden) as u64 + (c.num_layers as u64 * 2 + 1) * hidden as u64;
    let total = linear_params + other_params;
    let full_linear = (file_bytes as u128 * linear_params as u128 / total.max(1) as u128) as u64;
    file_bytes.saturating_sub(full_linear) + per_layer(&|o, i| q.weight_bytes(o, i))
}

/// Bytes one position of a checkpoint's KV cache takes in `precision`, and its config.
pub(super) fn kv_bytes_per_token(
    dir: &Path,
    precision: Precision,
) -> Result<(u64, DecoderConfig), LoadError> {
    let load_err = |message: String| {
        LoadError::Engine(EngineError::Load {
            path: dir.display().to_string(),
            message,
        })
    };
    let json = std::fs::read_to_string(dir.join("config.json"))
        .map_err(|e| load_err(format!("config.json: {e}")))?;
    let config = DecoderConfig::parse(&json).map_err(load_err)?;
    let bytes =
        2 * config.num_layers * config.num_kv_heads * config.head_dim * precision.dtype().size();
    Ok((bytes as u64, config))
}

/// Loads a text-generation model's decoder with its KV pool, its tokenizer and chat template,
/// and warms it up with a short prompt and one decode step.
fn prepare_generative(
    spec: ModelSpec,
    codec: ModelCodec,
    engines: &dyn EngineFactory,
    started: Instant,
) -> Result<Prepared, LoadError> {
    let settings = text_generation::generation_settings(&spec).map_err(LoadError::Codec)?;
    let dir = text_generation::checkpoint_dir(&spec, &settings);
    if !dir.is_dir() {
        return Err(LoadError::Codec(format!(
            "the checkpoint folder {} does not exist (the bundled SmolLM2 is built by `make llm-fixtures`)",
            dir.display()
        )));
    }
    let (per_token, config) = kv_bytes_per_token(&dir, spec.precision)?;
    let blocks = settings.kv_blocks(per_token).map_err(LoadError::Codec)?;
    let text = CheckpointText::load(&dir).map_err(LoadError::Codec)?;
    let kv = DecoderKv {
        block_size: settings.block_size,
        blocks,
        max_context: settings.context_length,
        quantization: settings.quantization(),
    };
    let mut loaded = engines.load_decoder(&spec, &dir, kv)?;
    let load_time = started.elapsed();
    let warm = Instant::now();
    let geometry = loaded.decoder.kv();
    let tokens: Vec<u32> = (0..geometry.block_size.min(8) as u32).collect();
    let table: Vec<u32> = vec![0];
    let warmed = loaded
        .decoder
        .prefill(&[PrefillInput {
            tokens: &tokens,
            start: 0,
            blocks: &table,
        }])
        .and_then(|_| {
            loaded.decoder.decode(&[DecodeInput {
                token: 0,
                position: tokens.len(),
                blocks: &table,
            }])
        });
    warmed.map_err(|source| LoadError::Warmup { rows: 1, source })?;
    Ok(Prepared {
        devices: vec![loaded.device],
        warmup_time: warm.elapsed(),
        load_time,
        spec,
        codec,
        work: Work::Generative(Box::new(GenerativeParts {
            decoder: loaded.decoder,
            text,
            settings,
            vocab_size: config.vocab_size,
        })),
    })
}

/// The batch shapes warm-up runs, `(rows, variable length)`: one row and a full batch; for a
/// text model with padding buckets, one row at every bucket, and a full batch (as many rows as
/// the token budget lets through) at the smallest and at the largest bucket, so that every
/// length the batcher pads to has run and the allocator has seen the largest batch before the
/// model is ready. On a GPU the full batches are also run at every power of two below them:
/// each size loads its own kernels and settles its own allocator blocks, which would otherwise
/// stall the first requests that form such a batch.
fn warmup_shapes(spec: &ModelSpec, on_gpu: bool) -> Vec<(usize, usize)> {
    let max_rows = spec.batching.max_batch_size;
    let rows_up_to = |full: usize| -> Vec<usize> {
        let mut rows: Vec<usize> = match on_gpu {
            true => std::iter::successors(Some(2usize), |r| r.checked_mul(2))
                .take_while(|&r| r < full)
                .collect(),
            false => Vec::new(),
        };
        if full > 1 {
            rows.push(full);
        }
        rows
    };
    let mut shapes = Vec::new();
    match &spec.token_batching {
        Some(t) if !t.sequence_buckets.is_empty() => {
            let full = |len: usize| match t.max_batch_tokens {
                0 => max_rows,
                budget => (budget / len).clamp(1, max_rows),
            };
            shapes.extend(t.sequence_buckets.iter().map(|&len| (1, len)));
            let (first, last) = (
                t.sequence_buckets[0],
                *t.sequence_buckets.last().unwrap_or(&1),
            );
            for len in [first, last] {
                for rows in rows_up_to(full(len)) {
                    if !shapes.contains(&(rows, len)) {
                        shapes.push((rows, len));
                    }
                }
            }
        }
        _ => {
            let len = spec
                .token_batching
                .as_ref()
                .map_or(8, |t| t.max_length.min(16));
            shapes.push((1, len));
            shapes.extend(rows_up_to(max_rows).into_iter().map(|rows| (rows, len)));
        }
    }
    shapes
}

/// The model's outputs must match what model.toml declares: count, batch dimension, dims.
fn check_outputs(
    spec: &ModelSpec,
    outputs: &[crate::tensor::HostTensor],
    rows: usize,
) -> Result<(), EngineError> {
    let bad = |m: String| EngineError::Output(m);
    if outputs.len() != spec.outputs.len() {
        return Err(bad(format!(
            "the model returns {} output(s); model.toml declares {}",
            outputs.len(),
            spec.outputs.len()
        )));
    }
    for (o, s) in outputs.iter().zip(&spec.outputs) {
        let dims_ok = o.shape.len() == s.dims.len() + 1
            && o.shape[0] == rows
            && o.shape[1..]
                .iter()
                .zip(&s.dims)
                .all(|(&a, &d)| d < 0 || a == d as usize);
        if !dims_ok {
            return Err(bad(format!(
                "output '{}' has shape {:?} for a batch of {rows}; model.toml declares [-1] + {:?}",
                s.name, o.shape, s.dims
            )));
        }
        if o.dtype != s.datatype {
            return Err(bad(format!(
                "output '{}' is {}; model.toml declares {}",
                s.name, o.dtype, s.datatype
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{quantized_weights, warmup_shapes};
    use crate::config::model_spec::ModelSpec;
    use crate::engine::{DecoderConfig, Quantization};
    use crate::registry::spec::parse_spec;
    use std::path::Path;

    fn spec(extra: &str) -> ModelSpec {
        let text = format!("kind = \"regressor\"\n{extra}");
        parse_spec("m", &text, Path::new("/m/model.toml"), Path::new("/m")).unwrap()
    }

    #[test]
    fn a_gpu_warms_every_power_of_two_up_to_a_full_batch() {
        let s = spec("[batching]\nmax_batch_size = 24");
        assert_eq!(warmup_shapes(&s, false), [(1, 8), (24, 8)]);
        assert_eq!(
            warmup_shapes(&s, true),
            [(1, 8), (2, 8), (4, 8), (8, 8), (16, 8), (24, 8)]
        );
        let one = spec("[batching]\nmax_batch_size = 1");
        assert_eq!(warmup_shapes(&one, true), [(1, 8)]);
    }

    /// SmolLM2-135M's fp32 checkpoint (538 MB; 106M of its 135M parameters in the blocks'
    /// linear layers): int8 counts them a byte each, int4 half a byte and a scale and zero per
    /// group; the embeddings stay fp32 (113 MB).
    #[test]
    fn the_budget_counts_quantized_linear_layers_at_their_size() {
        let config = DecoderConfig::parse(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "tie_word_embeddings": true}"#,
        )
        .unwrap();
        let file = 538_090_408;
        let mb = |q| quantized_weights(&config, file, q) as f64 / 1e6;
        let int8 = mb(Quantization::Int8);
        assert!((219.0..221.0).contains(&int8), "{int8} MB");
        let int4 = mb(Quantization::Int4 { group_size: 32 });
        assert!((179.0..181.0).contains(&int4), "{int4} MB");
        let int4_g64 = mb(Quantization::Int4 { group_size: 64 });
        assert!((172.0..174.0).contains(&int4_g64), "{int4_g64} MB");
    }
}
