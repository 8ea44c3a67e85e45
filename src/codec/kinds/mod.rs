//! One adapter per model kind: everything that depends on what a model is.
//!
//! Each kind's file declares a [`Kind`]: its name in model.toml, the kind step (it reads the
//! kind's own model.toml tables, checks them and decides the model's signature, labels, token
//! batching and memory format: [`complete`]) and its [`ModelAdapter`], chosen once when a model
//! loads ([`adapter_for`]). The adapter turns /v1 instances, encoded payloads (a raw image
//! body, a v2 BYTES element) and v2 tensors into batcher [`Item`]s, says what the model's v2
//! inputs and outputs are, and turns output rows into answers. The HTTP layer, the v2 codec and
//! config never ask which kind a model is. Adding a kind is its file here plus one line in
//! [`KINDS`].

mod classifier;
mod image_classifier;
mod regressor;
mod reranker;
mod tensor;
mod text_classifier;
mod text_embedding;
pub mod text_generation;
mod tokens;

use serde_json::Value;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::v2::{V2Data, V2Input, V2Output, V2TensorMeta, V2Type};
use super::{check_dims, CodecError, ImageLimits, Instance, OutputOptions};
use crate::config::model_spec::{ModelSpec, Signature, TensorSpec, TokenBatching};
use crate::tensor::{DType, HostTensor, Inferred, Item};

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

/// A model kind.
pub struct Kind {
    /// Its name in model.toml (`kind = "..."`).
    pub name: &'static str,
    /// The kind step: reads the kind's own tables of the spec (and the tensors model.toml
    /// declares), checks them and decides what the kind decides.
    declare: fn(&ModelSpec, Declared) -> Result<Declaration, String>,
    /// The adapter of a model of this kind (its spec completed by the kind step); fails when a
    /// component (e.g. its tokenizer) cannot be loaded.
    adapter: BuildAdapter,
}

/// Builds a kind's adapter from a completed spec and the payload limits.
type BuildAdapter = fn(&ModelSpec, &Limits) -> Result<Box<dyn ModelAdapter>, String>;

/// Every kind the server serves, in the order the docs list them. A new kind is its file plus
/// one line here.
pub const KINDS: &[&Kind] = &[
    &image_classifier::KIND,
    &text_classifier::KIND,
    &text_embedding::KIND,
    &text_generation::KIND,
    &reranker::KIND,
    &regressor::KIND,
    &tensor::KIND,
];

/// The kind model.toml names `name`.
pub fn kind(name: &str) -> Result<&'static Kind, String> {
    KINDS
        .iter()
        .copied()
        .find(|k| k.name == name)
        .ok_or_else(|| {
            let names: Vec<String> = KINDS.iter().map(|k| format!("`{}`", k.name)).collect();
            format!(
                "kind: unknown variant `{name}`, expected one of {}",
                names.join(", ")
            )
        })
}

/// The tensors model.toml declares (`[[inputs]]`, `[[outputs]]`), if any: every kind may
/// declare them; each decides what it makes of them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Declared {
    #[serde(default)]
    pub inputs: Option<Vec<TensorSpec>>,
    #[serde(default)]
    pub outputs: Option<Vec<TensorSpec>>,
}

/// The tables of a kind that reads none of its own (only the declared tensors).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoTables {}

/// The declaration of a kind that reads no tables of its own: its signature alone.
fn tensors_only(
    spec: &ModelSpec,
    signature: Result<Signature, String>,
) -> Result<Declaration, String> {
    tables::<NoTables>(spec)?;
    Ok(Declaration {
        signature: signature?,
        ..Declaration::default()
    })
}

/// What a kind decides about a model.
#[derive(Debug, Clone, Default)]
pub struct Declaration {
    pub signature: Signature,
    /// The labels its outputs score (classifiers).
    pub labels: Vec<String>,
    /// Whether 4-D inputs go channels-last unless model.toml says.
    pub channels_last: bool,
    /// Text kinds: the longest text in tokens (the model gets token batching).
    pub max_text_length: Option<usize>,
}

/// The kind step: completes a spec that config parsed with what its kind decides (signature,
/// labels, token batching, memory format), after checking the kind's tables and the checks
/// every signature must pass.
pub fn complete(spec: &mut ModelSpec) -> Result<(), String> {
    let kind = kind(&spec.kind)?;
    let declared: Declared = Declared::deserialize(toml::Value::Table(split_tables(spec).0))
        .map_err(|e| e.to_string())?;
    let d = (kind.declare)(spec, declared)?;
    check_signature(&d.signature)?;
    spec.token_batching = match d.max_text_length {
        Some(max_length) => Some(TokenBatching::resolve(&spec.batching, max_length)?),
        None if spec.batching.max_batch_tokens.is_some()
            || spec.batching.sequence_buckets.is_some()
            || spec.batching.group_by_length.is_some() =>
        {
            return Err("batching.max_batch_tokens, sequence_buckets and group_by_length apply to text models (with a [text] table)".into())
        }
        None => None,
    };
    spec.inputs = d.signature.inputs;
    spec.outputs = d.signature.outputs;
    spec.labels = d.labels;
    spec.channels_last.get_or_insert(d.channels_last);
    Ok(())
}

/// The checks every kind's signature passes.
fn check_signature(s: &Signature) -> Result<(), String> {
    if s.inputs.is_empty() || s.outputs.is_empty() {
        return Err("a model needs at least one input and one output".into());
    }
    for t in s.inputs.iter().chain(&s.outputs) {
        if t.dims.iter().any(|&d| d == 0 || d < -1) {
            return Err(format!(
                "tensor '{}': dims must be positive or -1 (variable), got {:?}",
                t.name, t.dims
            ));
        }
    }
    for (i, t) in s.inputs.iter().enumerate() {
        if s.inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(format!("input name '{}' appears twice", t.name));
        }
    }
    Ok(())
}

/// The kind's own tables of `spec` (all but the declared tensors) as the kind's `T`, which
/// refuses tables the kind does not read.
fn tables<T: DeserializeOwned>(spec: &ModelSpec) -> Result<T, String> {
    T::deserialize(toml::Value::Table(split_tables(spec).1)).map_err(|e| e.to_string())
}

/// The spec's tables parted into the declared tensors (`inputs`, `outputs`) and the kind's own.
fn split_tables(spec: &ModelSpec) -> (toml::Table, toml::Table) {
    spec.tables
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .partition(|(k, _)| matches!(k.as_str(), "inputs" | "outputs"))
}

/// The limits adapters enforce on payloads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub image: ImageLimits,
    /// Longest text in bytes (0: no limit).
    pub max_text_bytes: usize,
}

/// The adapter of `spec`'s kind (`spec` completed by [`complete`]); fails when a component
/// cannot load (e.g. its tokenizer). Images larger than `image_limits` and texts over
/// `max_text_bytes` (0: no limit) are refused.
pub fn adapter_for(
    spec: &ModelSpec,
    image_limits: ImageLimits,
    max_text_bytes: usize,
) -> Result<Box<dyn ModelAdapter>, String> {
    let limits = Limits {
        image: image_limits,
        max_text_bytes,
    };
    (kind(&spec.kind)?.adapter)(spec, &limits)
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
