//! `text-classifier`: strings tokenised with the model's `tokenizer.json` into its token inputs
//! (the demo model takes `input_ids` only; Hugging Face sequence classifiers also take
//! `attention_mask` and `token_type_ids`); answers labels and scores (softmax, or a sigmoid per
//! label with `multi_label`). In v2 the model takes one BYTES input, `text`.

use serde_json::Value;

use serde::Deserialize;

use super::classifier::{scores_output, Classifier, OutputSpec};
use super::tokens::{declare_token_inputs, text_table, v2_texts, TokenInputs};
use super::{tables, Declaration, Declared, Kind, ModelAdapter};
use crate::codec::tokenizer::TextSpec;
use crate::codec::v2::{V2Input, V2Output, V2TensorMeta, V2Type};
use crate::codec::{CodecError, Instance, OutputOptions};
use crate::config::model_spec::{ModelSpec, Signature};
use crate::tensor::{Inferred, Item};

/// The input of text models in v2.
pub const TEXT_INPUT: &str = "text";

pub const KIND: Kind = Kind {
    name: "text-classifier",
    declare,
    adapter: |spec, limits| {
        let t: Tables = tables(spec)?;
        Ok(Box::new(TextClassifier {
            tokens: TokenInputs::new(spec, &text_table(spec, t.text)?, limits)?,
            classifier: Classifier::new(spec, &t.output),
            signature: spec.signature(),
        }))
    },
};

/// The model.toml tables of a text classifier.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    text: Option<TextSpec>,
    #[serde(default)]
    output: OutputSpec,
}

/// Labels, token inputs (default `input_ids`, as the demo model), and output `scores`
/// `[labels]` unless declared.
fn declare(spec: &ModelSpec, d: Declared) -> Result<Declaration, String> {
    let t: Tables = tables(spec)?;
    let text = text_table(spec, t.text)?;
    let labels = t.output.labels(spec)?;
    if labels.is_empty() {
        return Err("a text-classifier needs output.labels, output.labels_file, or id2label in a config.json beside the model".into());
    }
    let inputs = declare_token_inputs(spec, d.inputs, &["input_ids"])?;
    let outputs = d
        .outputs
        .unwrap_or_else(|| vec![scores_output(labels.len())]);
    Ok(Declaration {
        signature: Signature::new(inputs, outputs),
        labels,
        channels_last: false,
        max_text_length: Some(text.max_length),
    })
}

pub struct TextClassifier {
    signature: Signature,
    tokens: TokenInputs,
    classifier: Classifier,
}

/// The v2 input of every text kind but the reranker: BYTES strings.
pub fn text_v2_input() -> Vec<V2TensorMeta> {
    vec![V2TensorMeta {
        name: TEXT_INPUT.into(),
        datatype: V2Type::Bytes,
        dims: vec![1],
    }]
}

/// Each string of the one `text` input as an item.
pub fn decode_v2_texts(
    tokens: &TokenInputs,
    mut inputs: Vec<V2Input>,
) -> Result<(Vec<Item>, usize), CodecError> {
    let input = inputs.pop().expect("one declared input");
    let items = v2_texts(&input)?
        .into_iter()
        .map(|t| tokens.text(t))
        .collect::<Result<Vec<_>, _>>()?;
    let rows = items.len();
    Ok((items, rows))
}

impl ModelAdapter for TextClassifier {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        self.tokens
            .text(TokenInputs::instance_text(instance, self.kind())?)
    }

    fn encode_prediction(&self, result: &Inferred, opts: OutputOptions) -> Value {
        let mut p = self.classifier.prediction(&result.outputs, opts);
        p["tokens"] = result.tokens.into();
        p
    }

    fn pad_values(&self) -> Vec<Option<f64>> {
        self.tokens.pad_values()
    }

    fn v2_inputs(&self) -> Vec<V2TensorMeta> {
        text_v2_input()
    }

    fn v2_outputs(&self) -> Vec<V2TensorMeta> {
        self.classifier.v2_outputs(&self.signature)
    }

    fn decode_v2(&self, inputs: Vec<V2Input>) -> Result<(Vec<Item>, usize), CodecError> {
        decode_v2_texts(&self.tokens, inputs)
    }

    fn encode_v2(&self, results: &[Inferred], wanted: &dyn Fn(&str) -> bool) -> Vec<V2Output> {
        self.classifier.encode_v2(results, &self.signature, wanted)
    }
}
