//! KServe v2's protobuf messages to and from the codec's v2 types: inputs as typed `contents` or
//! `raw_input_contents` (the binary layout of HTTP's binary tensor extension), outputs always
//! as `raw_output_contents` (what tritonclient reads, and the cheapest to encode); metadata,
//! configuration and statistics from the same facts as the HTTP routes.

use std::collections::HashMap;

use super::proto::{
    infer_parameter::ParameterChoice, model_config, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor, model_instance_group, model_metadata_response,
    model_version_policy, InferParameter, InferStatistics, InferTensorContents, ModelConfig,
    ModelDynamicBatching, ModelInferRequest, ModelInferResponse, ModelInput, ModelInstanceGroup,
    ModelMetadataResponse, ModelOutput, ModelQueuePolicy, ModelStatistics, ModelVersionPolicy,
    StatisticDuration,
};
use crate::codec::v2::{
    binary_data, encode_bytes_elements, parse_shape, RequestedOutput, V2Data, V2Input, V2Output,
    V2Request, V2TensorMeta, V2Type,
};
use crate::config::model_spec::VersionPolicy;
use crate::http::ApiError;
use crate::registry::ServingModel;
use crate::tensor::{DType, HostTensor};

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError::InvalidInput(m.into())
}

/// A request's parameters this server reads; the others (Triton's `priority`, sequence ids)
/// are ignored, as the HTTP route ignores them.
fn timeout_us(parameters: &HashMap<String, InferParameter>) -> Result<Option<u64>, ApiError> {
    let Some(p) = parameters.get("timeout") else {
        return Ok(None);
    };
    let us = match p.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => u64::try_from(v).ok(),
        Some(ParameterChoice::Uint64Param(v)) => Some(v),
        _ => None,
    };
    us.filter(|&us| us > 0).map(Some).ok_or_else(|| {
        invalid("parameters.timeout must be a positive whole number of microseconds")
    })
}

/// A `ModelInferRequest` as the codec's request. Either every input carries typed `contents`
/// or `raw_input_contents` holds one entry per input, in order (Triton's rule).
pub fn infer_request(msg: ModelInferRequest) -> Result<V2Request, ApiError> {
    let timeout_us = timeout_us(&msg.parameters)?;
    let raw = msg.raw_input_contents;
    if !raw.is_empty() && raw.len() != msg.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs: give one per input, in order",
            raw.len(),
            msg.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(msg.inputs.len());
    for (i, input) in msg.inputs.into_iter().enumerate() {
        inputs.push(infer_input(input, raw.get(i).map(|b| &b[..]))?);
    }
    let outputs = if msg.outputs.is_empty() {
        None
    } else {
        let mut out = Vec::with_capacity(msg.outputs.len());
        for o in msg.outputs {
            if let Some(k) = o
                .parameters
                .keys()
                .find(|k| *k != "binary_data" && *k != "binary_data_size")
            {
                return Err(invalid(format!(
                    "output '{}': parameter '{k}' is not supported; ask for the output itself (classifiers also answer 'labels')",
                    o.name
                )));
            }
            out.push(RequestedOutput {
                name: o.name,
                binary: None,
            });
        }
        Some(out)
    };
    Ok(V2Request {
        id: (!msg.id.is_empty()).then_some(msg.id),
        inputs,
        outputs,
        binary_output: true,
        timeout_us,
    })
}

fn infer_input(input: InferInputTensor, raw: Option<&[u8]>) -> Result<V2Input, ApiError> {
    let name = input.name;
    let datatype =
        V2Type::parse(&input.datatype).map_err(|e| invalid(format!("input '{name}': {e}")))?;
    let (shape, count) = parse_shape(&name, &input.shape)?;
    let data = match (raw, input.contents) {
        (Some(_), Some(c)) if c != InferTensorContents::default() => {
            return Err(invalid(format!(
                "input '{name}' has contents while raw_input_contents is used: use one or the other for every input"
            )))
        }
        (Some(bytes), _) => binary_data(&name, datatype, &shape, bytes)?,
        (None, None) => {
            return Err(invalid(format!(
                "input '{name}' has no contents (and the request no raw_input_contents)"
            )))
        }
        (None, Some(contents)) => typed_data(&name, datatype, &shape, count, contents)?,
    };
    Ok(V2Input { name, shape, data })
}

/// Values of one protobuf `repeated` field as a little-endian tensor of `dtype`, each checked
/// to fit (an INT8 input's `int_contents` must hold values in -128..=127).
fn tensor_of<T: Copy + std::fmt::Display>(
    name: &str,
    dtype: DType,
    shape: &[usize],
    values: &[T],
    put: impl Fn(T, &mut Vec<u8>) -> bool,
) -> Result<V2Data, ApiError> {
    let mut data = Vec::with_capacity(values.len() * dtype.size());
    for (i, &v) in values.iter().enumerate() {
        if !put(v, &mut data) {
            return Err(invalid(format!(
                "input '{name}': element {i} ({v}) does not fit {dtype}"
            )));
        }
    }
    HostTensor::new(dtype, shape.to_vec(), data)
        .map(V2Data::Tensor)
        .map_err(|e| invalid(format!("input '{name}': {e}")))
}

/// The field a datatype's typed contents go in, as Triton's protocol names it.
fn contents_field(datatype: V2Type) -> &'static str {
    match datatype {
        V2Type::Bytes => "bytes_contents",
        V2Type::Tensor(d) => match d {
            DType::Bool => "bool_contents",
            DType::Int8 | DType::Int16 | DType::Int32 => "int_contents",
            DType::Int64 => "int64_contents",
            DType::Uint8 => "uint_contents",
            DType::Fp32 => "fp32_contents",
            DType::Fp64 => "fp64_contents",
            DType::Fp16 | DType::Bf16 => "raw_input_contents",
        },
    }
}

fn typed_data(
    name: &str,
    datatype: V2Type,
    shape: &[usize],
    count: usize,
    c: InferTensorContents,
) -> Result<V2Data, ApiError> {
    let field = contents_field(datatype);
    let given = [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ];
    if let Some((other, _)) = given.iter().find(|(f, n)| *n > 0 && *f != field) {
        return Err(invalid(format!(
            "input '{name}' of {} carries {other}; its values go in {field}",
            datatype.name()
        )));
    }
    let n = given.iter().map(|(_, n)| n).sum::<usize>();
    if n != count {
        return Err(invalid(format!(
            "input '{name}': shape {shape:?} has {count} elements, {field} has {n}"
        )));
    }
    let V2Type::Tensor(dtype) = datatype else {
        return Ok(V2Data::Bytes(c.bytes_contents));
    };
    let le = |b: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(b);
        true
    };
    match dtype {
        DType::Bool => tensor_of(name, dtype, shape, &c.bool_contents, |v, o| {
            o.push(v as u8);
            true
        }),
        DType::Int8 => tensor_of(name, dtype, shape, &c.int_contents, |v, o| {
            i8::try_from(v).is_ok_and(|v| le(&v.to_le_bytes(), o))
        }),
        DType::Int16 => tensor_of(name, dtype, shape, &c.int_contents, |v, o| {
            i16::try_from(v).is_ok_and(|v| le(&v.to_le_bytes(), o))
        }),
        DType::Int32 => tensor_of(name, dtype, shape, &c.int_contents, |v, o| {
            le(&v.to_le_bytes(), o)
        }),
        DType::Int64 => tensor_of(name, dtype, shape, &c.int64_contents, |v, o| {
            le(&v.to_le_bytes(), o)
        }),
        DType::Uint8 => tensor_of(name, dtype, shape, &c.uint_contents, |v, o| {
            u8::try_from(v).is_ok_and(|v| le(&[v], o))
        }),
        DType::Fp32 => tensor_of(name, dtype, shape, &c.fp32_contents, |v, o| {
            le(&v.to_le_bytes(), o)
        }),
        DType::Fp64 => tensor_of(name, dtype, shape, &c.fp64_contents, |v, o| {
            le(&v.to_le_bytes(), o)
        }),
        DType::Fp16 | DType::Bf16 => Err(invalid(format!(
            "input '{name}': {dtype} data go in raw_input_contents (protobuf has no 16-bit floats)"
        ))),
    }
}

/// The answer to a `ModelInferRequest`: every output's data in `raw_output_contents`, in the
/// order of `outputs`.
pub fn infer_response(
    model: &str,
    version: u64,
    id: String,
    outputs: Vec<V2Output>,
) -> ModelInferResponse {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for out in outputs {
        let (datatype, bytes) = match out.data {
            V2Data::Tensor(t) => (V2Type::Tensor(t.dtype), t.data),
            V2Data::Bytes(b) => (V2Type::Bytes, encode_bytes_elements(&b)),
        };
        tensors.push(InferOutputTensor {
            name: out.name,
            datatype: datatype.name().to_string(),
            shape: out.shape.iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents: None,
        });
        raw.push(bytes);
    }
    ModelInferResponse {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id,
        parameters: HashMap::new(),
        outputs: tensors,
        raw_output_contents: raw,
    }
}

fn tensor_metadata(t: &V2TensorMeta) -> model_metadata_response::TensorMetadata {
    model_metadata_response::TensorMetadata {
        name: t.name.clone(),
        datatype: t.datatype.name().to_string(),
        shape: t.metadata_shape(),
    }
}

/// `ModelMetadata`'s answer; `versions` as the HTTP route lists them.
pub fn metadata(model: &ServingModel, versions: Vec<String>) -> ModelMetadataResponse {
    ModelMetadataResponse {
        name: model.name.clone(),
        versions,
        platform: "pytorch_libtorch".into(),
        inputs: model
            .codec
            .v2_inputs()
            .iter()
            .map(tensor_metadata)
            .collect(),
        outputs: model
            .codec
            .v2_outputs()
            .iter()
            .map(tensor_metadata)
            .collect(),
    }
}

fn data_type(t: &V2TensorMeta) -> i32 {
    super::proto::DataType::from_str_name(&t.datatype.config_name())
        .unwrap_or(super::proto::DataType::TypeInvalid) as i32
}

/// Triton's model configuration, as `GET /v2/models/{m}/config` gives it in JSON.
pub fn config(model: &ServingModel, groups: Vec<(Option<u64>, usize)>) -> ModelConfig {
    let b = &model.spec.batching;
    let policy = match &model.spec.version_policy {
        VersionPolicy::Latest(n) => {
            model_version_policy::PolicyChoice::Latest(model_version_policy::Latest {
                num_versions: *n as u32,
            })
        }
        VersionPolicy::Specific(v) => {
            model_version_policy::PolicyChoice::Specific(model_version_policy::Specific {
                versions: v.iter().map(|&v| v as i64).collect(),
            })
        }
        VersionPolicy::All(_) => {
            model_version_policy::PolicyChoice::All(model_version_policy::All {})
        }
    };
    let instance_group = groups
        .into_iter()
        .map(|(gpu, count)| ModelInstanceGroup {
            name: model.name.clone(),
            kind: match gpu {
                Some(_) => model_instance_group::Kind::Gpu,
                None => model_instance_group::Kind::Cpu,
            } as i32,
            count: count as i32,
            gpus: gpu.map(|g| g as i32).into_iter().collect(),
            ..Default::default()
        })
        .collect();
    ModelConfig {
        name: model.name.clone(),
        platform: "pytorch_libtorch".into(),
        backend: "pytorch".into(),
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(policy),
        }),
        max_batch_size: b.max_batch_size as i32,
        input: model
            .codec
            .v2_inputs()
            .iter()
            .map(|t| ModelInput {
                name: t.name.clone(),
                data_type: data_type(t),
                dims: t.dims.clone(),
                ..Default::default()
            })
            .collect(),
        output: model
            .codec
            .v2_outputs()
            .iter()
            .map(|t| ModelOutput {
                name: t.name.clone(),
                data_type: data_type(t),
                dims: t.dims.clone(),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: Some(model_config::SchedulingChoice::DynamicBatching(
            ModelDynamicBatching {
                max_queue_delay_microseconds: (b.max_queue_delay_ms * 1000.0).round() as u64,
                default_queue_policy: Some(ModelQueuePolicy {
                    timeout_action: 0, // REJECT
                    default_timeout_microseconds: b.timeout_ms * 1000,
                    allow_timeout_override: true,
                    max_queue_size: b.queue_capacity as u32,
                }),
                ..Default::default()
            },
        )),
        instance_group,
        ..Default::default()
    }
}

fn duration(count: u64, ns: u64) -> Option<StatisticDuration> {
    Some(StatisticDuration { count, ns })
}

/// One model version's statistics, the same figures as the HTTP statistics extension.
pub fn statistics(model: &ServingModel) -> ModelStatistics {
    let s = model.stats();
    let (ok, ok_ns) = model.metrics.success.get();
    let (fail, fail_ns) = model.metrics.failure.get();
    let computed = s.inferred_items;
    ModelStatistics {
        name: model.name.clone(),
        version: model.version.to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inferred_rows,
        execution_count: s.forward_passes,
        inference_stats: Some(InferStatistics {
            success: duration(ok, ok_ns),
            fail: duration(fail, fail_ns),
            queue: duration(computed, s.queue_ns),
            compute_input: duration(computed, s.input_ns),
            compute_infer: duration(computed, s.infer_ns),
            compute_output: duration(computed, s.output_ns),
            cache_hit: duration(0, 0),
            cache_miss: duration(0, 0),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(datatype: &str, shape: Vec<i64>, contents: InferTensorContents) -> InferInputTensor {
        InferInputTensor {
            name: "x".into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents: Some(contents),
        }
    }

    #[test]
    fn typed_contents_become_little_endian_tensors() {
        let c = InferTensorContents {
            fp32_contents: vec![1.0, -2.5],
            ..Default::default()
        };
        let i = infer_input(input("FP32", vec![1, 2], c), None).unwrap();
        let V2Data::Tensor(t) = i.data else { panic!() };
        assert_eq!(t.to_f32_vec(), vec![1.0, -2.5]);
        let c = InferTensorContents {
            int_contents: vec![127, -128],
            ..Default::default()
        };
        let i = infer_input(input("INT8", vec![2], c), None).unwrap();
        let V2Data::Tensor(t) = i.data else { panic!() };
        assert_eq!(t.data, vec![127u8, 128u8]);
    }

    #[test]
    fn wrong_field_count_or_range_is_named() {
        let c = InferTensorContents {
            int_contents: vec![1, 2],
            ..Default::default()
        };
        let e = infer_input(input("FP32", vec![2], c), None).unwrap_err();
        assert!(e.to_string().contains("fp32_contents"), "{e}");
        let c = InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        };
        let e = infer_input(input("FP32", vec![2], c), None).unwrap_err();
        assert!(e.to_string().contains("2 elements"), "{e}");
        let c = InferTensorContents {
            int_contents: vec![300],
            ..Default::default()
        };
        let e = infer_input(input("INT8", vec![1], c), None).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let e = infer_input(
            input("FP32", vec![-1], InferTensorContents::default()),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
    }

    #[test]
    fn raw_contents_follow_the_binary_layout() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&3u32.to_le_bytes());
        raw.extend_from_slice(b"abc");
        let i = InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            parameters: HashMap::new(),
            contents: None,
        };
        let i = infer_input(i, Some(&raw)).unwrap();
        assert_eq!(i.data, V2Data::Bytes(vec![b"abc".to_vec()]));
        let msg = ModelInferRequest {
            inputs: vec![input("FP32", vec![1], InferTensorContents::default())],
            raw_input_contents: vec![vec![0; 4], vec![0; 4]],
            ..Default::default()
        };
        let e = infer_request(msg).unwrap_err();
        assert!(e.to_string().contains("2 entries for 1 inputs"), "{e}");
    }
}
