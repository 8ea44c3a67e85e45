//! A model's signature: its input and output tensors.

use serde::{Deserialize, Serialize};

use crate::tensor::DType;

/// One input or output tensor of the model's signature, without the batch dimension.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DType,
    /// Dimensions after the batch dimension; -1 marks a variable one.
    pub dims: Vec<i64>,
    /// Value used to pad variable dimensions when requests of different sizes share a batch.
    /// Without it, only requests of equal shape are batched together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_value: Option<f64>,
}

impl TensorSpec {
    /// A tensor of the given name, type and dims, without padding.
    pub fn new(name: &str, datatype: DType, dims: Vec<i64>) -> Self {
        Self {
            name: name.into(),
            datatype,
            dims,
            pad_value: None,
        }
    }
}

/// A model's input and output tensors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl Signature {
    pub fn new(inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> Self {
        Self { inputs, outputs }
    }
}
