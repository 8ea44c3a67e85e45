//! Model execution. [`Engine`] is the whole contract between the batcher and a model runtime:
//! a synchronous forward pass over host tensors. [`torch`] is the libtorch implementation and the
//! only module in the crate that touches `tch`.

pub mod torch;

pub use torch::decoder::{
    DecodeInput, Decoder, DecoderConfig, DecoderOptions, Family, KvGeometry, Logits, PrefillInput,
    TorchDecoder,
};

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

/// A decoder's KV pool and context, as the model's settings ask.
#[derive(Debug, Clone, Copy)]
pub struct DecoderKv {
    pub block_size: usize,
    pub blocks: usize,
    /// The longest sequence; `None`: the checkpoint's.
    pub max_context: Option<usize>,
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
