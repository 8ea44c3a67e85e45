//! The KServe Open Inference Protocol (v2) wire format: parsing requests (JSON data and the
//! binary tensor extension) and encoding responses.
//!
//! Every length read from a request is checked against what is really there before it is
//! used: a malformed request is an error value, never a panic or an out-of-bounds read.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::codec::instance::Grid;
use crate::codec::CodecError;
use crate::tensor::{byte_len, checked_scalar_bytes, DType, HostTensor};

/// A v2 datatype: a numeric tensor type, or BYTES (strings, encoded images).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2Type {
    Tensor(DType),
    Bytes,
}

impl V2Type {
    pub fn parse(name: &str) -> Result<Self, CodecError> {
        if name == "BYTES" {
            return Ok(V2Type::Bytes);
        }
        DType::from_v2_name(name).map(V2Type::Tensor).ok_or_else(|| {
            CodecError::Invalid(format!(
                "datatype '{name}' is not supported; use BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64 or BYTES"
            ))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            V2Type::Tensor(d) => d.v2_name(),
            V2Type::Bytes => "BYTES",
        }
    }

    /// The Triton model-configuration name (`TYPE_FP32`, `TYPE_STRING`, ...).
    pub fn config_name(self) -> String {
        match self {
            V2Type::Tensor(DType::Bool) => "TYPE_BOOL".into(),
            V2Type::Tensor(d) => format!("TYPE_{}", d.v2_name()),
            V2Type::Bytes => "TYPE_STRING".into(),
        }
    }
}

/// One input's data.
#[derive(Debug, Clone, PartialEq)]
pub enum V2Data {
    Tensor(HostTensor),
    Bytes(Vec<Vec<u8>>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct V2Input {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: V2Data,
}

impl V2Input {
    pub fn datatype(&self) -> V2Type {
        match &self.data {
            V2Data::Tensor(t) => V2Type::Tensor(t.dtype),
            V2Data::Bytes(_) => V2Type::Bytes,
        }
    }
}

/// An output the client asked for, and whether as binary.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    pub binary: Option<bool>,
}

/// A parsed inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct V2Request {
    pub id: Option<String>,
    pub inputs: Vec<V2Input>,
    /// `None`: every output.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// `parameters.binary_data_output`: outputs in binary unless one says otherwise.
    pub binary_output: bool,
    /// `parameters.timeout`, in microseconds (Triton's unit).
    pub timeout_us: Option<u64>,
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RawInput>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    /// Kept as text: numbers go through the one flattener ([`Grid`]) without a `Value` tree.
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

fn invalid(m: impl Into<String>) -> CodecError {
    CodecError::Invalid(m.into())
}

/// The JSON text with the bare `NaN`, `Infinity` and `-Infinity` tokens outside strings quoted
/// (`"NaN"`, ...), which [`Grid::parse_with_literals`] takes in tensor data; `None` when there
/// are none.
fn quote_non_finite_literals(json: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(json.len() + 16);
    let (mut i, mut in_string, mut found) = (0, false, false);
    while i < json.len() {
        let c = json[i];
        if in_string {
            out.push(c);
            match c {
                b'\\' if i + 1 < json.len() => {
                    out.push(json[i + 1]);
                    i += 1;
                }
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_string = true;
        }
        let rest = &json[i..];
        let literal = [&b"-Infinity"[..], b"Infinity", b"NaN"]
            .into_iter()
            .find(|l| rest.starts_with(l));
        match literal {
            Some(l) => {
                out.push(b'"');
                out.extend_from_slice(l);
                out.push(b'"');
                i += l.len();
                found = true;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    found.then_some(out)
}

/// Parses a request body. `header_len` is the `Inference-Header-Content-Length` value when
/// present: the JSON header is the first `header_len` bytes and binary tensor data follows.
pub fn parse_request(body: &[u8], header_len: Option<usize>) -> Result<V2Request, CodecError> {
    let (json_part, mut binary) = match header_len {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(invalid(format!(
                "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
                body.len()
            )))
        }
    };
    let parsed = serde_json::from_slice::<RawRequest>(json_part).or_else(|e| {
        // Triton's NaN / Infinity literals are not JSON: quoted, the tensor data takes them
        match quote_non_finite_literals(json_part) {
            Some(quoted) => serde_json::from_slice(&quoted),
            None => Err(e),
        }
    });
    let raw: RawRequest = parsed.map_err(|e| {
        invalid(format!(
            "invalid inference request JSON: {e} (expected {{\"inputs\": [{{\"name\", \"shape\", \"datatype\", \"data\"}}]}})"
        ))
    })?;
    let params = raw.parameters.unwrap_or_default();
    let binary_output = params
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let timeout_us = match params.get("timeout") {
        None => None,
        Some(v) => Some(v.as_u64().filter(|&us| us > 0).ok_or_else(|| {
            invalid(format!(
                "parameters.timeout must be a positive whole number of microseconds, not {v}"
            ))
        })?),
    };
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for input in raw.inputs {
        inputs.push(parse_input(input, &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    let outputs = raw
        .outputs
        .map(|outs| {
            outs.into_iter()
                .map(|o| {
                    // Triton's top-k `classification` output is not implemented: refused, not
                    // answered with the raw tensor as if it had been
                    if o
                        .parameters
                        .as_ref()
                        .is_some_and(|p| p.contains_key("classification"))
                    {
                        return Err(invalid(format!(
                            "output '{}': parameter 'classification' is not supported; ask for the output itself (classifiers also answer 'labels')",
                            o.name
                        )));
                    }
                    let binary = match o.parameters.as_ref().and_then(|p| p.get("binary_data")) {
                        None => None,
                        Some(Value::Bool(b)) => Some(*b),
                        Some(_) => {
                            return Err(invalid("output parameter binary_data is a boolean"))
                        }
                    };
                    Ok(RequestedOutput {
                        name: o.name,
                        binary,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(V2Request {
        id: raw.id,
        inputs,
        outputs,
        binary_output,
        timeout_us,
    })
}

fn parse_input(input: RawInput, binary: &mut &[u8]) -> Result<V2Input, CodecError> {
    let name = input.name;
    let datatype =
        V2Type::parse(&input.datatype).map_err(|e| invalid(format!("input '{name}': {e}")))?;
    let (shape, count) = parse_shape(&name, &input.shape)?;
    let binary_size =
        match input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
        {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                invalid(format!("input '{name}': binary_data_size is a byte count"))
            })? as usize),
        };
    let data = match (binary_size, input.data) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "input '{name}' has both data and binary_data_size"
            )))
        }
        (None, None) => {
            return Err(invalid(format!(
                "input '{name}' has neither data nor parameters.binary_data_size"
            )))
        }
        (Some(size), None) => {
            if size > binary.len() {
                return Err(invalid(format!(
                    "input '{name}': binary_data_size {size} exceeds the {} bytes of binary data left",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            binary_data(&name, datatype, &shape, mine)?
        }
        (None, Some(data)) => {
            let elements = |n: usize| {
                invalid(format!(
                    "input '{name}': shape {shape:?} has {count} elements, data has {n}"
                ))
            };
            match datatype {
                V2Type::Bytes => {
                    let strings = string_leaves(data.get(), count)
                        .map_err(|e| invalid(format!("input '{name}': {e}")))?;
                    if strings.len() != count {
                        return Err(elements(strings.len()));
                    }
                    V2Data::Bytes(strings)
                }
                V2Type::Tensor(dtype) => {
                    let grid = Grid::parse_with_literals(data.get(), count)
                        .map_err(|e| invalid(format!("input '{name}': {dtype} data: {e}")))?;
                    if grid.values.len() != count {
                        return Err(elements(grid.values.len()));
                    }
                    grid.check_booleans(dtype)
                        .map_err(|e| invalid(format!("input '{name}': {e}")))?;
                    let mut bytes = Vec::with_capacity(count * dtype.size());
                    for (i, &x) in grid.values.iter().enumerate() {
                        let b = checked_scalar_bytes(dtype, x)
                            .map_err(|e| invalid(format!("input '{name}': element {i}: {e}")))?;
                        bytes.extend_from_slice(&b);
                    }
                    V2Data::Tensor(
                        HostTensor::new(dtype, shape.clone(), bytes)
                            .map_err(|e| invalid(e.to_string()))?,
                    )
                }
            }
        }
    };
    Ok(V2Input { name, shape, data })
}

/// An input's shape as sizes, and its element count; a negative or overflowing shape is an
/// error naming the input.
pub fn parse_shape(name: &str, dims: &[i64]) -> Result<(Vec<usize>, usize), CodecError> {
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                invalid(format!(
                    "input '{name}': shape {dims:?} has a negative dimension"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| invalid(format!("input '{name}': shape {shape:?} is too large")))?;
    Ok((shape, count))
}

/// An input's data from its bytes in the binary layout (the binary tensor extension's, and
/// gRPC's `raw_input_contents`): little-endian row-major values whose length must match the
/// shape, or BYTES elements each behind a u32 length.
pub fn binary_data(
    name: &str,
    datatype: V2Type,
    shape: &[usize],
    bytes: &[u8],
) -> Result<V2Data, CodecError> {
    let count: usize = shape.iter().product();
    Ok(match datatype {
        V2Type::Tensor(dtype) => {
            let expected = byte_len(dtype, shape).unwrap_or(usize::MAX);
            if expected != bytes.len() {
                return Err(invalid(format!(
                    "input '{name}': shape {shape:?} of {dtype} needs {expected} bytes, the binary data has {}",
                    bytes.len()
                )));
            }
            V2Data::Tensor(
                HostTensor::new(dtype, shape.to_vec(), bytes.to_vec())
                    .map_err(|e| invalid(e.to_string()))?,
            )
        }
        V2Type::Bytes => {
            let elements =
                parse_bytes_elements(bytes).map_err(|e| invalid(format!("input '{name}': {e}")))?;
            if elements.len() != count {
                return Err(invalid(format!(
                    "input '{name}': shape {shape:?} has {count} elements, the binary data {}",
                    elements.len()
                )));
            }
            V2Data::Bytes(elements)
        }
    })
}

/// The strings of BYTES `data` (flat or nested), row-major; refuses more than `max`.
fn string_leaves(raw: &str, max: usize) -> Result<Vec<Vec<u8>>, String> {
    fn walk(v: Value, out: &mut Vec<Vec<u8>>, max: usize) -> Result<(), String> {
        match v {
            Value::Array(items) => items.into_iter().try_for_each(|i| walk(i, out, max)),
            Value::String(s) if out.len() < max => {
                out.push(s.into_bytes());
                Ok(())
            }
            Value::String(_) => Err(format!(
                "data has more than the {max} elements its shape holds"
            )),
            other => Err(format!("BYTES data are strings, got {other}")),
        }
    }
    let value: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    walk(value, &mut out, max)?;
    Ok(out)
}

/// BYTES elements in binary: each is a little-endian u32 length followed by that many bytes.
pub fn parse_bytes_elements(mut data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 4 {
            return Err(format!(
                "{} trailing bytes are too few for a BYTES length prefix",
                data.len()
            ));
        }
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        data = &data[4..];
        if len > data.len() {
            return Err(format!(
                "a BYTES element claims {len} bytes, only {} are left",
                data.len()
            ));
        }
        out.push(data[..len].to_vec());
        data = &data[len..];
    }
    Ok(out)
}

/// BYTES elements in the binary layout.
pub fn encode_bytes_elements(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(elements.iter().map(|e| e.len() + 4).sum());
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// One output of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct V2Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: V2Data,
}

/// Encodes a response: JSON only, or (when any output is binary) the JSON header followed by
/// the binary outputs. Returns the body and, for binary responses, the header's length.
pub fn encode_response(
    model: &str,
    version: u64,
    id: &str,
    outputs: Vec<V2Output>,
    requested: Option<&[RequestedOutput]>,
    binary_default: bool,
) -> (Vec<u8>, Option<usize>) {
    let mut json_outputs = Vec::with_capacity(outputs.len());
    let mut binary = Vec::new();
    // outputs with NaN or infinities: JSON has no such numbers, so their data goes in as a
    // placeholder string (unguessable: a client's id cannot collide) replaced after
    // serialisation by Triton's literals
    let mut literal_data: Vec<(String, Vec<u8>)> = Vec::new();
    for out in outputs {
        let asked = requested.and_then(|r| r.iter().find(|o| o.name == out.name));
        let as_binary = asked.and_then(|o| o.binary).unwrap_or(binary_default);
        let datatype = match &out.data {
            V2Data::Tensor(t) => V2Type::Tensor(t.dtype),
            V2Data::Bytes(_) => V2Type::Bytes,
        };
        let mut o = json!({"name": out.name, "datatype": datatype.name(), "shape": out.shape});
        if as_binary {
            let bytes = match out.data {
                V2Data::Tensor(t) => t.data,
                V2Data::Bytes(b) => encode_bytes_elements(&b),
            };
            o["parameters"] = json!({"binary_data_size": bytes.len()});
            binary.extend_from_slice(&bytes);
        } else {
            // no "parameters" on JSON outputs: perf_analyzer's parser rejects an empty one
            o["data"] = match out.data {
                V2Data::Tensor(t) if !t.all_finite() => {
                    let token = format!("aiaas-non-finite-{}", uuid::Uuid::new_v4());
                    literal_data.push((format!("\"{token}\""), numbers_with_literals(&t)));
                    Value::String(token)
                }
                // f32 printed as f32 (0.1, not 0.10000000149011612)
                V2Data::Tensor(t) if t.dtype == DType::Fp32 => json!(t.to_f32_vec()),
                V2Data::Tensor(t) => json!(t.to_f64_vec()),
                V2Data::Bytes(b) => Value::Array(
                    b.iter()
                        .map(|e| Value::String(String::from_utf8_lossy(e).into_owned()))
                        .collect(),
                ),
            };
        }
        json_outputs.push(o);
    }
    let header = json!({
        "model_name": model,
        "model_version": version.to_string(),
        "id": id,
        "outputs": json_outputs,
    });
    let mut body = serde_json::to_vec(&header).expect("response JSON");
    for (placeholder, literal) in literal_data {
        if let Some(at) = find(&body, placeholder.as_bytes()) {
            body.splice(at..at + placeholder.len(), literal);
        }
    }
    if binary.is_empty() {
        (body, None)
    } else {
        let header_len = body.len();
        body.extend_from_slice(&binary);
        (body, Some(header_len))
    }
}

/// A float tensor's values as a JSON-like array with `NaN`, `Infinity` and `-Infinity`
/// literals, as Triton writes them (Python's json and tritonclient read them).
fn numbers_with_literals(t: &HostTensor) -> Vec<u8> {
    let mut out = b"[".to_vec();
    for (i, v) in t.to_f64_vec().into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if v.is_nan() {
            out.extend_from_slice(b"NaN");
        } else if v.is_infinite() {
            out.extend_from_slice(if v > 0.0 { b"Infinity" } else { b"-Infinity" });
        } else if t.dtype == DType::Fp32 {
            serde_json::to_writer(&mut out, &(v as f32)).expect("a finite number");
        } else {
            serde_json::to_writer(&mut out, &v).expect("a finite number");
        }
    }
    out.push(b']');
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_le(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_classification_output_is_refused_not_ignored() {
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"scores","parameters":{"classification":3}}]}"#;
        let e = parse_request(body, None).unwrap_err().to_string();
        assert!(e.contains("classification"), "{e}");
    }

    #[test]
    fn json_data_flat_or_nested() {
        let body =
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]}]}"#;
        let r = parse_request(body, None).unwrap();
        let V2Data::Tensor(t) = &r.inputs[0].data else {
            panic!()
        };
        assert_eq!(t.to_f32_vec(), vec![1., 2., 3., 4.]);
        let flat = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]}"#;
        assert_eq!(parse_request(flat, None).unwrap().inputs, r.inputs);
    }

    #[test]
    fn binary_inputs_follow_the_header() {
        let header = br#"{"inputs":[{"name":"a","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"s","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":13}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = header.to_vec();
        body.extend(f32_le(&[1.5, -2.0]));
        body.extend(encode_bytes_elements(&[b"hi".to_vec(), b"you".to_vec()]));
        let r = parse_request(&body, Some(header.len())).unwrap();
        assert!(r.binary_output);
        let V2Data::Tensor(t) = &r.inputs[0].data else {
            panic!()
        };
        assert_eq!(t.to_f32_vec(), vec![1.5, -2.0]);
        assert_eq!(
            r.inputs[1].data,
            V2Data::Bytes(vec![b"hi".to_vec(), b"you".to_vec()])
        );
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        let ok = br#"{"inputs":[{"name":"a","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = ok.to_vec();
        body.extend(f32_le(&[1.0, 2.0]));
        // header length past the body
        assert!(parse_request(&body, Some(body.len() + 1)).is_err());
        // binary data shorter than claimed
        assert!(parse_request(&body[..body.len() - 1], Some(ok.len())).is_err());
        // binary data left over
        let mut extra = body.clone();
        extra.push(0);
        assert!(parse_request(&extra, Some(ok.len())).is_err());
        // shape x datatype size disagrees with binary_data_size
        let wrong = br#"{"inputs":[{"name":"a","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut b = wrong.to_vec();
        b.extend(f32_le(&[1.0, 2.0]));
        assert!(parse_request(&b, Some(wrong.len())).is_err());
        // huge shapes do not allocate
        let huge = br#"{"inputs":[{"name":"a","shape":[4294967296,4294967296,16],"datatype":"FP64","data":[1]}]}"#;
        assert!(parse_request(huge, None).is_err());
        // unsupported types, negative dims, wrong element counts, bad BYTES prefixes
        for bad in [
            &br#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT32","data":[1]}]}"#[..],
            br#"{"inputs":[{"name":"a","shape":[-1],"datatype":"FP32","data":[1]}]}"#,
            br#"{"inputs":[{"name":"a","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
            br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":["x"]}]}"#,
            br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32"}]}"#,
            br#"{"inputs":[{"name":"a","shape":[1],"datatype":"BYTES","data":[1]}]}"#,
            br#"not json"#,
        ] {
            assert!(
                parse_request(bad, None).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_bytes_elements(&[5, 0, 0, 0, b'a']).is_err());
        assert!(parse_bytes_elements(&[1, 0]).is_err());
    }

    #[test]
    fn responses_are_json_or_header_plus_binary() {
        let t = HostTensor::from_f32(vec![1, 2], &[0.25, 0.75]).unwrap();
        let outs = vec![
            V2Output {
                name: "scores".into(),
                shape: vec![1, 2],
                data: V2Data::Tensor(t),
            },
            V2Output {
                name: "labels".into(),
                shape: vec![1, 1],
                data: V2Data::Bytes(vec![b"b".to_vec()]),
            },
        ];
        let (body, header) = encode_response("m", 1, "id-1", outs.clone(), None, false);
        assert!(header.is_none());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["outputs"][0]["data"], json!([0.25, 0.75]));
        assert!(v["outputs"][0].get("parameters").is_none());
        assert_eq!(v["outputs"][1]["data"], json!(["b"]));
        assert_eq!(v["model_version"], "1");
        let req = [RequestedOutput {
            name: "scores".into(),
            binary: Some(true),
        }];
        let (body, header) = encode_response("m", 1, "id-1", outs, Some(&req), false);
        let n = header.unwrap();
        let v: Value = serde_json::from_slice(&body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(&body[n..], &f32_le(&[0.25, 0.75])[..]);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn dtype() -> impl Strategy<Value = DType> {
        prop::sample::select(DType::ALL.to_vec())
    }

    proptest! {
        /// Any tensor sent as binary data comes back out of the parser byte for byte.
        #[test]
        fn binary_tensors_round_trip(dtype in dtype(), shape in prop::collection::vec(0usize..5, 1..4), seed in any::<u64>()) {
            let len = byte_len(dtype, &shape).unwrap();
            let data: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 3) as u8).collect();
            let header = serde_json::to_vec(&json!({"inputs": [{"name": "t", "shape": shape, "datatype": dtype.v2_name(),
                "parameters": {"binary_data_size": len}}]})).unwrap();
            let mut body = header.clone();
            body.extend(&data);
            let r = parse_request(&body, Some(header.len())).unwrap();
            prop_assert_eq!(&r.inputs[0].data, &V2Data::Tensor(HostTensor::new(dtype, shape.clone(), data).unwrap()));
        }

        /// Integer tensors sent as JSON numbers parse to the same values.
        #[test]
        fn json_integers_round_trip(values in prop::collection::vec(-30000i64..30000, 1..40)) {
            for dtype in [DType::Int16, DType::Int32, DType::Int64, DType::Fp32, DType::Fp64] {
                let body = serde_json::to_vec(&json!({"inputs": [{"name": "t", "shape": [values.len()],
                    "datatype": dtype.v2_name(), "data": values}]})).unwrap();
                let r = parse_request(&body, None).unwrap();
                let V2Data::Tensor(t) = &r.inputs[0].data else { unreachable!() };
                prop_assert_eq!(t.to_f64_vec(), values.iter().map(|&v| v as f64).collect::<Vec<_>>());
            }
        }

        /// BYTES elements survive the length-prefixed layout, and a truncated one is an error.
        #[test]
        fn bytes_elements_round_trip(elements in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 0..10)) {
            let encoded = encode_bytes_elements(&elements);
            prop_assert_eq!(parse_bytes_elements(&encoded).unwrap(), elements.clone());
            if !encoded.is_empty() {
                let cut = &encoded[..encoded.len() - 1];
                let reparsed = parse_bytes_elements(cut);
                prop_assert!(reparsed.is_err() || reparsed.unwrap() != elements);
            }
        }

        /// Responses carry the outputs' values, in JSON or in binary after the header.
        #[test]
        fn responses_round_trip(values in prop::collection::vec(-1e6f32..1e6, 1..30), binary in any::<bool>()) {
            let t = HostTensor::from_f32(vec![values.len()], &values).unwrap();
            let out = vec![V2Output { name: "o".into(), shape: vec![values.len()], data: V2Data::Tensor(t.clone()) }];
            let (body, header) = encode_response("m", 1, "id", out, None, binary);
            match header {
                Some(n) => {
                    prop_assert!(binary);
                    prop_assert_eq!(&body[n..], &t.data[..]);
                }
                None => {
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    let got: Vec<f32> = v["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
                    prop_assert_eq!(got, values);
                }
            }
        }

        /// No input, however malformed, panics the parser.
        #[test]
        fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..200), header in prop::option::of(0usize..250)) {
            let _ = parse_request(&body, header);
        }
    }
}
