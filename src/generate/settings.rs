//! A generative model's `[generation]` table in model.toml: where its checkpoint is, how large
//! its KV cache and its batches are, how long its requests and stalled streams may take, and
//! its sampling defaults. Everything has a default; the checkpoint says the rest.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::tools::ToolFormat;
use crate::config::size::parse_size;
use crate::engine::Quantization;

/// The `[generation]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSettings {
    /// The Hugging Face checkpoint folder (relative: to the model's version folder, else
    /// beside model.toml); default: the model's folder itself.
    pub checkpoint: Option<PathBuf>,
    /// The longest sequence (prompt and answer) served, in tokens; default and cap: the
    /// checkpoint's `max_position_embeddings`.
    pub context_length: Option<usize>,
    /// The KV cache's size in tokens (all sequences together). Exclusive with
    /// `kv_cache_memory`.
    pub kv_cache_tokens: Option<usize>,
    /// The KV cache's size in memory (`512MiB`, `4GiB`); default [`DEFAULT_KV_MEMORY`].
    pub kv_cache_memory: Option<String>,
    /// Positions per KV block.
    pub block_size: usize,
    /// Sequences computed together in one step, at most.
    pub max_sequences: usize,
    /// Sequences waiting for a place in the running batch, at most; more are refused (503).
    pub max_waiting: usize,
    /// Tokens computed in one step, at most (prompts beyond it are computed in pieces over
    /// several steps, so that running sequences keep their pace).
    pub max_step_tokens: usize,
    /// Keep full KV blocks for later sequences that begin with the same tokens (a shared
    /// system prompt, the conversation so far): their prompts compute only what is new.
    pub prefix_caching: bool,
    /// Beside decoding sequences, a step carries at most the prompt tokens that make it take
    /// this many times a step of decoding alone (measured as the model runs), so that long
    /// prompts arriving slow running streams by this factor at most and take longer
    /// themselves; 0 (the default): only `max_step_tokens` bounds a step.
    pub max_decode_slowdown: f64,
    /// Tokens a stream may hold unread before its sequence pauses.
    pub stream_buffer: usize,
    /// A paused stream's sequence ends after this many seconds unread.
    pub stall_timeout_s: f64,
    /// A request's deadline in seconds (a client's `x-request-timeout-ms` may shorten it).
    pub timeout_s: f64,
    /// The answer's length when a request does not say (default: up to the context length).
    pub max_tokens: Option<usize>,
    /// Sampling defaults for requests that do not set them (over `generation_config.json`'s).
    pub sampling: SamplingDefaults,
    /// How the model writes tool calls: "hermes", "llama3_json" or "mistral" (default: from
    /// the chat template's text, else "hermes").
    pub tool_call_parser: Option<ToolFormat>,
    /// Weight-only quantization of the blocks' linear layers, computed at load: "int8"
    /// (symmetric, per output channel), "int4" (asymmetric, per group of
    /// `quantization_group_size` inputs) or "none" (the default: the model's precision).
    /// CPU only.
    pub quantization: QuantizationMode,
    /// Inputs per int4 group: 32, 64, 128 or 256, dividing every layer's inputs. Default 32,
    /// llama.cpp's Q4_0 block (5 bits a weight with the bf16 scale and zero); on the bundled
    /// SmolLM2 (dequantised from Q4_1, blocks of 32) groups of 64 raised the test text's
    /// perplexity by a third (docs/MODELS.md).
    pub quantization_group_size: usize,
}

/// `quantization` as model.toml writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizationMode {
    #[default]
    None,
    Int8,
    Int4,
}

/// The int4 group size unless model.toml says.
pub const DEFAULT_QUANTIZATION_GROUP_SIZE: usize = 32;

/// Sampling parameters a model may default (the request's own win).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    /// These defaults, each missing one taken from `other`.
    pub fn or(&self, other: &SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            temperature: self.temperature.or(other.temperature),
            top_p: self.top_p.or(other.top_p),
            top_k: self.top_k.or(other.top_k),
            min_p: self.min_p.or(other.min_p),
            repetition_penalty: self.repetition_penalty.or(other.repetition_penalty),
        }
    }
}

/// The KV cache's memory unless model.toml says.
pub const DEFAULT_KV_MEMORY: u64 = 1 << 30;

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            checkpoint: None,
            context_length: None,
            kv_cache_tokens: None,
            kv_cache_memory: None,
            block_size: 16,
            max_sequences: 64,
            max_waiting: 256,
            max_step_tokens: 512,
            prefix_caching: true,
            max_decode_slowdown: 0.0,
            stream_buffer: 32,
            stall_timeout_s: 30.0,
            timeout_s: 600.0,
            max_tokens: None,
            sampling: SamplingDefaults::default(),
            tool_call_parser: None,
            quantization: QuantizationMode::None,
            quantization_group_size: DEFAULT_QUANTIZATION_GROUP_SIZE,
        }
    }
}

/// The KV cache's size as model.toml gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSize {
    Tokens(usize),
    Bytes(u64),
}

impl GenerationSettings {
    /// Checks the values (the table's own keys are checked by serde).
    pub fn check(&self) -> Result<(), String> {
        let positive = |name: &str, v: usize| match v {
            0 => Err(format!("generation.{name} must be at least 1")),
            _ => Ok(()),
        };
        positive("block_size", self.block_size)?;
        positive("max_sequences", self.max_sequences)?;
        positive("max_waiting", self.max_waiting)?;
        positive("max_step_tokens", self.max_step_tokens)?;
        positive("stream_buffer", self.stream_buffer)?;
        if let Some(n) = self.context_length {
            positive("context_length", n)?;
        }
        if let Some(n) = self.max_tokens {
            positive("max_tokens", n)?;
        }
        for (name, v) in [
            ("stall_timeout_s", self.stall_timeout_s),
            ("timeout_s", self.timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("generation.{name} must be a positive number"));
            }
        }
        let slowdown = self.max_decode_slowdown;
        if !(slowdown == 0.0 || (slowdown.is_finite() && slowdown > 1.0)) {
            return Err("generation.max_decode_slowdown must be 0 (off) or more than 1".into());
        }
        self.kv_size()?;
        if !Quantization::INT4_GROUP_SIZES.contains(&self.quantization_group_size) {
            return Err(format!(
                "generation.quantization_group_size must be one of {:?}",
                Quantization::INT4_GROUP_SIZES
            ));
        }
        let s = &self.sampling;
        let within = |name: &str, v: Option<f32>, lo: f32, hi: f32| match v {
            Some(v) if !(v >= lo && v <= hi) => Err(format!(
                "generation.sampling.{name} must be within [{lo}, {hi}]"
            )),
            _ => Ok(()),
        };
        within("temperature", s.temperature, 0.0, 2.0)?;
        within("top_p", s.top_p, f32::MIN_POSITIVE, 1.0)?;
        within("min_p", s.min_p, 0.0, 1.0)?;
        within("repetition_penalty", s.repetition_penalty, 0.01, 10.0)?;
        Ok(())
    }

    /// The KV cache's size: `kv_cache_tokens`, `kv_cache_memory` or the default memory.
    pub fn kv_size(&self) -> Result<KvSize, String> {
        match (self.kv_cache_tokens, &self.kv_cache_memory) {
            (Some(_), Some(_)) => {
                Err("generation: give kv_cache_tokens or kv_cache_memory, not both".into())
            }
            (Some(0), None) => Err("generation.kv_cache_tokens must be at least 1".into()),
            (Some(t), None) => Ok(KvSize::Tokens(t)),
            (None, Some(m)) => parse_size(m)
                .map(KvSize::Bytes)
                .map_err(|e| format!("generation.kv_cache_memory: {e}")),
            (None, None) => Ok(KvSize::Bytes(DEFAULT_KV_MEMORY)),
        }
    }

    /// Blocks in the KV pool, for a model whose one position takes `bytes_per_token` bytes.
    pub fn kv_blocks(&self, bytes_per_token: u64) -> Result<usize, String> {
        let tokens = match self.kv_size()? {
            KvSize::Tokens(t) => t as u64,
            KvSize::Bytes(b) => b / bytes_per_token.max(1),
        };
        let blocks = tokens / self.block_size as u64;
        if blocks == 0 {
            return Err(format!(
                "generation: the KV cache holds no block of {} tokens",
                self.block_size
            ));
        }
        Ok(blocks as usize)
    }

    /// The linear layers' quantization; `None`: the model's precision.
    pub fn quantization(&self) -> Option<Quantization> {
        match self.quantization {
            QuantizationMode::None => None,
            QuantizationMode::Int8 => Some(Quantization::Int8),
            QuantizationMode::Int4 => Some(Quantization::Int4 {
                group_size: self.quantization_group_size,
            }),
        }
    }

    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stall_timeout_s)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GenerationSettings, String> {
        let s: GenerationSettings = toml::from_str(text).map_err(|e| e.to_string())?;
        s.check().map(|_| s)
    }

    #[test]
    fn the_kv_cache_is_sized_in_tokens_or_memory() {
        let s = parse("kv_cache_tokens = 1000").unwrap();
        assert_eq!(s.kv_blocks(1).unwrap(), 62);
        let s = parse("kv_cache_memory = \"1MiB\"\nblock_size = 4").unwrap();
        assert_eq!(s.kv_blocks(1024).unwrap(), 256);
        let s = parse("").unwrap();
        assert_eq!(s.kv_blocks(1 << 20).unwrap(), 1024 / 16);
        assert!(parse("kv_cache_tokens = 1\nkv_cache_memory = \"1GiB\"")
            .unwrap_err()
            .contains("not both"));
        assert!(parse("kv_cache_tokens = 8").unwrap().kv_blocks(1).is_err());
    }

    #[test]
    fn bad_values_are_named() {
        assert!(parse("max_sequences = 0")
            .unwrap_err()
            .contains("max_sequences"));
        assert!(parse("[sampling]\ntemperature = 3.0")
            .unwrap_err()
            .contains("sampling.temperature"));
        assert!(parse("kv_cache_memory = \"lots\"")
            .unwrap_err()
            .contains("kv_cache_memory"));
        assert!(parse("max_batch = 3").unwrap_err().contains("max_batch"));
        assert!(parse("max_decode_slowdown = 0.5")
            .unwrap_err()
            .contains("max_decode_slowdown"));
        assert_eq!(
            parse("max_decode_slowdown = 2.0")
                .unwrap()
                .max_decode_slowdown,
            2.0
        );
    }

    #[test]
    fn quantization_is_none_int8_or_int4_with_a_group_size() {
        assert_eq!(parse("").unwrap().quantization(), None);
        assert_eq!(
            parse("quantization = \"none\"").unwrap().quantization(),
            None
        );
        assert_eq!(
            parse("quantization = \"int8\"").unwrap().quantization(),
            Some(Quantization::Int8)
        );
        assert_eq!(
            parse("quantization = \"int4\"").unwrap().quantization(),
            Some(Quantization::Int4 { group_size: 32 })
        );
        assert_eq!(
            parse("quantization = \"int4\"\nquantization_group_size = 128")
                .unwrap()
                .quantization(),
            Some(Quantization::Int4 { group_size: 128 })
        );
        assert!(parse("quantization = \"int2\"")
            .unwrap_err()
            .contains("int2"));
        assert!(
            parse("quantization = \"int4\"\nquantization_group_size = 48")
                .unwrap_err()
                .contains("quantization_group_size")
        );
    }
}
