//! `text-embedding`: strings in, one vector each out. The model returns token states
//! `[N, T, H]` that the server pools over each text's own tokens (`mean`, mask-weighted, or
//! `cls`), or a vector `[N, H]` it already pooled (`none`); `normalize` L2-normalises it.
//! /v1 answers `{"embedding": [...], "tokens": n}`; v2 takes BYTES `text` and returns FP32
//! `embedding` `[N, H]`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::text_classifier::{decode_v2_texts, text_v2_input};
use super::tokens::{declare_token_inputs, text_table, TokenInputs};
use super::{tables, Declaration, Declared, Embedder, Kind, Limits, ModelAdapter};
use crate::codec::tokenizer::TextSpec;
use crate::codec::v2::{V2Data, V2Input, V2Output, V2TensorMeta, V2Type};
use crate::codec::{CodecError, Instance, OutputOptions};
use crate::config::model_spec::{ModelSpec, Signature};
use crate::tensor::{DType, HostTensor};
use crate::tensor::{Inferred, Item};

/// The v2 output of embedding models.
pub const EMBEDDING_OUTPUT: &str = "embedding";

pub const KIND: Kind = Kind {
    name: "text-embedding",
    declare,
    adapter: |spec, limits| Ok(Box::new(TextEmbedding::new(spec, limits)?)),
};

/// The model.toml tables of a text-embedding model.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    text: Option<TextSpec>,
    embedding: Option<EmbeddingSpec>,
}

/// How a `text-embedding` model's output becomes one vector per text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise the vector.
    #[serde(default)]
    pub normalize: bool,
}

/// Pooling over a model's token states `[N, T, H]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The model already returns one vector per text, `[N, H]`.
    #[default]
    None,
    /// The mean of the states of real (unpadded) tokens.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
}

/// Token inputs (default `input_ids` and `attention_mask`) and a declared output that fits
/// the pooling: token states `[-1, hidden]` to pool, or the model's own vector `[hidden]`.
fn declare(spec: &ModelSpec, d: Declared) -> Result<Declaration, String> {
    let t: Tables = tables(spec)?;
    let text = text_table(spec, t.text)?;
    let pooling = t.embedding.unwrap_or_default().pooling;
    let inputs = declare_token_inputs(spec, d.inputs, &["input_ids", "attention_mask"])?;
    let outputs = d.outputs.ok_or("a text-embedding model needs [[outputs]]: its token states [-1, hidden] (pooling mean or cls) or its vector [hidden] (pooling none)")?;
    let first = outputs.first().ok_or("a model needs at least one output")?;
    let states = pooling != Pooling::None;
    let dims_ok = match first.dims.as_slice() {
        [-1, h] => states && *h > 0,
        [h] => !states && *h > 0,
        _ => false,
    };
    if first.datatype != DType::Fp32 || !dims_ok {
        return Err(format!(
            "output '{}' is FP32 with dims {}: pooling '{}' {}",
            first.name,
            if states { "[-1, hidden]" } else { "[hidden]" },
            serde_json::to_value(pooling)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            if states {
                "pools the model's token states"
            } else {
                "takes the model's vector as it is"
            }
        ));
    }
    Ok(Declaration {
        signature: Signature::new(inputs, outputs),
        labels: Vec::new(),
        channels_last: false,
        max_text_length: Some(text.max_length),
    })
}

pub struct TextEmbedding {
    signature: Signature,
    tokens: TokenInputs,
    embedding: EmbeddingSpec,
    /// The vector's size: the last dimension of the model's first output.
    dimension: usize,
}

impl TextEmbedding {
    pub fn new(spec: &ModelSpec, limits: &Limits) -> Result<Self, String> {
        let t: Tables = tables(spec)?;
        let signature = spec.signature();
        let dimension = signature.outputs[0]
            .dims
            .last()
            .copied()
            .filter(|&d| d > 0)
            .ok_or("a text-embedding model's output has a fixed last dimension (its size)")?
            as usize;
        Ok(Self {
            tokens: TokenInputs::new(spec, &text_table(spec, t.text)?, limits)?,
            embedding: t.embedding.unwrap_or_default(),
            dimension,
            signature,
        })
    }

    /// One item's vector: its first output pooled over its own tokens, then normalised.
    pub fn vector(&self, result: &Inferred) -> Vec<f32> {
        let out = &result.outputs[0];
        let values = out.to_f32_vec();
        let h = self.dimension;
        let mut v: Vec<f64> = match self.embedding.pooling {
            Pooling::None => values[..h].iter().map(|&x| x as f64).collect(),
            Pooling::Cls => values[..h].iter().map(|&x| x as f64).collect(),
            Pooling::Mean => {
                // the item's states are its first `tokens` rows: padding follows them
                let states = out.shape.get(1).copied().unwrap_or(1);
                let n = result.tokens.clamp(1, states.max(1));
                let mut sum = vec![0f64; h];
                for row in values.chunks_exact(h).take(n) {
                    for (s, &x) in sum.iter_mut().zip(row) {
                        *s += x as f64;
                    }
                }
                sum.into_iter().map(|s| s / n as f64).collect()
            }
        };
        if self.embedding.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v.into_iter().map(|x| x as f32).collect()
    }
}

impl Embedder for TextEmbedding {
    fn text(&self, text: &str) -> Result<Item, CodecError> {
        self.tokens.text(text)
    }

    fn token_ids(&self, ids: &[i64]) -> Result<Item, CodecError> {
        self.tokens.ids(ids)
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn normalizes(&self) -> bool {
        self.embedding.normalize
    }

    fn vector(&self, result: &Inferred) -> Vec<f32> {
        TextEmbedding::vector(self, result)
    }
}

impl ModelAdapter for TextEmbedding {
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

    fn encode_prediction(&self, result: &Inferred, _opts: OutputOptions) -> Value {
        json!({"embedding": self.vector(result), "tokens": result.tokens})
    }

    fn pad_values(&self) -> Vec<Option<f64>> {
        self.tokens.pad_values()
    }

    fn v2_inputs(&self) -> Vec<V2TensorMeta> {
        text_v2_input()
    }

    fn v2_outputs(&self) -> Vec<V2TensorMeta> {
        vec![V2TensorMeta {
            name: EMBEDDING_OUTPUT.into(),
            datatype: V2Type::Tensor(DType::Fp32),
            dims: vec![self.dimension as i64],
        }]
    }

    fn decode_v2(&self, inputs: Vec<V2Input>) -> Result<(Vec<Item>, usize), CodecError> {
        decode_v2_texts(&self.tokens, inputs)
    }

    fn embedder(&self) -> Option<&dyn Embedder> {
        Some(self)
    }

    fn encode_v2(&self, results: &[Inferred], wanted: &dyn Fn(&str) -> bool) -> Vec<V2Output> {
        if !wanted(EMBEDDING_OUTPUT) {
            return Vec::new();
        }
        let values: Vec<f32> = results.iter().flat_map(|r| self.vector(r)).collect();
        let shape = vec![results.len(), self.dimension];
        let t = HostTensor::from_f32(shape.clone(), &values).expect("rows of the dimension");
        vec![V2Output {
            name: EMBEDDING_OUTPUT.into(),
            shape,
            data: V2Data::Tensor(t),
        }]
    }
}
