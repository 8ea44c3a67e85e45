//! KServe Open Inference Protocol (v2) tensors: [`wire`] parses requests (JSON data and the
//! binary tensor extension) and encodes responses; [`mapping`] checks a request's inputs
//! against the model's v2 inputs (its adapter maps them to model inputs) and says what a
//! model's v2 tensors are.

mod mapping;
mod wire;

pub use self::mapping::V2TensorMeta;
pub use self::wire::{
    binary_data, encode_bytes_elements, encode_response, parse_bytes_elements, parse_request,
    parse_shape, RequestedOutput, V2Data, V2Input, V2Output, V2Request, V2Type,
};
