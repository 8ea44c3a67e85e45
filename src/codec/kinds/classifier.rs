//! What image and text classifiers share: per-label scores (a softmax when configured), the
//! /v1 prediction (`label`, `score`, `scores`, `top_k`) and the v2 `labels` output.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{tensor_outputs, Signature};
use crate::codec::v2::{V2Data, V2Output, V2TensorMeta, V2Type};
use crate::codec::{OutputOptions, DEFAULT_TOP_K, MANY_LABELS};
use crate::config::model_spec::{ModelSpec, TensorSpec};
use crate::tensor::Inferred;
use crate::tensor::{DType, HostTensor};

/// The v2 output that holds each row's best label.
pub const LABELS_OUTPUT: &str = "labels";

/// A classifier's default output: `scores` FP32 `[labels]`.
pub fn scores_output(labels: usize) -> TensorSpec {
    TensorSpec::new("scores", DType::Fp32, vec![labels as i64])
}

/// How classifier outputs are reported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// A file with one label per line, beside model.toml (instead of `labels`).
    #[serde(default)]
    pub labels_file: Option<PathBuf>,
    /// Apply softmax to the model's output (set when the model returns logits).
    #[serde(default)]
    pub softmax: bool,
    /// Independent labels: a sigmoid per label instead of a softmax over them.
    #[serde(default)]
    pub multi_label: bool,
}

impl OutputSpec {
    /// The labels: `labels`, those of `labels_file`, or `id2label` of a Hugging Face
    /// `config.json` beside the model file (none when there is none).
    pub fn labels(&self, spec: &ModelSpec) -> Result<Vec<String>, String> {
        match (&self.labels, &self.labels_file) {
            (Some(_), Some(_)) => {
                Err("set either output.labels or output.labels_file, not both".into())
            }
            (Some(l), None) => Ok(l.clone()),
            (None, Some(f)) => {
                let path = spec.resolve(f);
                Ok(std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read labels file {}: {e}", path.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect())
            }
            (None, None) => id2label(&spec.file),
        }
    }
}

/// Labels from `id2label` in a Hugging Face `config.json` beside the model file, when there is
/// one; none otherwise.
fn id2label(model_file: &Path) -> Result<Vec<String>, String> {
    let path: PathBuf = model_file
        .parent()
        .unwrap_or(Path::new("."))
        .join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(map) = config.get("id2label").and_then(|m| m.as_object()) else {
        return Ok(Vec::new());
    };
    let mut labels = vec![None; map.len()];
    for (id, label) in map {
        let i: usize = id
            .parse()
            .ok()
            .filter(|&i| i < labels.len())
            .ok_or_else(|| {
                format!(
                    "{}: id2label has id '{id}'; ids are 0..{}",
                    path.display(),
                    labels.len()
                )
            })?;
        labels[i] = Some(label.as_str().unwrap_or_default().to_string());
    }
    labels
        .into_iter()
        .enumerate()
        .map(|(i, l)| l.ok_or_else(|| format!("{}: id2label lacks id {i}", path.display())))
        .collect()
}

/// A classifier's labels and what turns its first output into scores.
#[derive(Debug, Clone)]
pub struct Classifier {
    labels: Vec<String>,
    activation: Activation,
}

/// What turns a classifier's output row into per-label scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// The model already returns scores.
    None,
    /// One probability distribution over the labels.
    Softmax,
    /// Independent labels (`multi_label`): a sigmoid each.
    Sigmoid,
}

impl Classifier {
    pub fn new(spec: &ModelSpec, output: &OutputSpec) -> Self {
        let activation = if output.multi_label {
            Activation::Sigmoid
        } else if output.softmax {
            Activation::Softmax
        } else {
            Activation::None
        };
        Self {
            labels: spec.labels.clone(),
            activation,
        }
    }

    /// Per-label scores of one row (the configured activation applied).
    pub fn scores(&self, output: &HostTensor) -> Vec<f64> {
        let raw = output.to_f64_vec();
        match self.activation {
            Activation::None => raw,
            Activation::Softmax => softmax(&raw),
            Activation::Sigmoid => raw.into_iter().map(sigmoid).collect(),
        }
    }

    fn label(&self, index: usize) -> String {
        self.labels
            .get(index)
            .cloned()
            .unwrap_or_else(|| index.to_string())
    }

    /// One row of outputs as a /v1 prediction.
    pub fn prediction(&self, outputs: &[HostTensor], opts: OutputOptions) -> Value {
        let scores = self.scores(&outputs[0]);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let best = order.first().copied().unwrap_or(0);
        let mut map = Map::new();
        map.insert("label".into(), json!(self.label(best)));
        map.insert(
            "score".into(),
            json!(scores.get(best).copied().unwrap_or(0.0)),
        );
        // a 1000-class model answers its best five, not 1000 scores, unless asked
        let many = scores.len() > MANY_LABELS;
        if !many || opts.all_scores {
            let all: Map<String, Value> = (0..scores.len())
                .map(|i| (self.label(i), json!(scores[i])))
                .collect();
            map.insert("scores".into(), Value::Object(all));
        }
        let top_k = opts.top_k.or(many.then_some(DEFAULT_TOP_K));
        if let Some(k) = top_k {
            let top: Vec<Value> = order
                .iter()
                .take(k)
                .map(|&i| json!({"label": self.label(i), "score": scores[i]}))
                .collect();
            map.insert("top_k".into(), Value::Array(top));
        }
        Value::Object(map)
    }

    /// The model's output tensors, then the best label per row.
    pub fn v2_outputs(&self, signature: &Signature) -> Vec<V2TensorMeta> {
        let mut outs: Vec<V2TensorMeta> =
            signature.outputs.iter().map(V2TensorMeta::tensor).collect();
        outs.push(V2TensorMeta {
            name: LABELS_OUTPUT.into(),
            datatype: V2Type::Bytes,
            dims: vec![1],
        });
        outs
    }

    /// The wanted outputs: the scores (after the activation), then the labels.
    pub fn encode_v2(
        &self,
        results: &[Inferred],
        signature: &Signature,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<V2Output> {
        let mut out = tensor_outputs(results, &signature.outputs, wanted, |k, t| {
            if k != 0 || self.activation == Activation::None {
                return t;
            }
            let mut probs = Vec::with_capacity(t.numel());
            for r in 0..t.rows() {
                probs.extend(
                    self.scores(&t.slice_rows(r, 1))
                        .into_iter()
                        .map(|v| v as f32),
                );
            }
            HostTensor::from_f32(t.shape.clone(), &probs).expect("same shape")
        });
        if wanted(LABELS_OUTPUT) {
            let mut labels = Vec::new();
            for r in results {
                let scores = &r.outputs[0];
                for row in 0..scores.rows() {
                    let s = self.scores(&scores.slice_rows(row, 1));
                    let best = (0..s.len())
                        .max_by(|&a, &b| s[a].total_cmp(&s[b]))
                        .unwrap_or(0);
                    labels.push(self.label(best).into_bytes());
                }
            }
            out.push(V2Output {
                name: LABELS_OUTPUT.into(),
                shape: vec![labels.len(), 1],
                data: V2Data::Bytes(labels),
            });
        }
        out
    }
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prediction_reports_the_best_label_and_every_score() {
        let c = Classifier {
            labels: vec!["a".to_string(), "b".into(), "c".into()],
            activation: Activation::None,
        };
        let row = HostTensor::from_f32(vec![1, 3], &[0.2, 0.7, 0.1]).unwrap();
        let v = c.prediction(
            &[row],
            OutputOptions {
                top_k: Some(2),
                all_scores: false,
            },
        );
        assert_eq!(v["label"], "b");
        assert!((v["scores"]["c"].as_f64().unwrap() - 0.1).abs() < 1e-6);
        assert_eq!(v["top_k"][1]["label"], "a");
        assert_eq!(v["top_k"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn many_labels_answer_the_best_five_unless_all_are_asked_for() {
        let c = Classifier {
            labels: (0..20).map(|i| format!("l{i}")).collect(),
            activation: Activation::None,
        };
        let values: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let row = HostTensor::from_f32(vec![1, 20], &values).unwrap();
        let v = c.prediction(std::slice::from_ref(&row), OutputOptions::default());
        assert_eq!(v["label"], "l19");
        assert!(v.get("scores").is_none());
        let top: Vec<&str> = v["top_k"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["label"].as_str().unwrap())
            .collect();
        assert_eq!(top, ["l19", "l18", "l17", "l16", "l15"]);
        let all = c.prediction(
            &[row],
            OutputOptions {
                top_k: Some(2),
                all_scores: true,
            },
        );
        assert_eq!(all["scores"].as_object().unwrap().len(), 20);
        assert_eq!(all["top_k"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[2] > p[1]);
    }
}
