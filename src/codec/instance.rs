//! Helpers for numbers in JSON instances: nested arrays to flat values and a shape.

use serde_json::Value;

use super::CodecError;
use crate::tensor::{DType, HostTensor};

/// The JSON type of a value, for error messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON number (or boolean, as 0/1) as f64.
pub fn number(v: &Value) -> Result<f64, CodecError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| CodecError::Invalid(format!("{n} is not a representable number"))),
        Value::Bool(b) => Ok(*b as u8 as f64),
        other => Err(CodecError::Invalid(format!(
            "expected a number, got {}",
            json_type(other)
        ))),
    }
}

/// Flattens a (possibly nested) rectangular array of numbers, row-major, and returns its shape.
/// A bare number has shape `[]`. Refuses more than `max_elements` values.
pub fn flatten_numbers(
    v: &Value,
    max_elements: usize,
) -> Result<(Vec<f64>, Vec<usize>), CodecError> {
    let mut shape = Vec::new();
    let mut cursor = v;
    while let Value::Array(a) = cursor {
        shape.push(a.len());
        match a.first() {
            Some(first) => cursor = first,
            None => break,
        }
    }
    let total = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match total {
        Some(t) if t <= max_elements => {}
        _ => {
            return Err(CodecError::TooLarge(format!(
                "an instance may hold at most {max_elements} numbers"
            )))
        }
    }
    let mut out = Vec::with_capacity(total.unwrap_or(0));
    walk(v, &shape, 0, &mut out)?;
    Ok((out, shape))
}

fn walk(v: &Value, shape: &[usize], depth: usize, out: &mut Vec<f64>) -> Result<(), CodecError> {
    match v {
        Value::Array(a) => {
            if depth >= shape.len() || a.len() != shape[depth] {
                return Err(CodecError::Invalid(
                    "nested arrays must be rectangular (every row the same length)".into(),
                ));
            }
            for x in a {
                walk(x, shape, depth + 1, out)?;
            }
            Ok(())
        }
        _ if depth != shape.len() => Err(CodecError::Invalid(
            "nested arrays must be rectangular (every row the same length)".into(),
        )),
        _ => {
            out.push(number(v)?);
            Ok(())
        }
    }
}

/// Values converted to `dtype` (saturating, as `as` casts do) in a tensor of `shape`.
pub fn tensor_from_f64(
    dtype: DType,
    shape: Vec<usize>,
    values: &[f64],
) -> Result<HostTensor, CodecError> {
    let mut data = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        data.extend_from_slice(&crate::tensor::scalar_bytes(dtype, v));
    }
    HostTensor::new(dtype, shape, data).map_err(|e| CodecError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattens_nested_arrays() {
        let (v, s) = flatten_numbers(&json!([[1, 2, 3], [4, 5, 6]]), 100).unwrap();
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![1., 2., 3., 4., 5., 6.]);
        let (v, s) = flatten_numbers(&json!(7.5), 100).unwrap();
        assert!(s.is_empty());
        assert_eq!(v, vec![7.5]);
    }

    #[test]
    fn refuses_ragged_and_non_numeric_arrays() {
        assert!(flatten_numbers(&json!([[1, 2], [3]]), 100).is_err());
        assert!(flatten_numbers(&json!([[1, 2], 3]), 100).is_err());
        assert!(flatten_numbers(&json!([1, "x"]), 100).is_err());
        assert!(matches!(
            flatten_numbers(&json!([1, 2, 3]), 2),
            Err(CodecError::TooLarge(_))
        ));
    }
}

/// One /v1 JSON instance, parsed straight from the request bytes: nested numeric arrays go
/// directly into a flat buffer, with no `serde_json::Value` tree for the 12,288 numbers of an
/// image.
#[derive(Debug, Clone, PartialEq)]
pub enum Instance {
    Number(f64),
    Text(String),
    /// A rectangular (possibly nested) array of numbers, row-major, and its shape.
    Array {
        values: Vec<f64>,
        shape: Vec<usize>,
    },
    Object(serde_json::Map<String, Value>),
    /// `null` or anything else no model takes, by its JSON type name.
    Other(&'static str),
}

impl Instance {
    pub fn json_type(&self) -> &'static str {
        match self {
            Instance::Number(_) => "a number",
            Instance::Text(_) => "a string",
            Instance::Array { .. } => "an array",
            Instance::Object(_) => "an object",
            Instance::Other(t) => t,
        }
    }

    /// From an already-parsed JSON value (used where a `Value` exists anyway).
    pub fn from_value(v: &Value) -> Result<Self, CodecError> {
        Ok(match v {
            Value::Number(_) | Value::Bool(_) => Instance::Number(number(v)?),
            Value::String(s) => Instance::Text(s.clone()),
            Value::Array(_) => {
                let (values, shape) = flatten_numbers(v, usize::MAX)?;
                Instance::Array { values, shape }
            }
            Value::Object(o) => Instance::Object(o.clone()),
            Value::Null => Instance::Other("null"),
        })
    }
}

impl<'de> serde::Deserialize<'de> for Instance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(InstanceVisitor)
    }
}

struct InstanceVisitor;

impl<'de> serde::de::Visitor<'de> for InstanceVisitor {
    type Value = Instance;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number, a string, an array of numbers or an object")
    }
    fn visit_f64<E>(self, v: f64) -> Result<Instance, E> {
        Ok(Instance::Number(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Instance, E> {
        Ok(Instance::Number(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Instance, E> {
        Ok(Instance::Number(v as f64))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Instance, E> {
        Ok(Instance::Number(v as u8 as f64))
    }
    fn visit_str<E>(self, v: &str) -> Result<Instance, E> {
        Ok(Instance::Text(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Instance, E> {
        Ok(Instance::Text(v))
    }
    fn visit_unit<E>(self) -> Result<Instance, E> {
        Ok(Instance::Other("null"))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Instance, A::Error> {
        let mut state = Nested {
            values: Vec::new(),
            shape: Vec::new(),
            leaf_depth: None,
        };
        state.visit_level(seq, 0)?;
        Ok(Instance::Array {
            values: state.values,
            shape: state.shape.into_iter().map(|d| d.unwrap_or(0)).collect(),
        })
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Instance, A::Error> {
        let m = serde_json::Map::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Instance::Object(m))
    }
}

use serde::Deserialize as _;

/// Walks a nested array, appending numbers and checking that it is rectangular.
struct Nested {
    values: Vec<f64>,
    /// The length seen at each depth (inner levels finish before outer ones).
    shape: Vec<Option<usize>>,
    leaf_depth: Option<usize>,
}

const RAGGED: &str =
    "nested arrays must be rectangular (every row the same length) and hold numbers only";

impl Nested {
    fn visit_level<'de, A: serde::de::SeqAccess<'de>>(
        &mut self,
        mut seq: A,
        depth: usize,
    ) -> Result<(), A::Error> {
        let mut n = 0usize;
        while seq
            .next_element_seed(Level {
                state: self,
                depth: depth + 1,
            })?
            .is_some()
        {
            n += 1;
        }
        if self.shape.len() <= depth {
            self.shape.resize(depth + 1, None);
        }
        match self.shape[depth] {
            Some(expected) if expected != n => Err(serde::de::Error::custom(RAGGED)),
            Some(_) => Ok(()),
            None => {
                self.shape[depth] = Some(n);
                Ok(())
            }
        }
    }

    fn leaf<E: serde::de::Error>(&mut self, depth: usize, v: f64) -> Result<(), E> {
        match self.leaf_depth {
            Some(d) if d != depth => return Err(E::custom(RAGGED)),
            None => self.leaf_depth = Some(depth),
            _ => {}
        }
        self.values.push(v);
        Ok(())
    }
}

struct Level<'s> {
    state: &'s mut Nested,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Level<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Level<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number or an array of numbers")
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.state.leaf(self.depth, v)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.state.leaf(self.depth, v as f64)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.state.leaf(self.depth, v as f64)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.state.leaf(self.depth, v as u8 as f64)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        if self.state.leaf_depth.is_some_and(|d| d <= self.depth) {
            return Err(serde::de::Error::custom(RAGGED));
        }
        self.state.visit_level(seq, self.depth)
    }
}

#[cfg(test)]
mod instance_tests {
    use super::*;

    fn parse(s: &str) -> Result<Instance, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn parses_each_kind_of_instance() {
        assert_eq!(parse("0.5").unwrap(), Instance::Number(0.5));
        assert_eq!(parse("\"hi\"").unwrap(), Instance::Text("hi".into()));
        assert_eq!(
            parse("[[1, 2, 3], [4, 5, 6]]").unwrap(),
            Instance::Array {
                values: vec![1., 2., 3., 4., 5., 6.],
                shape: vec![2, 3]
            }
        );
        assert_eq!(
            parse("[]").unwrap(),
            Instance::Array {
                values: vec![],
                shape: vec![0]
            }
        );
        assert!(matches!(
            parse("{\"b64\": \"x\"}").unwrap(),
            Instance::Object(_)
        ));
        assert_eq!(parse("null").unwrap(), Instance::Other("null"));
    }

    #[test]
    fn refuses_ragged_or_mixed_arrays() {
        for bad in [
            "[[1, 2], [3]]",
            "[[1, 2], 3]",
            "[1, [2]]",
            "[1, \"x\"]",
            "[[1], {}]",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn agrees_with_the_value_path() {
        for s in ["[[[1, 2], [3, 4]]]", "[0.25]", "7", "\"t\""] {
            let direct = parse(s).unwrap();
            let via_value = Instance::from_value(&serde_json::from_str(s).unwrap()).unwrap();
            assert_eq!(direct, via_value, "{s}");
        }
    }
}
