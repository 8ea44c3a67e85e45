//! `tensor`: any model, inputs and outputs as declared in model.toml. An instance is the single
//! input's (nested) array, or an object keyed by input name; a prediction is an object keyed by
//! output name.

use serde_json::{json, Map, Value};

use super::{tensors_only, Declared, Kind, ModelAdapter};
use crate::codec::instance::{tensor_from_f64, Grid};
use crate::codec::{check_dims, CodecError, Instance, OutputOptions};
use crate::config::model_spec::Signature;
use crate::tensor::{Inferred, Item};

/// Most numbers in one input of one instance given as a JSON object.
const MAX_OBJECT_INPUT_NUMBERS: usize = 64 << 20;

pub const KIND: Kind = Kind {
    name: "tensor",
    declare: |spec, d| tensors_only(spec, declare(d)),
    adapter: |spec, _| Ok(Box::new(TensorModel::new(spec.signature()))),
};

/// Inputs and outputs as declared; there are no defaults.
fn declare(d: Declared) -> Result<Signature, String> {
    Ok(Signature::new(
        d.inputs
            .ok_or("kind tensor needs [[inputs]] (name, datatype, dims)")?,
        d.outputs
            .ok_or("kind tensor needs [[outputs]] (name, datatype, dims)")?,
    ))
}

pub struct TensorModel {
    signature: Signature,
}

impl TensorModel {
    pub fn new(signature: Signature) -> Self {
        Self { signature }
    }
}

impl ModelAdapter for TensorModel {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        let inputs = &self.signature.inputs;
        let per_input: Vec<(Vec<f64>, Vec<usize>)> = match (instance, inputs.len()) {
            (Instance::Object(map), _) => inputs
                .iter()
                .map(|s| {
                    let v = map.get(&s.name).ok_or_else(|| {
                        CodecError::Invalid(format!("instance lacks input '{}'", s.name))
                    })?;
                    let g = Grid::from_value(v, MAX_OBJECT_INPUT_NUMBERS)?;
                    g.check_booleans(s.datatype)?;
                    Ok((g.values, g.shape))
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
                    inputs.len()
                )))
            }
        };
        let tensors = inputs
            .iter()
            .zip(per_input)
            .map(|(spec, (values, shape))| {
                check_dims(spec, &shape)?;
                let mut full = vec![1];
                full.extend(shape);
                tensor_from_f64(spec.datatype, full, &values)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Item::new(tensors))
    }

    fn encode_prediction(&self, result: &Inferred, _opts: OutputOptions) -> Value {
        let mut map = Map::new();
        for (spec, t) in self.signature.outputs.iter().zip(&result.outputs) {
            map.insert(spec.name.clone(), nested(&t.to_f64_vec(), &t.shape[1..]));
        }
        Value::Object(map)
    }
}

/// Row-major values as nested JSON arrays of `shape`.
fn nested(values: &[f64], shape: &[usize]) -> Value {
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
    fn nested_rebuilds_shapes() {
        assert_eq!(
            nested(&[1., 2., 3., 4.], &[2, 2]),
            json!([[1., 2.], [3., 4.]])
        );
    }
}
