//! What the text kinds share: a tokenizer that fills the model's token inputs by name
//! (`input_ids`, `attention_mask`, `token_type_ids`, in the model's order), their pad values,
//! and texts from v2 BYTES inputs.

use std::path::Path;

use super::{bytes_rows, invalid, Limits};
use crate::codec::budget::{decode_share, BudgetShare};
use crate::codec::tokenizer::{TextSpec, Tokens};
use crate::codec::v2::V2Input;
use crate::codec::{CodecError, DecodeBudget, Instance, TextCodec};
use crate::config::model_spec::{ModelSpec, TensorSpec};
use crate::config::torchscript;
use crate::tensor::{DType, Item};

/// The token inputs a text model may take, filled by the server from the tokenizer.
pub const TOKEN_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// What the text kinds share in model.toml: a `[text]` table, its tokenizer resolved against
/// the model's folders.
pub fn text_table(spec: &ModelSpec, text: Option<TextSpec>) -> Result<TextSpec, String> {
    let mut text = text.ok_or(format!(
        "kind {} needs a [text] table (max_length, tokenizer)",
        spec.kind
    ))?;
    if text.max_length == 0 {
        return Err("text.max_length must be positive".into());
    }
    text.tokenizer = spec.resolve(&text.tokenizer);
    Ok(text)
}

/// Token inputs by name: those declared, else those the TorchScript forward names, else
/// `default` (the demo's text-classifier takes token ids only; transformers take their mask
/// too).
pub fn declare_token_inputs(
    spec: &ModelSpec,
    declared: Option<Vec<TensorSpec>>,
    default: &[&str],
) -> Result<Vec<TensorSpec>, String> {
    let token = |name: &str| TensorSpec::new(name, DType::Int64, vec![-1]);
    let inputs = match declared {
        Some(inputs) => inputs,
        None => match forward_token_inputs(&spec.file, &spec.kind)? {
            Some(names) => names.iter().map(|n| token(n)).collect(),
            None => default.iter().map(|n| token(n)).collect(),
        },
    };
    for input in &inputs {
        if !TOKEN_INPUTS.contains(&input.name.as_str()) {
            return Err(format!(
                "input '{}': a {} model's inputs are filled from the tokenizer, so each is one of {TOKEN_INPUTS:?}",
                input.name, spec.kind
            ));
        }
        if input.datatype != DType::Int64 || input.dims != [-1] {
            return Err(format!(
                "input '{}' is INT64 with dims [-1] (a sequence per text)",
                input.name
            ));
        }
    }
    Ok(inputs)
}

/// A text model's token inputs as its TorchScript `forward` names them, in order: `None` when
/// the file cannot be read as TorchScript here (its load reports that) or its arguments carry no
/// names (`argument_1`, ...: tch's traces). An argument the server cannot fill from the
/// tokenizer, unless it has a default, makes the model unusable without `[[inputs]]`.
fn forward_token_inputs(model_file: &Path, kind: &str) -> Result<Option<Vec<String>>, String> {
    let Ok(args) = torchscript::forward_args(model_file) else {
        return Ok(None);
    };
    let unnamed = |n: &str| {
        n.strip_prefix("argument_")
            .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
    };
    if args.iter().all(|a| unnamed(&a.name)) {
        return Ok(None);
    }
    let all: Vec<&str> = args.iter().map(|a| a.name.as_str()).collect();
    if !all.iter().any(|n| TOKEN_INPUTS.contains(n)) {
        return Err(format!(
            "{}'s forward takes none of {TOKEN_INPUTS:?} (it takes {all:?}), so the server cannot feed it text",
            model_file.display()
        ));
    }
    let mut names = Vec::new();
    for arg in &args {
        if TOKEN_INPUTS.contains(&arg.name.as_str()) {
            names.push(arg.name.clone());
        } else if !arg.has_default {
            return Err(format!(
                "{}'s forward takes {all:?}; a {kind} model's inputs are filled from the tokenizer, and '{}' is not one of {TOKEN_INPUTS:?} (declare [[inputs]], or trace a wrapper that takes only those)",
                model_file.display(),
                arg.name
            ));
        }
    }
    Ok(Some(names))
}

pub struct TokenInputs {
    text: TextCodec,
    /// The model's inputs, by name, in its order.
    names: Vec<String>,
    /// The server's decode budget, which tokenising takes a share of too.
    budget: Option<&'static DecodeBudget>,
}

/// Bytes a tokenizer holds per byte of text while it works (offsets, token strings, ids, ...),
/// before truncation keeps `max_length` tokens.
const TOKENIZING_BYTES_PER_TEXT_BYTE: u64 = 64;

impl TokenInputs {
    /// The token inputs of `spec` (its signature completed), tokenised as `text` says.
    pub fn new(spec: &ModelSpec, text: &TextSpec, limits: &Limits) -> Result<Self, String> {
        Ok(Self {
            text: TextCodec::load(text, limits.max_text_bytes)?,
            names: spec.inputs.iter().map(|i| i.name.clone()).collect(),
            budget: limits.image.budget,
        })
    }

    /// A share of the decode budget for tokenising `bytes` of text.
    fn share(&self, bytes: usize) -> Result<Option<BudgetShare<'static>>, CodecError> {
        decode_share(self.budget, bytes as u64 * TOKENIZING_BYTES_PER_TEXT_BYTE)
    }

    /// One text as an item of one row.
    pub fn text(&self, text: &str) -> Result<Item, CodecError> {
        let _share = self.share(text.len())?;
        Ok(self.item(&self.text.tokens(text)?))
    }

    /// Token ids the client tokenised itself as an item of one row.
    pub fn ids(&self, ids: &[i64]) -> Result<Item, CodecError> {
        Ok(self.item(&self.text.id_tokens(ids)?))
    }

    /// A pair (segments 0 and 1) as an item of one row.
    pub fn pair(&self, first: &str, second: &str) -> Result<Item, CodecError> {
        let _share = self.share(first.len() + second.len())?;
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
