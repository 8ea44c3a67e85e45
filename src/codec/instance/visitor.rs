//! One /v1 JSON instance parsed straight from the request bytes by a serde visitor: nested
//! numeric arrays go directly into a flat buffer, checked rectangular as they are walked.

use serde::Deserialize as _;

use serde_json::Value;

use super::grid::{number, Grid};
use crate::codec::CodecError;

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
            Value::Number(_) => Instance::Number(number(v)?),
            Value::Bool(_) => Instance::Other("a boolean"),
            Value::String(s) => Instance::Text(s.clone()),
            Value::Array(_) => Grid::from_value(v, usize::MAX)?.into_instance(),
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
    fn visit_bool<E>(self, _: bool) -> Result<Instance, E> {
        Ok(Instance::Other("a boolean"))
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
        Ok(Nested::new(usize::MAX).grid(seq)?.into_instance())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Instance, A::Error> {
        let m = serde_json::Map::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Instance::Object(m))
    }
}

/// Walks a nested array, appending numbers and checking that it is rectangular.
pub(super) struct Nested {
    values: Vec<f64>,
    /// The length seen at each depth (inner levels finish before outer ones).
    shape: Vec<Option<usize>>,
    leaf_depth: Option<usize>,
    /// Most numbers taken.
    max: usize,
    booleans: bool,
}

/// The one error for arrays that are not rectangular, wherever numbers are flattened.
pub const RAGGED: &str =
    "nested arrays must be rectangular (every row the same length) and hold numbers only";

impl Nested {
    pub(super) fn new(max: usize) -> Self {
        Self {
            values: Vec::new(),
            shape: Vec::new(),
            leaf_depth: None,
            max,
            booleans: false,
        }
    }

    /// The whole array `seq` as a grid.
    pub(super) fn grid<'de, A: serde::de::SeqAccess<'de>>(
        mut self,
        seq: A,
    ) -> Result<Grid, A::Error> {
        self.visit_level(seq, 0)?;
        Ok(Grid {
            values: self.values,
            shape: self.shape.into_iter().map(|d| d.unwrap_or(0)).collect(),
            booleans: self.booleans,
        })
    }

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
        // an earlier sibling held an array where this holds a number
        if self.shape.len() > depth {
            return Err(E::custom(RAGGED));
        }
        match self.leaf_depth {
            Some(d) if d != depth => return Err(E::custom(RAGGED)),
            None => self.leaf_depth = Some(depth),
            _ => {}
        }
        if self.values.len() >= self.max {
            return Err(E::custom(format!(
                "more than the {} numbers the shape holds",
                self.max
            )));
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
        self.state.booleans = true;
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
            "[[[]], [1]]",
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
