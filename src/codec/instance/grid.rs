//! Numbers in JSON: a rectangular nested array of numbers as a flat buffer and its shape
//! ([`Grid`]), and values converted into a tensor of a model's type.

use serde_json::Value;

use super::scanner::Scanner;
use super::visitor::{Instance, Nested};
use crate::codec::CodecError;
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

/// A JSON number as f64 (a boolean is not a number).
pub fn number(v: &Value) -> Result<f64, CodecError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| CodecError::Invalid(format!("{n} is not a representable number"))),
        other => Err(CodecError::Invalid(format!(
            "expected a number, got {}",
            json_type(other)
        ))),
    }
}

/// A rectangular (possibly nested) array of numbers, row-major, with its shape; a bare number
/// has shape `[]`. The one flattener of JSON numbers: /v1 instances, their object members and
/// v2 `data` all go through it (the fast scanner first, serde for anything else), with one
/// error for arrays that are not rectangular.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub values: Vec<f64>,
    pub shape: Vec<usize>,
    /// Some values were JSON booleans (as 0/1): only a BOOL tensor takes them.
    pub booleans: bool,
}

impl Grid {
    /// Parses JSON text holding at most `max` numbers.
    pub fn parse(raw: &str, max: usize) -> Result<Grid, CodecError> {
        Self::parse_inner(raw, max, false)
    }

    /// As [`Grid::parse`], also taking `NaN`, `Infinity` and `-Infinity` as Triton writes them
    /// (v2 tensor data: its load generator sends them in random data).
    pub fn parse_with_literals(raw: &str, max: usize) -> Result<Grid, CodecError> {
        Self::parse_inner(raw, max, true)
    }

    fn parse_inner(raw: &str, max: usize, literals: bool) -> Result<Grid, CodecError> {
        if let Some(grid) = Scanner::grid(raw, max, literals) {
            return Ok(grid);
        }
        let mut de = serde_json::Deserializer::from_str(raw);
        let grid = serde::de::DeserializeSeed::deserialize(GridSeed { max }, &mut de)
            .and_then(|g| de.end().map(|()| g))
            .map_err(|e| CodecError::Invalid(e.to_string()))?;
        Ok(grid)
    }

    /// A /v1 array instance; one holding booleans is not numbers, and no model kind takes it.
    pub fn into_instance(self) -> Instance {
        if self.booleans {
            Instance::Other("an array holding booleans")
        } else {
            Instance::Array {
                values: self.values,
                shape: self.shape,
            }
        }
    }

    /// Refuses booleans unless `dtype` is BOOL.
    pub fn check_booleans(&self, dtype: DType) -> Result<(), CodecError> {
        if self.booleans && dtype != DType::Bool {
            Err(CodecError::Invalid(format!(
                "booleans are not numbers: a {dtype} tensor takes numbers"
            )))
        } else {
            Ok(())
        }
    }

    /// From an already-parsed JSON value; more than `max` numbers is [`CodecError::TooLarge`].
    pub fn from_value(v: &Value, max: usize) -> Result<Grid, CodecError> {
        // the size its first elements imply, before anything is copied
        let mut total = 1usize;
        let mut cursor = v;
        while let Value::Array(a) = cursor {
            total = total.saturating_mul(a.len());
            match a.first() {
                Some(first) => cursor = first,
                None => break,
            }
        }
        if total > max {
            return Err(CodecError::TooLarge(format!(
                "an instance may hold at most {max} numbers"
            )));
        }
        serde::de::DeserializeSeed::deserialize(GridSeed { max }, v)
            .map_err(|e| CodecError::Invalid(e.to_string()))
    }
}

/// Deserializes a [`Grid`] of at most `max` numbers from any serde source.
struct GridSeed {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for GridSeed {
    type Value = Grid;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Grid, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for GridSeed {
    type Value = Grid;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number or a rectangular array of numbers")
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Grid, E> {
        Ok(Grid {
            values: vec![v],
            shape: vec![],
            booleans: false,
        })
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Grid, E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Grid, E> {
        self.visit_f64(v as f64)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Grid, E> {
        let mut g = self.visit_f64(v as u8 as f64)?;
        g.booleans = true;
        Ok(g)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Grid, A::Error> {
        Nested::new(self.max).grid(seq)
    }
}

/// Values converted to `dtype` in a tensor of `shape`; a value `dtype` cannot hold is an error
/// naming its position (row-major), not a saturated or infinite element.
pub fn tensor_from_f64(
    dtype: DType,
    shape: Vec<usize>,
    values: &[f64],
) -> Result<HostTensor, CodecError> {
    let mut data = Vec::with_capacity(values.len() * dtype.size());
    for (i, &v) in values.iter().enumerate() {
        let bytes = crate::tensor::checked_scalar_bytes(dtype, v)
            .map_err(|e| CodecError::Invalid(format!("element {i}: {e}")))?;
        data.extend_from_slice(&bytes);
    }
    HostTensor::new(dtype, shape, data).map_err(|e| CodecError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::instance::RAGGED;
    use serde_json::json;

    #[test]
    fn v2_data_takes_tritons_non_finite_literals_and_v1_does_not() {
        let g = Grid::parse_with_literals("[[NaN, 1.5], [Infinity, -Infinity]]", 10).unwrap();
        assert_eq!(g.shape, vec![2, 2]);
        assert!(g.values[0].is_nan());
        assert_eq!(&g.values[1..], &[1.5, f64::INFINITY, f64::NEG_INFINITY]);
        let quoted = Grid::parse_with_literals(r#"["NaN", "-Infinity"]"#, 10).unwrap();
        assert!(quoted.values[0].is_nan() && quoted.values[1] == f64::NEG_INFINITY);
        assert!(Grid::parse("[NaN]", 10).is_err());
        assert!(Grid::parse_with_literals("[Nan]", 10).is_err());
    }

    #[test]
    fn flattens_nested_arrays() {
        let g = Grid::from_value(&json!([[1, 2, 3], [4, 5, 6]]), 100).unwrap();
        assert_eq!(g.shape, vec![2, 3]);
        assert_eq!(g.values, vec![1., 2., 3., 4., 5., 6.]);
        let g = Grid::from_value(&json!(7.5), 100).unwrap();
        assert!(g.shape.is_empty());
        assert_eq!(g.values, vec![7.5]);
        // text goes through the fast scanner, or serde where it cannot
        for text in ["[[1, 2, 3], [4, 5, 6]]", "[[1, 2, 3], [4, 5, true]]"] {
            let g = Grid::parse(text, 100).unwrap();
            assert_eq!(g.shape, vec![2, 3], "{text}");
        }
        assert_eq!(Grid::parse("[]", 100).unwrap().shape, vec![0]);
    }

    #[test]
    fn refuses_ragged_and_non_numeric_arrays_alike() {
        // the same message from a value and from text (which adds where it stopped)
        let message = |e: CodecError| e.to_string().split(" at line").next().unwrap().to_string();
        for bad in [json!([[1, 2], [3]]), json!([[1, 2], 3]), json!([1, "x"])] {
            let from_value = message(Grid::from_value(&bad, 100).unwrap_err());
            let from_text = message(Grid::parse(&bad.to_string(), 100).unwrap_err());
            assert_eq!(from_value, from_text, "{bad}");
        }
        let ragged = Grid::parse("[[1, 2], [3]]", 100).unwrap_err().to_string();
        assert!(ragged.contains(RAGGED), "{ragged}");
        assert!(matches!(
            Grid::from_value(&json!([1, 2, 3]), 2),
            Err(CodecError::TooLarge(_))
        ));
        assert!(Grid::parse("[1, 2, 3]", 2).is_err());
        assert!(Grid::parse("[1, 2] 3", 100).is_err());
    }
}
