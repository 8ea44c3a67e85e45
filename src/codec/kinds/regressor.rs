//! `regressor`: an instance is a number or an array of one number per feature (FP32
//! `[1, features]`); answers the output value (a number, or an array for several outputs).

use serde_json::{json, Value};

use super::{tensors_only, Declared, Kind, ModelAdapter};
use crate::codec::instance::tensor_from_f64;
use crate::codec::{CodecError, Instance, OutputOptions};
use crate::config::model_spec::{Signature, TensorSpec};
use crate::tensor::DType;
use crate::tensor::{Inferred, Item};

pub const KIND: Kind = Kind {
    name: "regressor",
    declare: |spec, d| tensors_only(spec, declare(d)),
    adapter: |spec, _| Ok(Box::new(Regressor::new(spec.signature()))),
};

/// One FP32 input of fixed `[features]` (default `x` `[1]`) and one output (default `y` `[1]`).
fn declare(d: Declared) -> Result<Signature, String> {
    let inputs = d
        .inputs
        .unwrap_or_else(|| vec![TensorSpec::new("x", DType::Fp32, vec![1])]);
    let outputs = d
        .outputs
        .unwrap_or_else(|| vec![TensorSpec::new("y", DType::Fp32, vec![1])]);
    if inputs.len() != 1 || outputs.len() != 1 {
        return Err("a regressor has exactly one input and one output".into());
    }
    if inputs[0].datatype != DType::Fp32 || inputs[0].dims.len() != 1 || inputs[0].dims[0] < 1 {
        return Err("a regressor's input is FP32 with fixed dims [features]".into());
    }
    Ok(Signature::new(inputs, outputs))
}

pub struct Regressor {
    signature: Signature,
}

impl Regressor {
    pub fn new(signature: Signature) -> Self {
        Self { signature }
    }
}

impl ModelAdapter for Regressor {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        let features = self.signature.inputs[0].dims[0] as usize;
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
        // checked: 1e39 is not an FP32 value (as f32 it would be infinity)
        Ok(Item::new(vec![tensor_from_f64(
            DType::Fp32,
            vec![1, features],
            values,
        )?]))
    }

    fn encode_prediction(&self, result: &Inferred, _opts: OutputOptions) -> Value {
        let values = result.outputs[0].to_f64_vec();
        match values.as_slice() {
            [single] => json!(single),
            _ => json!(values),
        }
    }
}
