//! /v1 JSON instances: [`grid`] flattens nested arrays of numbers (the one flattener: /v1
//! instances, their object members and v2 `data` all go through it), [`visitor`] parses an
//! instance with serde, [`scanner`] is the fast path that scans numeric instances straight from
//! the request text and hands anything else to the visitor.

mod grid;
mod scanner;
mod visitor;

pub use self::grid::{json_type, number, tensor_from_f64, Grid};
pub use self::scanner::{numeric_body, numeric_instances};
pub use self::visitor::{Instance, RAGGED};
