//! `regressor`: an instance is a number or an array of one number per feature (FP32
//! `[1, features]`); answers the output value (a number, or an array for several outputs).

use serde_json::{json, Value};

use super::{ModelAdapter, Signature};
use crate::batcher::{Inferred, Item};
use crate::codec::{CodecError, Instance, OutputOptions};
use crate::tensor::HostTensor;

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
        "regressor"
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
        let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        Ok(Item::new(vec![HostTensor::from_f32(
            vec![1, features],
            &values,
        )
        .expect("shape checked")]))
    }

    fn encode_prediction(&self, result: &Inferred, _opts: OutputOptions) -> Value {
        let values = result.outputs[0].to_f64_vec();
        match values.as_slice() {
            [single] => json!(single),
            _ => json!(values),
        }
    }
}
