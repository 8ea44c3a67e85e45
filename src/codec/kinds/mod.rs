//! One adapter per model kind: everything that depends on what a model is.
//!
//! Each kind's file has a [`Registration`]: how its model.toml becomes the model's tensors
//! (declared ones checked, or the kind's defaults: config's parser asks it) and its
//! [`ModelAdapter`], chosen once when a model loads ([`adapter_for`]). The adapter turns /v1
//! instances, encoded payloads (a raw image body, a v2 BYTES element) and v2 tensors into
//! batcher [`Item`]s, says what the model's v2 inputs and outputs are, and turns output rows into
//! answers. The HTTP layer, the v2 codec and the model.toml parser never ask which kind a model
//! is; a new kind is a new file here, a name in [`ModelKind`] and one line in [`registration`].

mod classifier;
mod embedding;
mod image;
mod regressor;
mod reranker;
mod tensor;
mod text;
mod tokens;

use serde_json::Value;

use super::v2::{V2Data, V2Input, V2Output, V2TensorMeta, V2Type};
use super::{check_dims, CodecError, ImageLimits, Instance, OutputOptions};
use crate::batcher::{Inferred, Item};
use crate::config::model_spec::{Declared, ModelKind, ModelSpec, TensorSpec};
use crate::tensor::{DType, HostTensor};

/// What a model of one kind takes and answers. Implementations are plain data and code: no
/// HTTP, no libtorch.
pub trait ModelAdapter: Send + Sync {
    /// The kind, as model.toml spells it (`image-classifier`, ...).
    fn kind(&self) -> &'static str;

    /// The model's tensors as declared (model.toml, or derived from the kind).
    fn signature(&self) -> &Signature;

    /// One /v1 JSON instance as an item of one row.
    fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError>;

    /// Whether the model takes encoded payloads (a raw /v1 body, v2 BYTES elements, a raw v2
    /// body), e.g. PNG or JPEG bytes.
    fn takes_encoded(&self) -> bool {
        false
    }

    /// One encoded payload as an item of one row.
    fn decode_encoded(&self, _bytes: &[u8]) -> Result<Item, CodecError> {
        Err(CodecError::Invalid(format!(
            "a {} model does not take encoded payloads such as images",
            self.kind()
        )))
    }

    /// One item's result as a /v1 prediction.
    fn encode_prediction(&self, result: &Inferred, opts: OutputOptions) -> Value;

    /// Per input: the value that pads its variable dimensions when items of different sizes
    /// share a batch (`None`: only items of equal shape do).
    fn pad_values(&self) -> Vec<Option<f64>> {
        self.signature()
            .inputs
            .iter()
            .map(|i| i.pad_value)
            .collect()
    }

    /// The model's v2 inputs: its tensors, one to one, unless the kind says otherwise.
    fn v2_inputs(&self) -> Vec<V2TensorMeta> {
        self.signature()
            .inputs
            .iter()
            .map(V2TensorMeta::tensor)
            .collect()
    }

    /// The model's v2 outputs: its tensors, one to one, unless the kind adds some.
    fn v2_outputs(&self) -> Vec<V2TensorMeta> {
        self.signature()
            .outputs
            .iter()
            .map(V2TensorMeta::tensor)
            .collect()
    }

    /// A v2 request's inputs, one per declared v2 input and in that order, as items and the
    /// request's row count.
    fn decode_v2(&self, inputs: Vec<V2Input>) -> Result<(Vec<Item>, usize), CodecError> {
        tensor_item(inputs, &self.signature().inputs)
    }

    /// The model's outputs of every item, rows in request order, as v2 outputs; `wanted` says
    /// which the client asked for (by v2 output name).
    fn encode_v2(&self, results: &[Inferred], wanted: &dyn Fn(&str) -> bool) -> Vec<V2Output> {
        tensor_outputs(results, &self.signature().outputs, wanted, |_, t| t)
    }

    /// Inputs of `rows` rows for warm-up; variable dimensions take `var_len`.
    fn warmup_item(&self, rows: usize, var_len: usize) -> Item {
        zeros_item(&self.signature().inputs, rows, var_len)
    }

    /// The model as an embedder (text-embedding models), for APIs such as OpenAI's
    /// embeddings.
    fn embedder(&self) -> Option<&dyn Embedder> {
        None
    }

    /// The model as a scorer of (query, document) pairs (rerankers), for rerank APIs.
    fn pair_scorer(&self) -> Option<&dyn PairScorer> {
        None
    }
}

/// Texts, or token ids, in; one vector each out.
pub trait Embedder: Send + Sync {
    /// One text as an item of one row.
    fn text(&self, text: &str) -> Result<Item, CodecError>;
    /// Token ids the client tokenised itself as an item of one row.
    fn token_ids(&self, ids: &[i64]) -> Result<Item, CodecError>;
    /// The size of the vectors.
    fn dimension(&self) -> usize;
    /// Whether the vectors are L2-normalised.
    fn normalizes(&self) -> bool;
    /// One item's vector.
    fn vector(&self, result: &Inferred) -> Vec<f32>;
}

/// (query, document) pairs in; a relevance score each out.
pub trait PairScorer: Send + Sync {
    /// A pair as an item of one row.
    fn pair(&self, query: &str, document: &str) -> Result<Item, CodecError>;
    /// One pair's relevance in 0..1 (the sigmoid of the model's logit), and the logit.
    fn relevance(&self, result: &Inferred) -> (f64, f64);
}

/// A model's declared input and output tensors.
#[derive(Debug, Clone)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl Signature {
    pub fn new(inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> Self {
        Self { inputs, outputs }
    }

    fn of(spec: &ModelSpec) -> Self {
        Self {
            inputs: spec.inputs.clone(),
            outputs: spec.outputs.clone(),
        }
    }
}

/// Builds a kind's adapter from the model's spec, signature and the payload limits.
type BuildAdapter = fn(&ModelSpec, Signature, &Limits) -> Result<Box<dyn ModelAdapter>, String>;

/// What the server knows of one kind: how model.toml becomes its tensors, and its adapter.
pub struct Registration {
    /// The model's inputs and outputs from model.toml: those declared, checked, or the kind's
    /// defaults; an error says what model.toml lacks or gets wrong.
    pub declare: fn(&Declared) -> Result<Signature, String>,
    /// The adapter of a model of this kind; fails when a component (e.g. its tokenizer) cannot
    /// be loaded.
    adapter: BuildAdapter,
    /// Answers labels and scores (labels may come from a Hugging Face config.json).
    pub classifier: bool,
    /// Takes images (4-D inputs go channels-last by default).
    pub images: bool,
    /// Reads model.toml's `[embedding]` table.
    pub takes_embedding: bool,
}

/// The registration of `kind`: the one place that maps a kind to its file.
pub fn registration(kind: ModelKind) -> Registration {
    match kind {
        ModelKind::ImageClassifier => image::REGISTRATION,
        ModelKind::TextClassifier => text::REGISTRATION,
        ModelKind::TextEmbedding => embedding::REGISTRATION,
        ModelKind::Reranker => reranker::REGISTRATION,
        ModelKind::Regressor => regressor::REGISTRATION,
        ModelKind::Tensor => tensor::REGISTRATION,
    }
}

/// The limits adapters enforce on payloads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub image: ImageLimits,
    /// Longest text in bytes (0: no limit).
    pub max_text_bytes: usize,
}

/// The adapter of `spec`'s kind; fails when a component cannot load (e.g. its tokenizer).
/// Images larger than `image_limits` and texts over `max_text_bytes` (0: no limit) are refused.
pub fn adapter_for(
    spec: &ModelSpec,
    image_limits: ImageLimits,
    max_text_bytes: usize,
) -> Result<Box<dyn ModelAdapter>, String> {
    let limits = Limits {
        image: image_limits,
        max_text_bytes,
    };
    (registration(spec.kind).adapter)(spec, Signature::of(spec), &limits)
}

fn invalid(m: impl Into<String>) -> CodecError {
    CodecError::Invalid(m.into())
}

/// v2 tensor inputs, in the model's input order, as one item (its rows share the batch
/// dimension).
fn tensor_item(
    inputs: Vec<V2Input>,
    specs: &[TensorSpec],
) -> Result<(Vec<Item>, usize), CodecError> {
    let mut rows = None;
    let mut tensors = Vec::with_capacity(inputs.len());
    for (input, spec) in inputs.into_iter().zip(specs) {
        let datatype = input.datatype();
        if datatype != V2Type::Tensor(spec.datatype) {
            return Err(invalid(format!(
                "input '{}' is {}, the model takes {}",
                input.name,
                datatype.name(),
                spec.datatype
            )));
        }
        let Some((&n, per_row)) = input.shape.split_first() else {
            return Err(invalid(format!(
                "input '{}' needs a batch dimension: shape [-1] + {:?}",
                input.name, spec.dims
            )));
        };
        check_dims(spec, per_row).map_err(|_| {
            invalid(format!(
                "input '{}' has shape {:?}; the model takes [-1] + {:?}",
                input.name, input.shape, spec.dims
            ))
        })?;
        if *rows.get_or_insert(n) != n {
            return Err(invalid("inputs disagree on the batch dimension"));
        }
        if let V2Data::Tensor(t) = input.data {
            tensors.push(t);
        }
    }
    let rows = rows.unwrap_or(0);
    if rows == 0 {
        return Err(invalid("the batch is empty"));
    }
    Ok((vec![Item::new(tensors)], rows))
}

/// The elements of a BYTES input shaped `[n]` or `[n, 1]`.
fn bytes_rows<'a>(input: &'a V2Input, what: &str) -> Result<&'a [Vec<u8>], CodecError> {
    let V2Data::Bytes(elements) = &input.data else {
        return Err(invalid(format!(
            "input '{}' takes BYTES ({what})",
            input.name
        )));
    };
    match input.shape.as_slice() {
        [n] | [n, 1] if *n > 0 => Ok(elements),
        _ => Err(invalid(format!(
            "input '{}' has shape {:?}; it takes [n] or [n, 1] {what}",
            input.name, input.shape
        ))),
    }
}

/// Each wanted output tensor, the items' rows concatenated in request order and passed
/// through `finish` (given the output's index), e.g. to turn logits into probabilities.
fn tensor_outputs(
    results: &[Inferred],
    specs: &[TensorSpec],
    wanted: &dyn Fn(&str) -> bool,
    finish: impl Fn(usize, HostTensor) -> HostTensor,
) -> Vec<V2Output> {
    specs
        .iter()
        .enumerate()
        .filter(|(_, spec)| wanted(&spec.name))
        .map(|(k, spec)| {
            let parts: Vec<&HostTensor> = results.iter().map(|r| &r.outputs[k]).collect();
            let t = finish(k, concat_rows(&parts));
            V2Output {
                name: spec.name.clone(),
                shape: t.shape.clone(),
                data: V2Data::Tensor(t),
            }
        })
        .collect()
}

/// Rows of several tensors of equal trailing shape, one after the other.
fn concat_rows(parts: &[&HostTensor]) -> HostTensor {
    let first = parts[0];
    if parts.len() == 1 {
        return first.clone();
    }
    let mut shape = first.shape.clone();
    shape[0] = parts.iter().map(|t| t.rows()).sum();
    let mut data = Vec::with_capacity(parts.iter().map(|t| t.data.len()).sum());
    for p in parts {
        data.extend_from_slice(&p.data);
    }
    HostTensor {
        dtype: first.dtype,
        shape,
        data,
    }
}

/// Inputs of `rows` rows for warm-up: zeros for floats and booleans, ones for integers
/// (usually token ids, where 0 is often padding). Variable dimensions take `var_len`.
fn zeros_item(specs: &[TensorSpec], rows: usize, var_len: usize) -> Item {
    Item::new(
        specs
            .iter()
            .map(|s| {
                let mut shape = vec![rows];
                shape.extend(
                    s.dims
                        .iter()
                        .map(|&d| if d < 0 { var_len } else { d as usize }),
                );
                let mut t = HostTensor::zeros(s.datatype, shape);
                if !s.datatype.is_float() && s.datatype != DType::Bool {
                    let one = crate::tensor::scalar_bytes(s.datatype, 1.0);
                    for chunk in t.data.chunks_exact_mut(one.len()) {
                        chunk.copy_from_slice(&one);
                    }
                }
                t
            })
            .collect(),
    )
}
