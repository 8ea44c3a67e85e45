//! A model's v2 tensors and the mapping of a v2 request onto them: the metadata of its inputs
//! and outputs, a request's inputs checked by name and handed to the model's adapter, and the
//! requested outputs encoded.

use serde_json::{json, Value};

use super::wire::{RequestedOutput, V2Input, V2Output, V2Type};
use crate::codec::{CodecError, ModelCodec};
use crate::config::model_spec::TensorSpec;
use crate::tensor::{Inferred, Item};

fn invalid(m: impl Into<String>) -> CodecError {
    CodecError::Invalid(m.into())
}

/// A tensor's v2 metadata: name, datatype, shape with a leading -1 batch dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct V2TensorMeta {
    pub name: String,
    pub datatype: V2Type,
    /// Dimensions after the batch dimension (-1 variable).
    pub dims: Vec<i64>,
}

impl V2TensorMeta {
    pub fn tensor(spec: &TensorSpec) -> Self {
        Self {
            name: spec.name.clone(),
            datatype: V2Type::Tensor(spec.datatype),
            dims: spec.dims.clone(),
        }
    }

    /// The shape metadata gives: the batch dimension (-1) and the dimensions after it.
    pub fn metadata_shape(&self) -> Vec<i64> {
        let mut shape = vec![-1i64];
        shape.extend(&self.dims);
        shape
    }

    pub fn metadata_json(&self) -> Value {
        json!({"name": self.name, "datatype": self.datatype.name(), "shape": self.metadata_shape()})
    }

    pub fn config_json(&self) -> Value {
        json!({"name": self.name, "data_type": self.datatype.config_name(), "dims": self.dims})
    }
}

impl ModelCodec {
    /// The model's v2 inputs (e.g. image classifiers also take BYTES, encoded images, under
    /// the same name; text models take BYTES strings).
    pub fn v2_inputs(&self) -> Vec<V2TensorMeta> {
        self.adapter().v2_inputs()
    }

    /// The model's v2 outputs: its tensors, plus e.g. the best label per row for classifiers.
    pub fn v2_outputs(&self) -> Vec<V2TensorMeta> {
        self.adapter().v2_outputs()
    }

    /// Turns a request's inputs into items: one item for tensor inputs (its rows share the
    /// batch dimension), one item per element for BYTES inputs (images, texts). Returns the
    /// items and the request's rows.
    pub fn decode_v2(&self, inputs: Vec<V2Input>) -> Result<(Vec<Item>, usize), CodecError> {
        let declared = self.v2_inputs();
        for i in &inputs {
            if !declared.iter().any(|d| d.name == i.name) {
                let names: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
                return Err(invalid(format!(
                    "unknown input '{}'; this model's inputs are {names:?}",
                    i.name
                )));
            }
        }
        for (k, i) in inputs.iter().enumerate() {
            if inputs[..k].iter().any(|o| o.name == i.name) {
                return Err(invalid(format!("input '{}' is given twice", i.name)));
            }
        }
        let mut by_name: Vec<V2Input> = Vec::with_capacity(declared.len());
        let mut inputs = inputs;
        for d in &declared {
            let pos = inputs
                .iter()
                .position(|i| i.name == d.name)
                .ok_or_else(|| invalid(format!("missing input '{}'", d.name)))?;
            by_name.push(inputs.swap_remove(pos));
        }
        self.adapter().decode_v2(by_name)
    }

    /// The requested outputs of all items, rows in request order.
    pub fn encode_v2(
        &self,
        results: &[Inferred],
        requested: Option<&[RequestedOutput]>,
    ) -> Result<Vec<V2Output>, CodecError> {
        let declared = self.v2_outputs();
        if let Some(req) = requested {
            for r in req {
                if !declared.iter().any(|d| d.name == r.name) {
                    let names: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
                    return Err(invalid(format!(
                        "unknown output '{}'; this model's outputs are {names:?}",
                        r.name
                    )));
                }
            }
        }
        let wanted = |name: &str| requested.is_none_or(|r| r.iter().any(|o| o.name == name));
        Ok(self.adapter().encode_v2(results, &wanted))
    }
}
