//! A generative model as the API layer sees it: its tokenizer and chat template, the checks a
//! request passes (parameters, context length, KV capacity) and its scheduler. Everything the
//! checkpoint says besides the weights comes from here: `tokenizer.json`, the chat template,
//! `tokenizer_config.json`'s special tokens and `generation_config.json`'s end-of-sequence ids
//! and sampling defaults.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::constraint::{Constraint, GrammarError, GrammarSpec, Grammars};
use super::sampling::{ParamError, SamplingParams};
use super::scheduler::{Event, KvCeiling, SchedulerHandle, SequenceRequest, SubmitError};
use super::settings::{GenerationSettings, SamplingDefaults};
use super::template::ChatTemplate;
use super::tools::ToolFormat;

/// The most choices (`n`) one request may ask for.
pub const MAX_CHOICES: usize = 16;

/// What a checkpoint says besides its weights.
pub struct CheckpointText {
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// Tokens that end an answer.
    pub eos: Vec<u32>,
    /// `generation_config.json`'s sampling values.
    pub sampling: SamplingDefaults,
}

impl CheckpointText {
    /// Reads `dir`'s tokenizer, chat template and generation config.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| format!("tokenizer.json: {e}"))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| format!("tokenizer.json: {e}"))?;
        tokenizer.with_padding(None);
        let template = ChatTemplate::from_checkpoint(dir)?;
        let json = |file: &str| -> Result<Value, String> {
            match std::fs::read_to_string(dir.join(file)) {
                Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{file}: {e}")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Null),
                Err(e) => Err(format!("{file}: {e}")),
            }
        };
        let (generation, config, tokenizer_config) = (
            json("generation_config.json")?,
            json("config.json")?,
            json("tokenizer_config.json")?,
        );
        let mut eos = Vec::new();
        for ids in [&generation["eos_token_id"], &config["eos_token_id"]] {
            match ids {
                Value::Number(n) => eos.extend(n.as_u64().map(|n| n as u32)),
                Value::Array(list) => {
                    eos.extend(list.iter().filter_map(Value::as_u64).map(|n| n as u32))
                }
                _ => {}
            }
        }
        let eos_token = &tokenizer_config["eos_token"];
        let eos_text = eos_token.as_str().or_else(|| eos_token["content"].as_str());
        if let Some(id) = eos_text.and_then(|t| tokenizer.token_to_id(t)) {
            eos.push(id);
        }
        eos.sort_unstable();
        eos.dedup();
        let float = |key: &str| generation[key].as_f64().map(|v| v as f32);
        let sampling = SamplingDefaults {
            temperature: float("temperature"),
            top_p: float("top_p"),
            top_k: generation["top_k"].as_u64().map(|k| k as usize),
            min_p: float("min_p"),
            repetition_penalty: float("repetition_penalty"),
        };
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            template,
            eos,
            sampling,
        })
    }
}

/// A request's generation parameters, as the API gave them (`None`: the model's default).
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Choices to generate.
    pub n: usize,
    /// Log-probabilities: `None`, or the chosen token's and this many alternatives.
    pub logprobs: Option<usize>,
    /// Generate past end-of-sequence tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// The client's own deadline, if shorter than the model's.
    pub deadline: Option<Instant>,
    /// The grammar every choice follows, compiled by [`Generator::compile`].
    pub constraint: Option<Constraint>,
    /// The text keeps special tokens (for tool-call parsing).
    pub special_text: bool,
}

/// What bounds one sequence's length: the context, a KV cache smaller than it, or a memory
/// budget that never lets a growing KV cache reach that size (a sequence longer than the cache
/// can ever hold could never be computed, so it is refused at admission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Context,
    /// The KV cache, smaller than the context length (given).
    KvCache {
        context_len: usize,
    },
    /// The memory budget of the model's device less its weights, in bytes: the most a KV
    /// cache that grows with use can ever hold, less than its largest size and the context.
    MemoryBudget {
        budget: u64,
        weights: u64,
        /// What the models that stay loaded beside it hold (see [`KvCeiling::kept`]).
        kept: u64,
    },
}

impl Limit {
    /// The longest sequence and what bounds it, of the context length, the KV cache's tokens
    /// and the tokens the memory budget (`budget`, where it bounds the cache) lets it hold.
    fn of(
        context_len: usize,
        kv: usize,
        budgeted: usize,
        budget: Option<KvCeiling>,
    ) -> (usize, Limit) {
        match budget {
            Some(c) if budgeted < kv.min(context_len) => (
                budgeted,
                Limit::MemoryBudget {
                    budget: c.budget,
                    weights: c.weights,
                    kept: c.kept,
                },
            ),
            _ if kv < context_len => (kv, Limit::KvCache { context_len }),
            _ => (context_len, Limit::Context),
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Context => f.write_str("this model's maximum context length is"),
            Limit::KvCache { context_len } => write!(
                f,
                "this model's context length is {context_len} tokens but its KV cache \
                 (kv_cache_tokens or kv_cache_memory in its model.toml), which one sequence can \
                 never outgrow, holds"
            ),
            Limit::MemoryBudget {
                budget,
                weights,
                kept,
            } => {
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                write!(
                    f,
                    "this model's memory budget (--model-memory-budget) is {:.1} MiB, of which \
                     its weights take {:.1} MiB",
                    mib(*budget),
                    mib(*weights)
                )?;
                if *kept > 0 {
                    write!(
                        f,
                        " and the models that stay loaded beside it (pinned, or all without \
                         --model-control lazy) {:.1} MiB",
                        mib(*kept)
                    )?;
                }
                f.write_str(
                    ", so its KV cache, which one sequence can never outgrow, can hold no \
                     more than",
                )
            }
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GenerateError {
    /// A parameter is out of range (400, naming it).
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The prompt and the answer do not fit the context, or the KV cache (400).
    #[error("{limit} {context} tokens; the request asks for {prompt} prompt tokens and {max_tokens} completion tokens ({total} in all)", total = prompt + max_tokens)]
    ContextLength {
        prompt: usize,
        max_tokens: usize,
        context: usize,
        limit: Limit,
    },
    /// The prompt fills the context, or the KV cache: no room for a single token (400).
    #[error("the prompt has {prompt} tokens; {limit} {context} tokens, which leaves no room for an answer")]
    PromptTooLong {
        prompt: usize,
        context: usize,
        limit: Limit,
    },
    /// The chat template could not render the messages (400).
    #[error("the chat template failed: {0}")]
    Template(String),
    /// The model has no chat template (400).
    #[error("this model has no chat template; use /v1/completions with a prompt")]
    NoTemplate,
    /// The prompt is empty (400).
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The text cannot be tokenised (400).
    #[error("the text cannot be tokenised: {0}")]
    Tokenize(String),
    /// The scheduler did not take it (503 when full).
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

/// Messages whose tool calls' `arguments` (JSON text, as OpenAI sends them) are objects, as chat
/// templates print them.
fn arguments_as_objects(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                for call in calls {
                    let args = &mut call["function"]["arguments"];
                    if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                        *args = parsed;
                    }
                }
            }
            m
        })
        .collect()
}

/// A served generative model.
pub struct Generator {
    scheduler: SchedulerHandle,
    text: CheckpointText,
    grammars: Grammars,
    settings: GenerationSettings,
    defaults: SamplingDefaults,
    vocab_size: usize,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("scheduler", &self.scheduler)
            .finish()
    }
}

impl Generator {
    pub fn new(
        scheduler: SchedulerHandle,
        text: CheckpointText,
        settings: GenerationSettings,
        vocab_size: usize,
    ) -> Self {
        let defaults = settings.sampling.or(&text.sampling);
        Self {
            scheduler,
            grammars: Grammars::new(text.tokenizer.clone(), vocab_size),
            text,
            settings,
            defaults,
            vocab_size,
        }
    }

    pub fn scheduler(&self) -> &SchedulerHandle {
        &self.scheduler
    }

    /// The longest sequence (prompt and answer), in tokens.
    pub fn context_len(&self) -> usize {
        self.scheduler.geometry().context_len
    }

    /// Tokens the KV cache holds, all sequences together.
    pub fn kv_capacity(&self) -> usize {
        let g = self.scheduler.geometry();
        g.num_blocks * g.block_size
    }

    /// Tokens the KV cache can ever hold under the memory budget (whole blocks): its capacity,
    /// or less where the budget never lets a cache that grows with use reach it.
    pub fn kv_capacity_budgeted(&self) -> usize {
        self.scheduler.max_blocks() * self.scheduler.geometry().block_size
    }

    /// The longest sequence one request may ask for, and what bounds it: the context, the KV
    /// cache, or the memory budget (the smallest; the context where they are equal).
    pub fn limit(&self) -> (usize, Limit) {
        let (blocks, budget) = self.scheduler.bound();
        Limit::of(
            self.context_len(),
            self.kv_capacity(),
            blocks * self.scheduler.geometry().block_size,
            budget,
        )
    }

    /// Sequences the model queues at most (a request's choices over all its prompts must fit).
    pub fn max_waiting(&self) -> usize {
        self.settings.max_waiting
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.text.template.is_some()
    }

    /// How the model writes tool calls: model.toml's `tool_call_parser`, else what the chat
    /// template shows, else hermes (the format of the fallback description of tools).
    pub fn tool_format(&self) -> ToolFormat {
        self.settings
            .tool_call_parser
            .or_else(|| {
                self.text
                    .template
                    .as_ref()
                    .and_then(|t| ToolFormat::detect(t.source()))
            })
            .unwrap_or(ToolFormat::Hermes)
    }

    /// The id of `text` when it is one special token of the vocabulary.
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        self.text
            .tokenizer
            .get_added_tokens_decoder()
            .iter()
            .find(|(_, t)| t.special && t.content == text)
            .map(|(&id, _)| id)
    }

    /// OpenAI chat `messages` rendered by the model's template and tokenised, with `tools`:
    /// given to a template that takes them (earlier calls' arguments as objects, as templates
    /// expect), else described in the system message in hermes style (the fallback).
    pub fn chat_prompt(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, GenerateError> {
        let template = self
            .text
            .template
            .as_ref()
            .ok_or(GenerateError::NoTemplate)?;
        let has_calls = messages
            .iter()
            .any(|m| m["role"] == "tool" || m["tool_calls"].is_array());
        let rendered = if !(tools.is_some() || has_calls) {
            template.render(messages, add_generation_prompt, tools)
        } else if template.takes_tools() {
            template.render(
                &arguments_as_objects(messages),
                add_generation_prompt,
                tools,
            )
        } else {
            template.render(
                &super::tools::fallback_messages(messages, tools),
                add_generation_prompt,
                None,
            )
        };
        let text = rendered.map_err(|e| GenerateError::Template(e.to_string()))?;
        // the template writes the special tokens (as transformers' apply_chat_template)
        self.encode(&text, false)
    }

    /// A completion prompt tokenised as the tokenizer does by default (with its special
    /// tokens, e.g. a beginning-of-sequence token).
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        self.encode(text, true)
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, GenerateError> {
        let encoding = self
            .text
            .tokenizer
            .encode(text, special)
            .map_err(|e| GenerateError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// A token's text, for log-probabilities (a byte-fallback token may be a piece of a
    /// character: its text then holds the replacement character).
    pub fn token_text(&self, id: u32) -> String {
        self.text.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Token ids as text (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.text.tokenizer.decode(ids, false).unwrap_or_default()
    }

    /// Compiles a request's grammar (CPU work bounded by the grammar engine's limits: run it
    /// off the async threads).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, GrammarError> {
        self.grammars.compile(spec)
    }

    /// The model's settings.
    pub fn settings(&self) -> &GenerationSettings {
        &self.settings
    }

    /// The chat template, if the checkpoint has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.text.template.as_ref()
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids given by a client, checked against the vocabulary.
    pub fn check_tokens(&self, ids: &[i64], param: &'static str) -> Result<Vec<u32>, ParamError> {
        ids.iter()
            .map(|&t| {
                (t >= 0 && (t as usize) < self.vocab_size)
                    .then_some(t as u32)
                    .ok_or_else(|| ParamError {
                        param,
                        message: format!(
                            "token {t} is outside the vocabulary of {}",
                            self.vocab_size
                        ),
                    })
            })
            .collect()
    }

    /// Checks a request over `prompt` and queues its `n` choices; each choice's events come
    /// through its receiver.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: &GenerateParams,
    ) -> Result<Vec<mpsc::Receiver<Event>>, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let sampling = self.sampling(params)?;
        let bad = |param: &'static str, message: String| {
            GenerateError::Param(ParamError { param, message })
        };
        if params.n == 0 || params.n > MAX_CHOICES {
            return Err(bad("n", format!("must be within [1, {MAX_CHOICES}]")));
        }
        if params.constraint.is_some() && !params.stop.is_empty() {
            return Err(bad(
                "stop",
                "stop strings cannot be combined with a grammar (response_format, guided \
                 decoding or a forced tool call): a stop string would cut the structured answer"
                    .into(),
            ));
        }
        if params.constraint.is_some() && params.ignore_eos {
            return Err(bad(
                "ignore_eos",
                "ignore_eos cannot be combined with a grammar: the grammar decides where the \
                 answer ends"
                    .into(),
            ));
        }
        if params.stop.len() > super::stop::MAX_STOP_STRINGS {
            return Err(bad(
                "stop",
                format!("at most {} stop strings", super::stop::MAX_STOP_STRINGS),
            ));
        }
        if let Some(k) = params.logprobs {
            if k > super::sampling::MAX_TOP_LOGPROBS {
                return Err(bad(
                    "top_logprobs",
                    format!("must be within [0, {}]", super::sampling::MAX_TOP_LOGPROBS),
                ));
            }
        }
        let (context, limit) = self.limit();
        let prompt_len = prompt.len();
        let max_tokens = match params.max_tokens.or(self.settings.max_tokens) {
            Some(0) => return Err(bad("max_tokens", "must be at least 1".into())),
            Some(m) if params.max_tokens.is_some() => m,
            // a model's default shortened to what the context leaves
            Some(m) => m.min(context.saturating_sub(prompt_len)),
            None => context.saturating_sub(prompt_len),
        };
        if prompt_len >= context {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt_len,
                context,
                limit,
            });
        }
        if prompt_len + max_tokens > context {
            return Err(GenerateError::ContextLength {
                prompt: prompt_len,
                max_tokens,
                context,
                limit,
            });
        }
        let now = Instant::now();
        let mut deadline = now + self.settings.timeout();
        if let Some(d) = params.deadline {
            deadline = deadline.min(d);
        }
        let stop_tokens = if params.ignore_eos {
            Vec::new()
        } else {
            self.text.eos.clone()
        };
        let requests = (0..params.n)
            .map(|i| {
                let mut sampling = sampling.clone();
                // each choice its own generator: the seed's sequence, moved on per choice
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                SequenceRequest {
                    prompt: prompt.clone(),
                    sampling,
                    max_tokens,
                    stop: params.stop.clone(),
                    stop_tokens: stop_tokens.clone(),
                    logprobs: params.logprobs,
                    constraint: params.constraint.clone(),
                    special_text: params.special_text,
                    arrived: now,
                    deadline,
                }
            })
            .collect();
        Ok(self.scheduler.submit(requests)?)
    }

    /// The request's sampling parameters over the model's defaults, checked.
    fn sampling(&self, p: &GenerateParams) -> Result<SamplingParams, ParamError> {
        let d = &self.defaults;
        let base = SamplingParams::default();
        let s = SamplingParams {
            temperature: p.temperature.or(d.temperature).unwrap_or(base.temperature),
            top_p: p.top_p.or(d.top_p).unwrap_or(base.top_p),
            top_k: p.top_k.or(d.top_k).unwrap_or(base.top_k),
            min_p: p.min_p.or(d.min_p).unwrap_or(base.min_p),
            repetition_penalty: p
                .repetition_penalty
                .or(d.repetition_penalty)
                .unwrap_or(base.repetition_penalty),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            logit_bias: p.logit_bias.clone(),
            seed: p.seed,
        };
        s.check(self.vocab_size)?;
        Ok(s)
    }

    /// The deadline the model gives a request.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_limit_bounds_a_sequence_and_is_named() {
        const MIB: u64 = 1 << 20;
        let budget = Some(KvCeiling {
            budget: 300 * MIB,
            weights: 260 * MIB,
            kept: 0,
        });
        // no budget, or one that leaves the cache its whole size
        assert_eq!(
            Limit::of(8192, 4096, 4096, None),
            (4096, Limit::KvCache { context_len: 8192 })
        );
        assert_eq!(Limit::of(2048, 4096, 4096, budget), (2048, Limit::Context));
        // a budget that never lets the cache reach its size, nor the context
        let (tokens, limit) = Limit::of(8192, 4096, 880, budget);
        assert_eq!(tokens, 880);
        assert_eq!(
            limit,
            Limit::MemoryBudget {
                budget: 300 * MIB,
                weights: 260 * MIB,
                kept: 0,
            }
        );
        let message = GenerateError::ContextLength {
            prompt: 900,
            max_tokens: 10,
            context: tokens,
            limit,
        }
        .to_string();
        assert!(
            message.contains("memory budget (--model-memory-budget) is 300.0 MiB")
                && message.contains("weights take 260.0 MiB")
                && message.contains(
                    "MiB, so its KV cache, which one sequence can never outgrow, can hold no \
                     more than 880 tokens; the request asks for 900 prompt tokens and 10 \
                     completion tokens (910 in all)"
                ),
            "{message}"
        );
        // models that stay loaded beside it are named where they hold memory
        let kept = Limit::MemoryBudget {
            budget: 300 * MIB,
            weights: 200 * MIB,
            kept: 60 * MIB,
        };
        assert!(kept
            .to_string()
            .contains("weights take 200.0 MiB and the models that stay loaded beside it"));
        // equal to the context: the context is named
        assert_eq!(Limit::of(880, 4096, 880, budget), (880, Limit::Context));
    }
}
