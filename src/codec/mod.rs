//! Turning request payloads into model inputs and model outputs into answers, per model kind.
//!
//! A [`ModelCodec`] is built once per loaded model from its spec (it owns the tokenizer). It
//! knows the model's signature and pre-processing, nothing of HTTP or libtorch.

pub mod image;
pub mod instance;
pub mod text;
pub mod v1;
pub mod v2;

use serde_json::{json, Map, Value};

use crate::batcher::Item;
use crate::config::model_spec::{ModelKind, ModelSpec, TensorSpec};
use crate::tensor::{DType, HostTensor};

pub use self::image::{ImageCodec, ImageLimits};
pub use self::instance::{numeric_instances, Instance};
pub use self::text::TextCodec;

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
}

/// Per-request output options.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputOptions {
    /// Also return the k best labels, best first.
    pub top_k: Option<usize>,
}

/// Input decoding and output encoding for one model.
pub struct ModelCodec {
    kind: ModelKind,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    labels: Vec<String>,
    softmax: bool,
    image: Option<ImageCodec>,
    text: Option<TextCodec>,
}

impl std::fmt::Debug for ModelCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCodec")
            .field("kind", &self.kind)
            .finish()
    }
}

impl ModelCodec {
    /// Builds the codec of `spec`; fails when its tokenizer cannot be loaded. Texts longer than
    /// `max_text_bytes` are refused (0: no limit).
    pub fn new(
        spec: &ModelSpec,
        image_limits: ImageLimits,
        max_text_bytes: usize,
    ) -> Result<Self, String> {
        let image = spec
            .image
            .as_ref()
            .map(|i| ImageCodec::new(i.clone(), image_limits));
        let text = match &spec.text {
            Some(t) if spec.kind == ModelKind::TextClassifier => {
                Some(TextCodec::load(t, max_text_bytes)?)
            }
            _ => None,
        };
        Ok(Self {
            kind: spec.kind,
            inputs: spec.inputs.clone(),
            outputs: spec.outputs.clone(),
            labels: spec.labels.clone(),
            softmax: spec.softmax,
            image,
            text,
        })
    }

    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    pub fn image(&self) -> Option<&ImageCodec> {
        self.image.as_ref()
    }

    pub fn text(&self) -> Option<&TextCodec> {
        self.text.as_ref()
    }

    pub fn is_classifier(&self) -> bool {
        matches!(
            self.kind,
            ModelKind::ImageClassifier | ModelKind::TextClassifier
        )
    }

    /// Whether classifier outputs get a softmax before they are reported.
    pub fn softmax_enabled(&self) -> bool {
        self.softmax
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// One /v1 JSON instance as an item of one row.
    pub fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        match self.kind {
            ModelKind::ImageClassifier => {
                let codec = self.image.as_ref().expect("image codec for image model");
                let pixels = match instance {
                    Instance::Object(o) if o.contains_key("b64") => {
                        let b64 = o["b64"].as_str().ok_or_else(|| {
                            CodecError::Invalid("\"b64\" must be a base64 string".into())
                        })?;
                        codec.decode_base64(b64)?
                    }
                    Instance::Array { values, shape } => codec.decode_pixels(values, shape)?,
                    other => {
                        return Err(CodecError::Invalid(format!(
                            "an image instance is {{\"b64\": \"<base64 PNG or JPEG>\"}} or an array of pixel values, got {}",
                            other.json_type()
                        )))
                    }
                };
                Ok(Item::new(vec![pixels]))
            }
            ModelKind::TextClassifier => {
                let Instance::Text(text) = instance else {
                    return Err(CodecError::Invalid(format!(
                        "a text-classifier instance is a string, got {}",
                        instance.json_type()
                    )));
                };
                let codec = self.text.as_ref().expect("text codec for text model");
                Ok(Item::new(vec![codec.encode(text)?]))
            }
            ModelKind::Regressor => {
                let spec = &self.inputs[0];
                let features = spec.dims[0] as usize;
                let values: &[f64] = match instance {
                    Instance::Number(v) => std::slice::from_ref(v),
                    Instance::Array { values, .. } => values,
                    other => {
                        return Err(CodecError::Invalid(format!(
                            "a regressor instance is a number or an array of {features} numbers, got {}",
                            other.json_type()
                        )))
                    }
                };
                if values.len() != features {
                    return Err(CodecError::Invalid(format!(
                        "a regressor instance has {features} feature(s), got {}",
                        values.len()
                    )));
                }
                let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
                Ok(Item::new(vec![HostTensor::from_f32(
                    vec![1, features],
                    &values,
                )
                .expect("shape checked")]))
            }
            ModelKind::Tensor => self.decode_tensor_instance(instance),
        }
    }

    /// A `tensor` model's instance: the single input's nested array, or an object naming each.
    fn decode_tensor_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        let per_input: Vec<(Vec<f64>, Vec<usize>)> = match (instance, self.inputs.len()) {
            (Instance::Object(map), _) => self
                .inputs
                .iter()
                .map(|s| {
                    let v = map.get(&s.name).ok_or_else(|| {
                        CodecError::Invalid(format!("instance lacks input '{}'", s.name))
                    })?;
                    instance::flatten_numbers(v, 64 << 20)
                })
                .collect::<Result<_, _>>()?,
            (Instance::Array { values, shape }, 1) => vec![(values.clone(), shape.clone())],
            (Instance::Number(v), 1) => vec![(vec![*v], vec![])],
            (_, 1) => {
                return Err(CodecError::Invalid(format!(
                    "an instance of this model is a (nested) array of numbers, got {}",
                    instance.json_type()
                )))
            }
            _ => {
                return Err(CodecError::Invalid(format!(
                    "this model has {} inputs: give each instance as an object keyed by input name",
                    self.inputs.len()
                )))
            }
        };
        let tensors = self
            .inputs
            .iter()
            .zip(per_input)
            .map(|(spec, (values, shape))| {
                check_dims(spec, &shape)?;
                let mut full = vec![1];
                full.extend(shape);
                instance::tensor_from_f64(spec.datatype, full, &values)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Item::new(tensors))
    }

    /// Encoded image bytes (PNG, JPEG) as an item of one row.
    pub fn decode_image_bytes(&self, bytes: &[u8]) -> Result<Item, CodecError> {
        let codec = self.image.as_ref().ok_or_else(|| {
            CodecError::Invalid(format!("a {} model does not take images", self.kind))
        })?;
        Ok(Item::new(vec![codec.decode(bytes)?]))
    }

    /// One row of outputs as a /v1 prediction.
    pub fn encode_prediction(&self, outputs: &[HostTensor], opts: OutputOptions) -> Value {
        match self.kind {
            ModelKind::ImageClassifier | ModelKind::TextClassifier => {
                let scores = self.scores(&outputs[0]);
                classification(&self.labels, &scores, opts.top_k)
            }
            ModelKind::Regressor => {
                let values = outputs[0].to_f64_vec();
                match values.as_slice() {
                    [single] => json!(single),
                    _ => json!(values),
                }
            }
            ModelKind::Tensor => {
                let mut map = Map::new();
                for (spec, t) in self.outputs.iter().zip(outputs) {
                    map.insert(spec.name.clone(), nested(&t.to_f64_vec(), &t.shape[1..]));
                }
                Value::Object(map)
            }
        }
    }

    /// A classifier's per-label probabilities for one row (softmax applied when configured).
    pub fn scores(&self, output: &HostTensor) -> Vec<f64> {
        let raw = output.to_f64_vec();
        if self.softmax {
            softmax(&raw)
        } else {
            raw
        }
    }

    /// Zero-filled inputs of `rows` rows for warm-up; variable dimensions take `var_len`.
    pub fn warmup_item(&self, rows: usize, var_len: usize) -> Item {
        Item::new(
            self.inputs
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
                        // integer inputs are usually token ids; 0 is often padding
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

fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn classification(labels: &[String], scores: &[f64], top_k: Option<usize>) -> Value {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let name = |i: usize| labels.get(i).cloned().unwrap_or_else(|| i.to_string());
    let best = order.first().copied().unwrap_or(0);
    let mut map = Map::new();
    map.insert("label".into(), json!(name(best)));
    map.insert(
        "score".into(),
        json!(scores.get(best).copied().unwrap_or(0.0)),
    );
    let all: Map<String, Value> = (0..scores.len())
        .map(|i| (name(i), json!(scores[i])))
        .collect();
    map.insert("scores".into(), Value::Object(all));
    if let Some(k) = top_k {
        let top: Vec<Value> = order
            .iter()
            .take(k)
            .map(|&i| json!({"label": name(i), "score": scores[i]}))
            .collect();
        map.insert("top_k".into(), Value::Array(top));
    }
    Value::Object(map)
}

/// Row-major values as nested JSON arrays of `shape`.
pub fn nested(values: &[f64], shape: &[usize]) -> Value {
    match shape {
        [] => values.first().map_or(Value::Null, |v| json!(v)),
        [_] => json!(values),
        [n, rest @ ..] => {
            let step: usize = rest.iter().product();
            Value::Array(
                (0..*n)
                    .map(|i| nested(&values[i * step..(i + 1) * step], rest))
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_reports_the_best_label_and_every_score() {
        let labels = vec!["a".to_string(), "b".into(), "c".into()];
        let v = classification(&labels, &[0.2, 0.7, 0.1], Some(2));
        assert_eq!(v["label"], "b");
        assert_eq!(v["scores"]["c"], 0.1);
        assert_eq!(v["top_k"][1]["label"], "a");
        assert_eq!(v["top_k"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[2] > p[1]);
    }

    #[test]
    fn nested_rebuilds_shapes() {
        assert_eq!(
            nested(&[1., 2., 3., 4.], &[2, 2]),
            json!([[1., 2.], [3., 4.]])
        );
    }
}
