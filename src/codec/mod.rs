//! Turning request payloads into model inputs and model outputs into answers, per model kind.
//!
//! A [`ModelCodec`] is built once per loaded model from its spec, around the adapter of the
//! model's kind ([`kinds`], one file per kind). It knows the model's signature and
//! pre-processing, nothing of HTTP or libtorch.
//!
//! The pieces the kinds share: [`image`] (encoded images or pixel arrays to a CHW tensor),
//! [`tokenizer`] (a `tokenizer.json` to token inputs), [`budget`] (the server's decode budget,
//! which both take a share of), [`instance`] (/v1 JSON instances), [`v1`] and [`v2`] (the
//! native and KServe wire formats).

pub mod budget;
pub mod image;
pub mod instance;
pub mod kinds;
pub mod tokenizer;
pub mod v1;
pub mod v2;

use serde_json::Value;

use crate::config::model_spec::{ModelSpec, TensorSpec};
use crate::tensor::{Inferred, Item};

pub use self::kinds::{Embedder, ModelAdapter, PairScorer};

pub use self::budget::DecodeBudget;
pub use self::image::{ImageCodec, ImageLimits};
pub use self::instance::{numeric_instances, Instance};
pub use self::tokenizer::TextCodec;

/// Why a payload cannot become a model input.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    /// The payload is well-formed but does not fit the model (wrong shape, empty, ...).
    #[error("{0}")]
    Invalid(String),
    /// The payload cannot be parsed at all (undecodable image, ...).
    #[error("{0}")]
    Malformed(String),
    /// The payload is larger than the server accepts (image dimensions, text length, ...).
    #[error("{0}")]
    TooLarge(String),
    /// The server is at a decoding limit (the decode budget); the client may retry.
    #[error("{0}")]
    Busy(String),
}

/// Per-request output options.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputOptions {
    /// Also return the k best labels, best first.
    pub top_k: Option<usize>,
    /// Every label's score even where a model has more than [`MANY_LABELS`] (whose answers
    /// otherwise carry the best [`DEFAULT_TOP_K`] only).
    pub all_scores: bool,
}

/// Above this many labels, a classifier answers its best [`DEFAULT_TOP_K`] by default.
pub const MANY_LABELS: usize = 10;
/// The labels such a classifier answers unless asked otherwise.
pub const DEFAULT_TOP_K: usize = 5;

/// Input decoding and output encoding for one model: its kind's [`ModelAdapter`], chosen once
/// at load, behind what every kind shares (v2 input and output names are checked here).
pub struct ModelCodec {
    adapter: Box<dyn ModelAdapter>,
}

impl std::fmt::Debug for ModelCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCodec")
            .field("kind", &self.adapter.kind())
            .finish()
    }
}

impl ModelCodec {
    /// Builds the codec of `spec`; fails when a component (e.g. its tokenizer) cannot be
    /// loaded. Texts longer than `max_text_bytes` are refused (0: no limit).
    pub fn new(
        spec: &ModelSpec,
        image_limits: ImageLimits,
        max_text_bytes: usize,
    ) -> Result<Self, String> {
        Ok(Self {
            adapter: kinds::adapter_for(spec, image_limits, max_text_bytes)?,
        })
    }

    /// The model's kind, as model.toml spells it.
    pub fn kind(&self) -> &'static str {
        self.adapter.kind()
    }

    /// One /v1 JSON instance as an item of one row.
    pub fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        self.adapter.decode_instance(instance)
    }

    /// Whether the model takes encoded payloads (PNG, JPEG, ...) as raw bodies.
    pub fn takes_encoded(&self) -> bool {
        self.adapter.takes_encoded()
    }

    /// One encoded payload (PNG, JPEG, ...) as an item of one row.
    pub fn decode_encoded(&self, bytes: &[u8]) -> Result<Item, CodecError> {
        self.adapter.decode_encoded(bytes)
    }

    /// One item's result as a /v1 prediction; an output that is not finite (NaN or infinity)
    /// is an error, since JSON cannot carry it and `null` would be a silently wrong answer.
    pub fn encode_prediction(
        &self,
        result: &Inferred,
        opts: OutputOptions,
    ) -> Result<Value, CodecError> {
        let outputs = &self.adapter.signature().outputs;
        for (k, t) in result.outputs.iter().enumerate() {
            if !t.all_finite() {
                let name = outputs.get(k).map_or("?", |o| o.name.as_str());
                return Err(CodecError::Invalid(format!(
                    "the model's output '{name}' is not finite (NaN or infinity)"
                )));
            }
        }
        Ok(self.adapter.encode_prediction(result, opts))
    }

    /// Per input, the value that pads it in a batch (see [`ModelAdapter::pad_values`]).
    pub fn pad_values(&self) -> Vec<Option<f64>> {
        self.adapter.pad_values()
    }

    /// Inputs of `rows` rows for warm-up; variable dimensions take `var_len`.
    pub fn warmup_item(&self, rows: usize, var_len: usize) -> Item {
        self.adapter.warmup_item(rows, var_len)
    }

    /// The model as an embedder, when it is a text-embedding model.
    pub fn embedder(&self) -> Option<&dyn Embedder> {
        self.adapter.embedder()
    }

    /// The model as a scorer of (query, document) pairs, when it is a reranker.
    pub fn pair_scorer(&self) -> Option<&dyn PairScorer> {
        self.adapter.pair_scorer()
    }

    fn adapter(&self) -> &dyn ModelAdapter {
        self.adapter.as_ref()
    }
}

/// Checks a decoded shape against a spec's dims (-1 matches any size).
pub fn check_dims(spec: &TensorSpec, shape: &[usize]) -> Result<(), CodecError> {
    let ok = shape.len() == spec.dims.len()
        && shape
            .iter()
            .zip(&spec.dims)
            .all(|(&s, &d)| d < 0 || s == d as usize);
    if ok {
        Ok(())
    } else {
        Err(CodecError::Invalid(format!(
            "input '{}' expects shape {:?} per instance, got {:?}",
            spec.name, spec.dims, shape
        )))
    }
}
