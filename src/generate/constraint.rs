//! Structured output: a grammar enforced while decoding, one token mask per step.
//!
//! A request's constraint (a JSON schema, a regular expression, a list of choices or a Lark
//! grammar) is compiled by `llguidance` at admission, before anything is streamed, so that a
//! schema keyword it cannot enforce is the client's error (a 400 naming the keyword), never a
//! silently weaker schema. Each sequence then owns a [`Constraint`]: the scheduler computes its
//! next mask (which tokens may come next) while the step's forward pass runs, the sampler
//! removes every other token from the logits, and the chosen token is committed to it.
//!
//! The token trie llguidance walks is built here from the project's own `tokenizers`
//! tokenizer: each token's bytes (byte-level BPE through GPT-2's byte alphabet, sentencepiece
//! through its `▁` and `<0xNN>` byte tokens), special tokens marked as llguidance marks them.
//! The end of the answer is one synthetic token past the vocabulary: when the grammar allows
//! it, every end-of-sequence token of the request is allowed.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// The largest grammar a request may give (a schema's JSON, a regex, a Lark text), in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// What a request constrains its answer to.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against the schema.
    JsonSchema(Value),
    /// Text matching the regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of the strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

/// How JSON is written under a schema: one space after `:` and `,` (as Python's `json.dumps`
/// writes it), no other whitespace, so that a model cannot spend its tokens on blanks.
fn json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// A schema with this server's JSON layout options (`x-guidance`, which llguidance reads and
/// removes before compiling).
pub fn with_layout(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut map = map.clone();
            map.insert("x-guidance".into(), json_options());
            Value::Object(map)
        }
        // `true`: any value
        Value::Bool(true) => json!({"x-guidance": json_options()}),
        other => other.clone(),
    }
}

/// A regular expression matching `s` literally.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl GrammarSpec {
    /// The grammar llguidance compiles.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(&json!({"type": "object"})))
            }
            GrammarSpec::JsonSchema(schema) => {
                if !(schema.is_object() || schema == &Value::Bool(true)) {
                    return Err("the schema is a JSON object".into());
                }
                TopLevelGrammar::from_json_schema(with_layout(schema))
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                let rx: Vec<String> = choices.iter().map(|c| regex_escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", rx.join("|")))
            }
            GrammarSpec::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        })
    }

    /// The grammar's size in bytes (the bound on what a request may give).
    fn size(&self) -> usize {
        match self {
            GrammarSpec::JsonObject => 0,
            GrammarSpec::JsonSchema(s) => s.to_string().len(),
            GrammarSpec::Regex(r) | GrammarSpec::Lark(r) => r.len(),
            GrammarSpec::Choice(c) => c.iter().map(|s| s.len() + 1).sum(),
        }
    }
}

/// Why a grammar was refused (a 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The schema uses keywords this server cannot enforce.
    #[error("the schema uses {} this server cannot enforce: {}; refused rather than enforced partially", if .0.len() == 1 { "a keyword" } else { "keywords" }, .0.join(", "))]
    Unsupported(Vec<String>),
    /// Too large, or too costly to compile.
    #[error("{0}")]
    TooLarge(String),
    /// Not a valid grammar.
    #[error("{0}")]
    Invalid(String),
}

/// The token trie's words: each token's bytes, special tokens behind llguidance's marker byte,
/// `vocab` words in all (ids the tokenizer does not know are empty: never allowed).
pub fn token_bytes(tokenizer: &Tokenizer, vocab: usize) -> Vec<Vec<u8>> {
    let json: Value = serde_json::from_str(&tokenizer.to_string(false).unwrap_or_default())
        .unwrap_or(Value::Null);
    let decoder = &json["decoder"];
    let decoders: Vec<&Value> = match decoder["decoders"].as_array() {
        Some(list) => list.iter().collect(),
        None => vec![decoder],
    };
    let byte_level = decoders
        .iter()
        .any(|d| d["type"].as_str() == Some("ByteLevel"));
    // sentencepiece: the character that stands for a space
    let mut space = '\u{2581}';
    for d in &decoders {
        match d["type"].as_str() {
            Some("Replace") if d["content"].as_str() == Some(" ") => {
                if let Some(c) = d["pattern"]["String"].as_str().and_then(single_char) {
                    space = c;
                }
            }
            Some("Metaspace") => {
                if let Some(c) = d["replacement"].as_str().and_then(single_char) {
                    space = c;
                }
            }
            _ => {}
        }
    }
    let byte_of = gpt2_bytes();
    let mut words = vec![Vec::new(); vocab];
    for (text, id) in tokenizer.get_vocab(false) {
        let Some(word) = words.get_mut(id as usize) else {
            continue;
        };
        *word = if byte_level {
            text.chars()
                .map(|c| byte_of.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| text.as_bytes().to_vec())
        } else if let Some(b) = byte_token(&text) {
            vec![b]
        } else {
            text.replace(space, " ").into_bytes()
        };
    }
    for (id, added) in tokenizer.get_added_tokens_decoder() {
        let Some(word) = words.get_mut(id as usize) else {
            continue;
        };
        let mut bytes = Vec::with_capacity(added.content.len() + 1);
        if added.special {
            bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
        }
        bytes.extend_from_slice(added.content.as_bytes());
        *word = bytes;
    }
    words
}

fn single_char(s: &str) -> Option<char> {
    let mut chars = s.chars();
    let c = chars.next()?;
    chars.next().is_none().then_some(c)
}

/// A sentencepiece byte-fallback token `<0xNN>`.
fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// GPT-2's byte-level alphabet: the character each byte is written as.
fn gpt2_bytes() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = b as char;
        if matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}') {
            map.insert(c, b);
        } else {
            map.insert(char::from_u32(next).expect("a valid char"), b);
            next += 1;
        }
    }
    map
}

/// The tokenizer as llguidance sees it: the trie (tokenising greedily over it; this server
/// never asks llguidance for forced tokens, the one use of a canonical tokenisation).
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// A model's grammar compiler, built on first use (the trie over its vocabulary and
/// llguidance's token classes take a moment).
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab: usize,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .finish()
    }
}

/// llguidance's limits for one request's grammar: a hostile schema costs a bounded amount to
/// compile and to step.
fn limits() -> ParserLimits {
    ParserLimits {
        max_items_in_row: 2000,
        initial_lexer_fuel: 1_000_000,
        step_lexer_fuel: 200_000,
        step_max_items: 50_000,
        max_lexer_states: 100_000,
        max_grammar_size: 200_000,
        precompute_large_lexemes: true,
        verbose_errors: false,
    }
}

impl Grammars {
    /// For a model whose logits have `vocab` entries.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Self {
        Self {
            tokenizer,
            vocab,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, GrammarError> {
        self.factory
            .get_or_init(|| {
                let mut words = token_bytes(&self.tokenizer, self.vocab);
                // the end of the answer: one token past the vocabulary
                let eos = words.len() as TokenId;
                words.push(Vec::new());
                let info = TokRxInfo::new(words.len() as u32, eos);
                let env: TokEnv = Arc::new(Env {
                    trie: TokTrie::from(&info, &words),
                });
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                *factory.limits_mut() = limits();
                Ok(Arc::new(factory))
            })
            .as_ref()
            .map_err(|e| GrammarError::Invalid(format!("the grammar engine failed to start: {e}")))
    }

    /// Compiles a request's grammar (a 400's reason when it cannot be enforced as given).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, GrammarError> {
        let size = spec.size();
        if size > MAX_GRAMMAR_BYTES {
            return Err(GrammarError::TooLarge(format!(
                "the grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES}"
            )));
        }
        let grammar = spec.grammar().map_err(GrammarError::Invalid)?;
        let factory = self.factory()?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| refusal(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(refusal(&e));
        }
        Ok(Constraint {
            matcher,
            mask: None,
            eos: self.vocab as TokenId,
            vocab: self.vocab,
            mask_time: Duration::ZERO,
        })
    }
}

/// llguidance's compile error as the client's: unsupported keywords named, limits said.
fn refusal(message: &str) -> GrammarError {
    if let Some(at) = message.find("Unimplemented keys: [") {
        let rest = &message[at + "Unimplemented keys: [".len()..];
        let list = rest.split(']').next().unwrap_or_default();
        let keys: Vec<String> = list
            .split(',')
            .map(|k| k.trim().trim_matches('"').to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if !keys.is_empty() {
            return GrammarError::Unsupported(keys);
        }
    }
    let lower = message.to_lowercase();
    if lower.contains("fuel") || lower.contains("too large") || lower.contains("limit") {
        return GrammarError::TooLarge(format!(
            "the grammar is too costly to compile within this server's limits: {message}"
        ));
    }
    GrammarError::Invalid(message.to_string())
}

/// One sequence's grammar state: what it has consumed, and the mask of the next token once
/// computed.
pub struct Constraint {
    matcher: Matcher,
    mask: Option<Result<SimpleVob, String>>,
    /// The synthetic end-of-answer token (one past the vocabulary).
    eos: TokenId,
    vocab: usize,
    /// Time spent computing masks.
    mask_time: Duration,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("ready", &self.mask.is_some())
            .finish()
    }
}

impl Clone for Constraint {
    /// An independent copy (another choice of the same request).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
            eos: self.eos,
            vocab: self.vocab,
            mask_time: Duration::ZERO,
        }
    }
}

impl Constraint {
    /// Computes the next token's mask unless it is known (the scheduler calls it while the
    /// step's forward pass runs).
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            let started = Instant::now();
            let mask = self.matcher.compute_mask().map_err(|e| e.to_string());
            self.mask_time += started.elapsed();
            self.mask = Some(mask);
        }
    }

    /// Whether the next mask is computed.
    pub fn ready(&self) -> bool {
        self.mask.is_some()
    }

    /// Removes the tokens the grammar does not allow next from `scores` (set to minus
    /// infinity); `stop_tokens` (the request's end-of-sequence ids) keep their scores exactly
    /// when the grammar may end here. Fails when the grammar is in error or allows no token.
    pub fn apply(&mut self, scores: &mut [f32], stop_tokens: &[u32]) -> Result<(), String> {
        self.prepare();
        let mask = match self.mask.as_ref().expect("prepared") {
            Ok(mask) => mask,
            Err(e) => return Err(e.clone()),
        };
        let end = mask.is_allowed(self.eos);
        let kept: Vec<(usize, f32)> = if end {
            stop_tokens
                .iter()
                .filter_map(|&t| scores.get(t as usize).map(|&s| (t as usize, s)))
                .collect()
        } else {
            Vec::new()
        };
        let words = mask.as_slice();
        for (w, chunk) in scores.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, s) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        // the stop tokens are special text the grammar never produces: masked above, and
        // allowed again when the grammar may end
        for &t in stop_tokens {
            if let Some(s) = scores.get_mut(t as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
        for (t, s) in kept {
            scores[t] = s;
        }
        if scores.iter().all(|s| *s == f32::NEG_INFINITY) {
            return Err("the grammar allows no token here".into());
        }
        Ok(())
    }

    /// Commits the chosen token (`end`: it ends the answer, an end-of-sequence token). Returns
    /// whether the grammar is complete: nothing more may follow.
    pub fn commit(&mut self, token: u32, end: bool) -> Result<bool, String> {
        self.mask = None;
        let token = if end { self.eos } else { token };
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("the grammar refused a token: {e}"))?;
        Ok(self.matcher.is_stopped())
    }

    /// Time spent computing masks so far.
    pub fn mask_time(&self) -> Duration {
        self.mask_time
    }

    /// Tokens in the vocabulary.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

#[cfg(test)]
mod tests;
