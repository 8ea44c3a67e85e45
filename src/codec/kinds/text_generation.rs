//! `text-generation`: a decoder-only language model from a Hugging Face checkpoint, served
//! through OpenAI's chat and completions routes by its scheduler (`generate`), not through the
//! batch queue. Its one table, `[generation]`, is [`GenerationSettings`]; everything else comes
//! from the checkpoint. Its v2 metadata names Triton's generate tensors (`text_input`,
//! `text_output`, BYTES); /v1 predict and v2 infer refuse it with the routes to use.

use serde::Deserialize;
use serde_json::Value;

use super::{tables, Declaration, Declared, Kind, ModelAdapter};
use crate::codec::v2::{V2Input, V2TensorMeta, V2Type};
use crate::codec::{CodecError, Instance, OutputOptions};
use crate::config::model_spec::{ModelSpec, Signature, TensorSpec};
use crate::generate::settings::GenerationSettings;
use crate::tensor::{DType, Inferred, Item};

pub const KIND: Kind = Kind {
    name: "text-generation",
    declare,
    adapter: |spec, _| Ok(Box::new(TextGeneration::new(spec))),
};

/// The model.toml tables of a text-generation model.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    #[serde(default)]
    generation: GenerationSettings,
}

/// The model's `[generation]` settings, checked.
pub fn generation_settings(spec: &ModelSpec) -> Result<GenerationSettings, String> {
    let t: Tables = tables(spec)?;
    t.generation.check()?;
    Ok(t.generation)
}

/// The checkpoint folder: `[generation] checkpoint`, else the model's version folder.
pub fn checkpoint_dir(spec: &ModelSpec, settings: &GenerationSettings) -> std::path::PathBuf {
    spec.resolve(
        settings
            .checkpoint
            .as_deref()
            .unwrap_or(std::path::Path::new(".")),
    )
}

fn declare(spec: &ModelSpec, d: Declared) -> Result<Declaration, String> {
    generation_settings(spec)?;
    if spec.instances != 1 {
        return Err(format!(
            "instances = {}: a text-generation model runs one decoder, whose scheduler batches every sequence (more copies would only split the cores)",
            spec.instances
        ));
    }
    if d.inputs.is_some() || d.outputs.is_some() {
        return Err(
            "a text-generation model declares no tensors: its checkpoint says what it is".into(),
        );
    }
    // token ids in and out: what the generate tensors carry, as the tensor table holds them
    Ok(Declaration {
        signature: Signature::new(
            vec![TensorSpec::new("text_input", DType::Uint8, vec![-1])],
            vec![TensorSpec::new("text_output", DType::Uint8, vec![-1])],
        ),
        ..Declaration::default()
    })
}

pub struct TextGeneration {
    name: String,
    signature: Signature,
}

impl TextGeneration {
    fn new(spec: &ModelSpec) -> Self {
        Self {
            name: spec.name.clone(),
            signature: spec.signature(),
        }
    }

    fn elsewhere(&self) -> CodecError {
        CodecError::Invalid(format!(
            "'{}' is a text-generation model: use POST /v1/chat/completions or /v1/completions, or ModelInfer / ModelStreamInfer over gRPC",
            self.name
        ))
    }
}

impl ModelAdapter for TextGeneration {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn decode_instance(&self, _instance: &Instance) -> Result<Item, CodecError> {
        Err(self.elsewhere())
    }

    fn encode_prediction(&self, _result: &Inferred, _opts: OutputOptions) -> Value {
        Value::Null
    }

    /// Triton's inputs of a generative model (its vLLM backend's): the prompt, and the
    /// optional streaming flag, sampling parameters (JSON) and whether to leave the prompt out
    /// of the answer. KServe v2 over gRPC serves them (`grpc/generate.rs`).
    fn v2_inputs(&self) -> Vec<V2TensorMeta> {
        let input = |name: &str, datatype| V2TensorMeta {
            name: name.into(),
            datatype,
            dims: vec![1],
        };
        vec![
            input("text_input", V2Type::Bytes),
            input("stream", V2Type::Tensor(DType::Bool)),
            input("sampling_parameters", V2Type::Bytes),
            input("exclude_input_in_output", V2Type::Tensor(DType::Bool)),
        ]
    }

    fn v2_outputs(&self) -> Vec<V2TensorMeta> {
        vec![V2TensorMeta {
            name: "text_output".into(),
            datatype: V2Type::Bytes,
            dims: vec![1],
        }]
    }

    fn decode_v2(&self, _inputs: Vec<V2Input>) -> Result<(Vec<Item>, usize), CodecError> {
        Err(self.elsewhere())
    }
}
