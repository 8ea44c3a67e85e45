//! Model execution. [`Engine`] is the whole contract between the batcher and a model runtime:
//! a synchronous forward pass over host tensors. [`torch`] is the libtorch implementation and the
//! only module in the crate that touches `tch`.

pub mod torch;

pub use torch::decoder::{
    DecodeInput, Decoder, DecoderConfig, DecoderOptions, Family, KvGeometry, Logits, PrefillInput,
    TorchDecoder,
};

/// Weight-only quantization of a decoder's linear layers (the embeddings and the output head
/// stay in the model's precision), computed at load from the checkpoint's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Symmetric int8, one scale per output channel.
    Int8,
    /// Asymmetric 4-bit, a scale and a zero point per `group_size` inputs of each output
    /// channel.
    Int4 { group_size: usize },
}

impl Quantization {
    /// The group sizes int4 accepts (libtorch's packed kernels take these).
    pub const INT4_GROUP_SIZES: [usize; 4] = [32, 64, 128, 256];

    /// Bytes a quantized `[out, inp]` weight takes (the packed values, their scales and
    /// zeros), for the memory budget.
    pub fn weight_bytes(&self, out: usize, inp: usize) -> u64 {
        let (out, inp) = (out as u64, inp as u64);
        match *self {
            // int8 values and a bf16 scale per output
            Quantization::Int8 => out * inp + 2 * out,
            // two values a byte and a bf16 scale and zero per group
            Quantization::Int4 { group_size } => {
                out * inp / 2 + 4 * out * inp.div_ceil(group_size as u64)
            }
        }
    }
}

impl Quantization {
    /// The setting's name: "int8" or "int4".
    pub fn name(&self) -> &'static str {
        match self {
            Quantization::Int8 => "int8",
            Quantization::Int4 { .. } => "int4",
        }
    }

    /// The int4 group size; `None` for int8.
    pub fn group_size(&self) -> Option<usize> {
        match *self {
            Quantization::Int8 => None,
            Quantization::Int4 { group_size } => Some(group_size),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quantization::Int8 => f.write_str("int8"),
            Quantization::Int4 { group_size } => write!(f, "int4 (groups of {group_size})"),
        }
    }
}

use crate::config::model_spec::ModelSpec;
use crate::tensor::HostTensor;

/// Runs one batched forward pass. Implementations are driven from a dedicated OS thread and may
/// block; they never see HTTP or queues.
pub trait Engine: Send + 'static {
    /// `inputs` follow the model's input order, each with the batch as its leading dimension.
    /// Returns the outputs in the model's output order, each with the same leading dimension.
    fn forward(&mut self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError>;
}

/// Builds a model's engine instances: the registry's one way to a runtime, so that tests can
/// stand a fake in for libtorch ([`torch::TorchEngines`] is the real one) and a second runtime
/// could join without touching the load path.
pub trait EngineFactory: Send + Sync + 'static {
    /// Loads instance `index` of the model `spec` describes.
    fn load(&self, spec: &ModelSpec, index: usize) -> Result<LoadedEngine, EngineError>;

    /// Loads a generative model's decoder from its checkpoint folder `dir`, with a KV pool of
    /// `kv.blocks` blocks (text-generation models; a runtime without decoders refuses).
    fn load_decoder(
        &self,
        spec: &ModelSpec,
        dir: &std::path::Path,
        kv: DecoderKv,
    ) -> Result<LoadedDecoder, EngineError> {
        let _ = (spec, kv);
        Err(EngineError::Load {
            path: dir.display().to_string(),
            message: "this runtime does not run generative models".into(),
        })
    }

    /// CUDA devices the runtime sees (none by default: a runtime without CUDA).
    fn visible_gpus(&self) -> usize {
        0
    }

    /// The device the model's first instance will run on (`cpu`, `cuda:0`), known before
    /// loading so that room can be made for the model in that device's memory budget.
    fn device(&self, spec: &ModelSpec) -> String {
        spec.instance_device(0, self.visible_gpus())
            .map_or_else(|_| spec.device.to_string(), |d| d.to_string())
    }

    /// Every device the model's instances will run on, each once, first instance's first.
    fn devices(&self, spec: &ModelSpec) -> Vec<String> {
        let mut devices = vec![self.device(spec)];
        for index in 1..spec.instances {
            if let Ok(d) = spec.instance_device(index, self.visible_gpus()) {
                let d = d.to_string();
                if !devices.contains(&d) {
                    devices.push(d);
                }
            }
        }
        devices
    }

    /// Bytes the runtime holds on `device` now, where it keeps its own count (a CUDA caching
    /// allocator). `None`: the registry measures the process's heap in use for the CPU
    /// and estimates other devices from the model file's size.
    fn memory_in_use(&self, _device: &str) -> Option<u64> {
        None
    }

    /// Each GPU's allocator bytes, for the `aiaas_gpu_memory_bytes` gauges; empty without GPUs.
    fn gpu_memory(&self) -> Vec<GpuMemory> {
        Vec::new()
    }
}

/// What a GPU's caching allocator holds: bytes in tensors, and bytes taken from the driver
/// (in tensors plus cached for reuse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMemory {
    pub device: String,
    pub allocated: u64,
    pub reserved: u64,
}

/// A decoder's KV pool, context and weight quantization, as the model's settings ask.
#[derive(Debug, Clone, Copy)]
pub struct DecoderKv {
    pub block_size: usize,
    pub blocks: usize,
    /// The longest sequence; `None`: the checkpoint's.
    pub max_context: Option<usize>,
    /// The linear layers' quantization; `None`: the model's precision.
    pub quantization: Option<Quantization>,
}

/// A loaded decoder and the device it runs on.
pub struct LoadedDecoder {
    pub decoder: Box<dyn Decoder>,
    pub device: String,
}

/// One engine instance and the device it runs on (`cpu`, `cuda:0`).
pub struct LoadedEngine {
    pub engine: Box<dyn Engine>,
    pub device: String,
}

/// Why a model could not be loaded or could not run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load {path}: {message}")]
    Load { path: String, message: String },
    #[error("device {0} is not available: {1}")]
    Device(String, String),
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("model output is unusable: {0}")]
    Output(String),
    /// The device ran out of memory or stopped working (a lost GPU, a CUDA error that poisons
    /// its context): the batch fails, and the model with it until it is loaded again.
    #[error("device {device} failed: {message}")]
    DeviceFailed { device: String, message: String },
}

impl EngineError {
    /// Whether the device, not the input, failed.
    pub fn is_device_failure(&self) -> bool {
        matches!(self, EngineError::DeviceFailed { .. })
    }
}

/// Facts about the runtime, for logs, metadata and build info.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeInfo {
    pub torch_version: &'static str,
    pub cuda_devices: usize,
}
