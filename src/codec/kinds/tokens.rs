//! What the text kinds share: a tokenizer that fills the model's token inputs by name
//! (`input_ids`, `attention_mask`, `token_type_ids`, in the model's order), their pad values,
//! and texts from v2 BYTES inputs.

use super::{bytes_rows, invalid, Signature};
use crate::batcher::Item;
use crate::codec::text::Tokens;
use crate::codec::v2::V2Input;
use crate::codec::{CodecError, Instance, TextCodec};
use crate::config::model_spec::ModelSpec;

pub struct TokenInputs {
    text: TextCodec,
    /// The model's inputs, by name, in its order.
    names: Vec<String>,
}

impl TokenInputs {
    pub fn new(spec: &ModelSpec, signature: &Signature, max_bytes: usize) -> Result<Self, String> {
        let text = spec
            .text
            .as_ref()
            .ok_or(format!("a {} model needs a [text] section", spec.kind))?;
        Ok(Self {
            text: TextCodec::load(text, max_bytes)?,
            names: signature.inputs.iter().map(|i| i.name.clone()).collect(),
        })
    }

    /// One text as an item of one row.
    pub fn text(&self, text: &str) -> Result<Item, CodecError> {
        Ok(self.item(&self.text.tokens(text)?))
    }

    /// A pair (segments 0 and 1) as an item of one row.
    pub fn pair(&self, first: &str, second: &str) -> Result<Item, CodecError> {
        Ok(self.item(&self.text.pair_tokens(first, second)?))
    }

    fn item(&self, tokens: &Tokens) -> Item {
        Item::with_tokens(
            self.names.iter().map(|n| tokens.input(n)).collect(),
            tokens.len(),
        )
    }

    /// Pads `input_ids` with the tokenizer's pad id, the mask and segments with 0.
    pub fn pad_values(&self) -> Vec<Option<f64>> {
        self.names
            .iter()
            .map(|n| {
                Some(if n == "input_ids" {
                    self.text.pad_id() as f64
                } else {
                    0.0
                })
            })
            .collect()
    }

    /// The string of a /v1 instance, or an error naming what `kind` takes.
    pub fn instance_text<'a>(instance: &'a Instance, kind: &str) -> Result<&'a str, CodecError> {
        match instance {
            Instance::Text(text) => Ok(text),
            other => Err(invalid(format!(
                "a {kind} instance is a string, got {}",
                other.json_type()
            ))),
        }
    }
}

/// The UTF-8 strings of a BYTES input shaped `[n]` or `[n, 1]`.
pub fn v2_texts(input: &V2Input) -> Result<Vec<&str>, CodecError> {
    bytes_rows(input, "strings")?
        .iter()
        .map(|t| {
            std::str::from_utf8(t)
                .map_err(|_| invalid(format!("input '{}': text is not UTF-8", input.name)))
        })
        .collect()
}
