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
