//! Text: a Hugging Face `tokenizer.json` turns a string (or a pair of strings) into the token
//! inputs a model takes, truncated by the tokenizer itself so that special tokens such as
//! `[CLS]` and `[SEP]` are kept.

use serde::Deserialize;
use std::path::PathBuf;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::CodecError;
use crate::tensor::HostTensor;

/// Text pre-processing with a Hugging Face `tokenizer.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    #[serde(default = "default_tokenizer")]
    pub tokenizer: PathBuf,
    /// Longer inputs are truncated to this many tokens, by the tokenizer (special tokens such
    /// as `[CLS]` and `[SEP]` are kept).
    pub max_length: usize,
    /// Token id that pads shorter sequences in a batch; default: the tokenizer's own pad id
    /// (its `padding` section, else its `[PAD]` or `<pad>` token), else 0.
    #[serde(default)]
    pub pad_id: Option<i64>,
}

fn default_tokenizer() -> PathBuf {
    PathBuf::from("tokenizer.json")
}

/// Tokenises strings for one model.
pub struct TextCodec {
    tokenizer: Tokenizer,
    pad_id: i64,
    max_bytes: usize,
    max_length: usize,
}

/// One text (or pair) as token rows: ids, and the segment of each (0 for a single text and the
/// first of a pair, 1 for the second). Its attention mask is all ones: padding is added where a
/// batch is formed.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
    /// Whether the tokenizer cut the text to `max_length`.
    pub truncated: bool,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The named token input as a `[1, len]` INT64 tensor: `input_ids`, `attention_mask` or
    /// `token_type_ids`.
    pub fn input(&self, name: &str) -> HostTensor {
        let row: Vec<i64> = match name {
            "attention_mask" => vec![1; self.ids.len()],
            "token_type_ids" => self.type_ids.clone(),
            _ => self.ids.clone(),
        };
        HostTensor::from_i64(vec![1, row.len()], &row).expect("shape from ids")
    }
}

impl TextCodec {
    /// Loads the model's `tokenizer.json` and sets it to truncate at `max_length`. Texts over
    /// `max_bytes` are refused (0: no limit).
    pub fn load(spec: &TextSpec, max_bytes: usize) -> Result<Self, String> {
        let mut tokenizer = Tokenizer::from_file(&spec.tokenizer)
            .map_err(|e| format!("cannot load tokenizer {}: {e}", spec.tokenizer.display()))?;
        let truncation = TruncationParams {
            max_length: spec.max_length,
            strategy: TruncationStrategy::LongestFirst,
            direction: TruncationDirection::Right,
            stride: 0,
        };
        tokenizer
            .with_truncation(Some(truncation))
            .map_err(|e| format!("tokenizer {}: {e}", spec.tokenizer.display()))?;
        let pad_id = spec.pad_id.unwrap_or_else(|| default_pad_id(&tokenizer));
        // the server pads where it forms a batch, not the tokenizer
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            pad_id,
            max_bytes,
            max_length: spec.max_length,
        })
    }

    /// The id that pads `input_ids` in a batch.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The tokens of one text.
    pub fn tokens(&self, text: &str) -> Result<Tokens, CodecError> {
        self.check_size(text)?;
        self.finish(self.tokenizer.encode(text, true))
    }

    /// The tokens of a pair (query and document), segments 0 and 1.
    pub fn pair_tokens(&self, first: &str, second: &str) -> Result<Tokens, CodecError> {
        self.check_size(first)?;
        self.check_size(second)?;
        self.finish(self.tokenizer.encode((first, second), true))
    }

    /// Token ids the client tokenised itself (OpenAI's token-array input), taken as they are:
    /// special tokens are the client's to add. Refused when empty, longer than `max_length`
    /// or outside the vocabulary (ids the model's embedding table has no row for).
    pub fn id_tokens(&self, ids: &[i64]) -> Result<Tokens, CodecError> {
        if ids.is_empty() {
            return Err(CodecError::Invalid("the token list is empty".into()));
        }
        if ids.len() > self.max_length {
            return Err(CodecError::Invalid(format!(
                "{} tokens; the model takes at most {} (max_length)",
                ids.len(),
                self.max_length
            )));
        }
        let vocab = self.tokenizer.get_vocab_size(true) as i64;
        if let Some(bad) = ids.iter().find(|&&id| !(0..vocab).contains(&id)) {
            return Err(CodecError::Invalid(format!(
                "token id {bad} is outside the model's vocabulary (0 to {})",
                vocab - 1
            )));
        }
        Ok(Tokens {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
            truncated: false,
        })
    }

    /// Token ids of `text` as a `[1, len]` INT64 tensor.
    pub fn encode(&self, text: &str) -> Result<HostTensor, CodecError> {
        Ok(self.tokens(text)?.input("input_ids"))
    }

    fn check_size(&self, text: &str) -> Result<(), CodecError> {
        if text.is_empty() {
            return Err(CodecError::Invalid("text is empty".into()));
        }
        if self.max_bytes > 0 && text.len() > self.max_bytes {
            return Err(CodecError::TooLarge(format!(
                "text of {} bytes; at most {} are accepted",
                text.len(),
                self.max_bytes
            )));
        }
        Ok(())
    }

    fn finish(
        &self,
        encoding: tokenizers::Result<tokenizers::Encoding>,
    ) -> Result<Tokens, CodecError> {
        let encoding =
            encoding.map_err(|e| CodecError::Invalid(format!("cannot tokenise text: {e}")))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| id as i64).collect();
        if ids.is_empty() {
            return Err(CodecError::Invalid(
                "text is empty (no tokens after tokenisation)".into(),
            ));
        }
        Ok(Tokens {
            type_ids: encoding.get_type_ids().iter().map(|&t| t as i64).collect(),
            truncated: !encoding.get_overflowing().is_empty(),
            ids,
        })
    }
}

/// The tokenizer's pad id: its padding settings, else its `[PAD]` or `<pad>` token, else 0.
fn default_pad_id(tokenizer: &Tokenizer) -> i64 {
    if let Some(p) = tokenizer.get_padding() {
        return p.pad_id as i64;
    }
    ["[PAD]", "<pad>"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .map_or(0, |id| id as i64)
}
