//! `reranker` (a cross-encoder): an instance is a pair, `{"query", "document"}` (or
//! `{"text", "text_pair"}`), tokenised together (segments 0 and 1); answers the model's raw
//! logit and its sigmoid, `{"score", "logit", "tokens"}`. v2 takes two BYTES inputs, `query`
//! and `document`, row by row, and returns `logits` and `score`.

use serde::Deserialize;
use serde_json::{json, Value};

use super::classifier::sigmoid;
use super::tokens::{declare_token_inputs, text_table, v2_texts, TokenInputs};
use super::{
    invalid, tables, tensor_outputs, Declaration, Declared, Kind, Limits, ModelAdapter, PairScorer,
};
use crate::codec::tokenizer::TextSpec;
use crate::codec::v2::{V2Data, V2Input, V2Output, V2TensorMeta, V2Type};
use crate::codec::{CodecError, Instance, OutputOptions};
use crate::config::model_spec::{ModelSpec, Signature, TensorSpec};
use crate::tensor::{DType, HostTensor};
use crate::tensor::{Inferred, Item};

/// The v2 output holding the sigmoid of each pair's logit.
pub const SCORE_OUTPUT: &str = "score";

pub const KIND: Kind = Kind {
    name: "reranker",
    declare,
    adapter: |spec, limits| Ok(Box::new(Reranker::new(spec, limits)?)),
};

/// The model.toml tables of a reranker.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    text: Option<TextSpec>,
}

/// Token inputs (default `input_ids` and `attention_mask`) and output `logits` `[1]` unless
/// declared.
fn declare(spec: &ModelSpec, d: Declared) -> Result<Declaration, String> {
    let t: Tables = tables(spec)?;
    let text = text_table(spec, t.text)?;
    let inputs = declare_token_inputs(spec, d.inputs, &["input_ids", "attention_mask"])?;
    let outputs = d
        .outputs
        .unwrap_or_else(|| vec![TensorSpec::new("logits", DType::Fp32, vec![1])]);
    Ok(Declaration {
        signature: Signature::new(inputs, outputs),
        labels: Vec::new(),
        channels_last: false,
        max_text_length: Some(text.max_length),
    })
}

pub struct Reranker {
    signature: Signature,
    tokens: TokenInputs,
}

impl Reranker {
    pub fn new(spec: &ModelSpec, limits: &Limits) -> Result<Self, String> {
        let t: Tables = tables(spec)?;
        let signature = spec.signature();
        if signature.outputs[0].dims != [1] {
            return Err(format!(
                "a reranker's output '{}' is one logit per pair: dims [1]",
                signature.outputs[0].name
            ));
        }
        Ok(Self {
            tokens: TokenInputs::new(spec, &text_table(spec, t.text)?, limits)?,
            signature,
        })
    }

    /// A (query, document) pair as an item.
    pub fn pair(&self, query: &str, document: &str) -> Result<Item, CodecError> {
        self.tokens.pair(query, document)
    }

    fn logit(result: &Inferred) -> f64 {
        result.outputs[0]
            .to_f64_vec()
            .first()
            .copied()
            .unwrap_or(0.0)
    }
}

impl PairScorer for Reranker {
    fn pair(&self, query: &str, document: &str) -> Result<Item, CodecError> {
        Reranker::pair(self, query, document)
    }

    fn relevance(&self, result: &Inferred) -> (f64, f64) {
        let logit = Self::logit(result);
        (sigmoid(logit), logit)
    }
}

impl ModelAdapter for Reranker {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        let shape = "a reranker instance is {\"query\": \"...\", \"document\": \"...\"} (or {\"text\", \"text_pair\"})";
        let Instance::Object(o) = instance else {
            return Err(invalid(format!("{shape}, got {}", instance.json_type())));
        };
        let side = |a: &str, b: &str| {
            o.get(a).or_else(|| o.get(b)).map(|v| {
                v.as_str()
                    .ok_or_else(|| invalid(format!("\"{a}\" is a string")))
            })
        };
        match (side("query", "text"), side("document", "text_pair")) {
            (Some(q), Some(d)) => self.pair(q?, d?),
            (None, _) => Err(invalid(format!("{shape}: the query is missing"))),
            (_, None) => Err(invalid(format!("{shape}: the document is missing"))),
        }
    }

    fn encode_prediction(&self, result: &Inferred, _opts: OutputOptions) -> Value {
        let logit = Self::logit(result);
        json!({"score": sigmoid(logit), "logit": logit, "tokens": result.tokens})
    }

    fn pad_values(&self) -> Vec<Option<f64>> {
        self.tokens.pad_values()
    }

    fn pair_scorer(&self) -> Option<&dyn PairScorer> {
        Some(self)
    }

    fn v2_inputs(&self) -> Vec<V2TensorMeta> {
        ["query", "document"]
            .into_iter()
            .map(|name| V2TensorMeta {
                name: name.into(),
                datatype: V2Type::Bytes,
                dims: vec![1],
            })
            .collect()
    }

    fn v2_outputs(&self) -> Vec<V2TensorMeta> {
        let mut outs: Vec<V2TensorMeta> = self
            .signature
            .outputs
            .iter()
            .map(V2TensorMeta::tensor)
            .collect();
        outs.push(V2TensorMeta {
            name: SCORE_OUTPUT.into(),
            datatype: V2Type::Tensor(DType::Fp32),
            dims: vec![1],
        });
        outs
    }

    fn decode_v2(&self, inputs: Vec<V2Input>) -> Result<(Vec<Item>, usize), CodecError> {
        let queries = v2_texts(&inputs[0])?;
        let documents = v2_texts(&inputs[1])?;
        if queries.len() != documents.len() {
            return Err(invalid(format!(
                "{} queries and {} documents: one query per document",
                queries.len(),
                documents.len()
            )));
        }
        let items = queries
            .iter()
            .zip(&documents)
            .map(|(q, d)| self.pair(q, d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, queries.len()))
    }

    fn encode_v2(&self, results: &[Inferred], wanted: &dyn Fn(&str) -> bool) -> Vec<V2Output> {
        let mut out = tensor_outputs(results, &self.signature.outputs, wanted, |_, t| t);
        if wanted(SCORE_OUTPUT) {
            let scores: Vec<f32> = results
                .iter()
                .map(|r| sigmoid(Self::logit(r)) as f32)
                .collect();
            let shape = vec![scores.len(), 1];
            out.push(V2Output {
                name: SCORE_OUTPUT.into(),
                data: V2Data::Tensor(HostTensor::from_f32(shape.clone(), &scores).expect("rows")),
                shape,
            });
        }
        out
    }
}
