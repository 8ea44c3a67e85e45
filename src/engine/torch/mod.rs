//! The libtorch engine: loads a TorchScript module onto a device, in the model's precision, and
//! runs forward passes. `glue` holds the few libtorch calls tch does not expose.

pub mod decoder;
mod glue;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use tch::{CModule, Device, IValue, Kind, Tensor};

use super::{
    DecoderKv, Engine, EngineError, EngineFactory, GpuMemory, LoadedDecoder, LoadedEngine,
    RuntimeInfo,
};
use crate::config::model_spec::{ModelSpec, Placed, Precision};
use crate::tensor::{DType, HostTensor};

/// libtorch version this binary was built against (from the build script).
pub const TORCH_VERSION: &str = env!("AIAAS_TORCH_VERSION");

pub fn runtime_info() -> RuntimeInfo {
    RuntimeInfo {
        torch_version: TORCH_VERSION,
        cuda_devices: visible_gpus(),
    }
}

/// CUDA devices libtorch sees.
fn visible_gpus() -> usize {
    tch::Cuda::device_count().max(0) as usize
}

/// Sizes libtorch's inter-op thread pool. The pool is process-wide (one per server, not per
/// model) and runs TorchScript `fork`ed work, which traced models do not use; each instance's
/// intra-op threads are set per model instead. Call once at start-up, before any model loads;
/// `0` keeps libtorch's default (one thread per core, started only when first needed).
pub fn set_interop_threads(n: usize) {
    if n > 0 {
        tch::set_num_interop_threads(n.min(i32::MAX as usize) as i32);
    }
}

/// libtorch's inter-op pool size as configured.
pub fn interop_threads() -> usize {
    tch::get_num_interop_threads().max(0) as usize
}

/// A resolved device: what the model runs on and its display name (`cpu`, `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedDevice(Device);

impl ResolvedDevice {
    pub fn cpu() -> Self {
        Self(Device::Cpu)
    }
}

impl From<Placed> for ResolvedDevice {
    fn from(p: Placed) -> Self {
        match p {
            Placed::Cpu => Self(Device::Cpu),
            Placed::Cuda(n) => Self(Device::Cuda(n)),
        }
    }
}

impl std::fmt::Display for ResolvedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Mps => f.write_str("mps"),
            Device::Vulkan => f.write_str("vulkan"),
            _ => f.write_str("cpu"),
        }
    }
}

/// The libtorch runtime: each instance loads the model's TorchScript file onto its device.
#[derive(Debug, Clone, Copy, Default)]
pub struct TorchEngines;

impl EngineFactory for TorchEngines {
    fn load(&self, spec: &ModelSpec, index: usize) -> Result<LoadedEngine, EngineError> {
        let device: ResolvedDevice = spec
            .instance_device(index, visible_gpus())
            .map_err(|m| EngineError::Device(spec.device.to_string(), m))?
            .into();
        let options = EngineOptions {
            intra_op_threads: Some(intra_op_threads(spec)),
            channels_last: spec.channels_last(),
            precision: spec.precision,
            output_dtypes: spec.outputs.iter().map(|o| o.datatype).collect(),
        };
        let engine = TorchEngine::load(&spec.file, device, options)?;
        Ok(LoadedEngine {
            engine: Box::new(engine),
            device: device.to_string(),
        })
    }

    fn load_decoder(
        &self,
        spec: &ModelSpec,
        dir: &Path,
        kv: DecoderKv,
    ) -> Result<LoadedDecoder, EngineError> {
        let device: ResolvedDevice = spec
            .instance_device(0, visible_gpus())
            .map_err(|m| EngineError::Device(spec.device.to_string(), m))?
            .into();
        let decoder = decoder::TorchDecoder::load(
            dir,
            decoder::DecoderOptions {
                precision: spec.precision,
                device,
                block_size: kv.block_size,
                kv_blocks: kv.blocks,
                max_context: kv.max_context,
                quantization: kv.quantization,
                intra_op_threads: Some(intra_op_threads(spec)),
            },
        )?;
        Ok(LoadedDecoder {
            decoder: Box::new(decoder),
            device: device.to_string(),
        })
    }

    fn visible_gpus(&self) -> usize {
        visible_gpus()
    }

    fn memory_in_use(&self, device: &str) -> Option<u64> {
        let n = device.strip_prefix("cuda:")?.parse().ok()?;
        glue::cuda_memory(n).map(|(allocated, _)| allocated)
    }

    fn gpu_memory(&self) -> Vec<GpuMemory> {
        (0..visible_gpus())
            .filter_map(|n| {
                glue::cuda_memory(n).map(|(allocated, reserved)| GpuMemory {
                    device: format!("cuda:{n}"),
                    allocated,
                    reserved,
                })
            })
            .collect()
    }
}

/// Threads per engine instance: as configured, else the cores shared out between the instances
/// (more threads than cores make libtorch's parallel regions wait on each other).
fn intra_op_threads(spec: &ModelSpec) -> usize {
    if spec.intra_op_threads > 0 {
        return spec.intra_op_threads;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / spec.instances).max(1)
}

/// How an engine instance runs its module.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// libtorch intra-op threads on the forward thread (`None`: libtorch's default).
    pub intra_op_threads: Option<usize>,
    /// Feed 4-D inputs in channels-last memory format (NHWC strides): oneDNN convolutions and
    /// the vectorised max-pooling kernel are much faster so on CPU, with identical results.
    pub channels_last: bool,
    /// The precision the module's floating state and floating inputs are cast to at load.
    pub precision: Precision,
    /// The declared type of each output: a floating output of a reduced-precision module is
    /// answered in its declared floating type, else FP32.
    pub output_dtypes: Vec<DType>,
}

/// One loaded copy of a TorchScript module on one device.
pub struct TorchEngine {
    module: CModule,
    device: Device,
    transfer: Transfer,
    /// The kind floating inputs are cast to; `None` at fp32 (inputs go in as they come).
    input_kind: Option<Kind>,
    /// Reduced precision through autocast: on once a forward failed on a dtype the graph fixes.
    autocast: bool,
    options: EngineOptions,
    /// The thread the per-thread settings were applied on (warm-up runs on a loading thread,
    /// requests on the engine's own).
    configured_on: Option<std::thread::ThreadId>,
}

/// How a batch reaches the device, chosen once per engine: the one place where the CPU and
/// the GPU paths part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    /// The CPU computes on the host tensor itself.
    Host,
    /// A GPU: the batch is copied once into pinned (page-locked) host memory and from there to
    /// the device without blocking, on the engine's own CUDA stream (from libtorch's pool; the
    /// thread's current stream otherwise), made current for each forward pass whichever thread
    /// runs it; the outputs come back in one blocking copy each, which waits for the stream.
    Pinned { device: usize, stream: Option<i64> },
}

impl TorchEngine {
    /// Loads `path` onto `device`, in eval mode, its floating state cast to the precision
    /// asked for. The thread count is applied on the thread that runs the forward passes
    /// (libtorch keeps it per thread).
    pub fn load(
        path: &Path,
        device: ResolvedDevice,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let load_err = |message: String| EngineError::Load {
            path: path.display().to_string(),
            message,
        };
        if !path.is_file() {
            return Err(load_err("file not found".into()));
        }
        if options.precision == Precision::Fp16 && device.0 == Device::Cpu {
            return Err(load_err(
                "precision fp16 needs a CUDA device: the CPU has no half-precision arithmetic (libtorch emulates it, a convolution 7x slower than fp32, and some operators have none); use bf16 or fp32 on the CPU".into(),
            ));
        }
        let mut module = catch_unwind(|| CModule::load_on_device(path, device.0))
            .map_err(|_| load_err("libtorch panicked while loading".into()))?
            .map_err(|e| load_err(first_line(&e.to_string())))?;
        module.f_set_eval().map_err(|e| load_err(e.to_string()))?;
        let input_kind = match options.precision {
            Precision::Fp32 => None,
            p => Some(kind_of(p.dtype())),
        };
        if let Some(kind) = input_kind {
            glue::cast_floating(&mut module, kind).map_err(|e| {
                load_err(format!(
                    "cannot cast to {}: {}",
                    options.precision,
                    first_line(&e)
                ))
            })?;
            if let Device::Cuda(n) = device.0 {
                // the casts were queued on this thread's stream; the engine's own stream does
                // not wait for it
                glue::cuda_synchronize(n);
            }
        }
        let transfer = match device.0 {
            Device::Cuda(n) => Transfer::Pinned {
                device: n,
                stream: glue::cuda_pool_stream(n),
            },
            _ => Transfer::Host,
        };
        Ok(Self {
            module,
            device: device.0,
            transfer,
            input_kind,
            autocast: false,
            options,
            configured_on: None,
        })
    }

    /// Once per thread that runs forward passes: libtorch's intra-op thread count, which it
    /// keeps per thread.
    fn configure_thread(&mut self) {
        let me = std::thread::current().id();
        if self.configured_on == Some(me) {
            return;
        }
        if let Some(n) = self.options.intra_op_threads {
            tch::set_num_threads(n as i32);
        }
        self.configured_on = Some(me);
    }

    /// The engine's own CUDA stream as the current one for one forward pass, so that engines
    /// sharing a GPU overlap their copies and kernels.
    fn stream_guard(&self) -> Option<glue::StreamGuard> {
        match self.transfer {
            Transfer::Pinned {
                device,
                stream: Some(id),
            } => glue::StreamGuard::on(device, id),
            _ => None,
        }
    }

    /// Autocast for one forward pass, where this engine runs under it.
    fn autocast_guard(&self) -> Option<glue::Autocast> {
        match (self.autocast, self.input_kind) {
            (true, Some(kind)) => glue::Autocast::on(matches!(self.device, Device::Cuda(_)), kind),
            _ => None,
        }
    }

    /// The forward pass on the module; a reduced-precision module whose graph fixes a floating
    /// dtype somewhere (a traced `.float()`, `sum(dtype=float32)`) fails on mixed types: it is
    /// retried once under autocast, which stays on for this engine once that works.
    fn run(&mut self, inputs: &[IValue]) -> Result<IValue, EngineError> {
        let forward = |engine: &Self| {
            let _autocast = engine.autocast_guard();
            engine.module.forward_is(inputs).map_err(forward_error)
        };
        match forward(self) {
            Err(EngineError::Forward(m))
                if !self.autocast && self.input_kind.is_some() && mixed_types(&m) =>
            {
                self.autocast = true;
                let retried = forward(self);
                if retried.is_ok() {
                    tracing::warn!(
                        precision = %self.options.precision,
                        "the model's graph fixes a floating type ({m}); running it under autocast"
                    );
                } else {
                    self.autocast = false;
                }
                retried
            }
            other => other,
        }
    }

    /// An input on the device, in the module's precision and memory format.
    fn input(&self, t: &HostTensor) -> Result<Tensor, EngineError> {
        let mut tensor = match self.transfer {
            Transfer::Host => to_tensor(t)?,
            Transfer::Pinned { .. } => to_device_pinned(t, self.device)?,
        };
        if let Some(kind) = self.input_kind {
            if t.dtype.is_float() && kind_of(t.dtype) != kind {
                tensor = tensor.f_to_kind(kind).map_err(forward_error)?;
            }
        }
        if self.options.channels_last && t.shape.len() == 4 {
            tensor = channels_last(&tensor)?;
        }
        Ok(tensor)
    }

    /// Output `index` as answered: a reduced-precision module's floating outputs in their
    /// declared floating type, else FP32.
    fn output(&self, index: usize, t: Tensor) -> Result<Tensor, EngineError> {
        if self.input_kind.is_none() || !t.is_floating_point() {
            return Ok(t);
        }
        let want = match self.options.output_dtypes.get(index) {
            Some(d) if d.is_float() => kind_of(*d),
            _ => Kind::Float,
        };
        if t.kind() == want {
            return Ok(t);
        }
        t.f_to_kind(want)
            .map_err(|e| EngineError::Output(first_line(&e.to_string())))
    }

    /// The forward pass; [`Engine::forward`] wraps it so that a libtorch panic is an error.
    fn forward_unguarded(
        &mut self,
        inputs: Vec<HostTensor>,
    ) -> Result<Vec<HostTensor>, EngineError> {
        self.configure_thread();
        let _stream = self.stream_guard();
        let _guard = tch::no_grad_guard();
        let ivalues = inputs
            .iter()
            .map(|t| self.input(t).map(IValue::Tensor))
            .collect::<Result<Vec<_>, _>>()?;
        let out = self.run(&ivalues)?;
        collect_outputs(out)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| from_tensor(&self.output(i, t)?))
            .collect()
    }
}

impl Engine for TorchEngine {
    fn forward(&mut self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError> {
        catch_unwind(AssertUnwindSafe(|| self.forward_unguarded(inputs)))
            .unwrap_or_else(|_| Err(EngineError::Forward("libtorch panicked".into())))
            .map_err(|e| device_failure(&ResolvedDevice(self.device).to_string(), e))
    }
}

/// Whether libtorch's message says two floating types met where one was expected (`mat1 and
/// mat2 must have the same dtype, but got Float and BFloat16`, `Input type (float) and bias
/// type (c10::BFloat16) should be the same`, `expected scalar type BFloat16 but found Float`).
fn mixed_types(message: &str) -> bool {
    let mismatch = ["same dtype", "expected scalar type", "should be the same"]
        .iter()
        .any(|m| message.contains(m));
    let reduced = ["BFloat16", "Half"].iter().any(|t| message.contains(t));
    mismatch && reduced
}

/// libtorch's messages for a device that ran out of memory or stopped working, as opposed to
/// an input the model cannot take.
const DEVICE_FAILURES: &[&str] = &[
    "out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "CUDA error",
    "CUDA driver error",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "no CUDA GPUs are available",
    "ECC error",
];

/// A forward error that says the device failed becomes [`EngineError::DeviceFailed`].
fn device_failure(device: &str, e: EngineError) -> EngineError {
    match e {
        EngineError::Forward(message) if DEVICE_FAILURES.iter().any(|m| message.contains(m)) => {
            EngineError::DeviceFailed {
                device: device.to_string(),
                message,
            }
        }
        other => other,
    }
}

/// A libtorch error in a forward pass, its reason only.
fn forward_error(e: tch::TchError) -> EngineError {
    EngineError::Forward(first_line(&e.to_string()))
}

/// libtorch's messages carry a C++ backtrace after the first line; clients need only the reason.
/// A TorchScript interpreter error's first line only says that an operation failed: its reason
/// is the last `...Error: ` line of the TorchScript traceback.
fn first_line(message: &str) -> String {
    let first = message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim();
    if first.contains("failed in the TorchScript interpreter") {
        if let Some(reason) = message
            .lines()
            .rfind(|l| !l.starts_with(' ') && l.contains("Error: "))
        {
            return format!("{first} {}", reason.trim());
        }
    }
    first.to_string()
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::Bool => Kind::Bool,
        DType::Uint8 => Kind::Uint8,
        DType::Int8 => Kind::Int8,
        DType::Int16 => Kind::Int16,
        DType::Int32 => Kind::Int,
        DType::Int64 => Kind::Int64,
        DType::Fp16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
        DType::Fp32 => Kind::Float,
        DType::Fp64 => Kind::Double,
    }
}

fn dtype_of(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Bool => DType::Bool,
        Kind::Uint8 => DType::Uint8,
        Kind::Int8 => DType::Int8,
        Kind::Int16 => DType::Int16,
        Kind::Int => DType::Int32,
        Kind::Int64 => DType::Int64,
        Kind::Half => DType::Fp16,
        Kind::BFloat16 => DType::Bf16,
        Kind::Float => DType::Fp32,
        Kind::Double => DType::Fp64,
        _ => return None,
    })
}

/// A host tensor as a CPU tensor (libtorch copies the bytes: `HostTensor` data has no alignment
/// guarantee that kernels could rely on).
fn to_tensor(t: &HostTensor) -> Result<Tensor, EngineError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(&t.data, &shape, kind_of(t.dtype)).map_err(forward_error)
}

/// A host tensor on a GPU: its bytes copied once into pinned host memory, then to the device
/// without blocking the thread (libtorch's pinned-memory pool keeps the buffer from reuse until
/// the copy is done). Falls back to an ordinary copy where pinned memory cannot be had.
fn to_device_pinned(t: &HostTensor, device: Device) -> Result<Tensor, EngineError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let kind = kind_of(t.dtype);
    let host = match glue::empty_pinned(&shape, kind) {
        Some(pinned) if pinned.numel() * t.dtype.size() == t.data.len() => {
            if !t.data.is_empty() {
                // SAFETY: a fresh contiguous tensor of exactly t.data.len() bytes (same shape
                // and element type as the host tensor), written before anything reads it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        t.data.as_ptr(),
                        pinned.data_ptr().cast::<u8>(),
                        t.data.len(),
                    );
                }
            }
            pinned
        }
        // no pinned memory, or a host tensor whose bytes do not fill its shape (which
        // from_data_size refuses with the reason)
        _ => to_tensor(t)?,
    };
    host.f_to_device_(device, kind, true, false)
        .map_err(forward_error)
}

/// The same NCHW tensor with NHWC strides (what `memory_format=torch.channels_last` gives).
fn channels_last(t: &Tensor) -> Result<Tensor, EngineError> {
    t.f_permute([0, 2, 3, 1])
        .and_then(|p| p.f_contiguous())
        .and_then(|p| p.f_permute([0, 3, 1, 2]))
        .map_err(forward_error)
}

fn collect_outputs(out: IValue) -> Result<Vec<Tensor>, EngineError> {
    match out {
        IValue::Tensor(t) => Ok(vec![t]),
        IValue::TensorList(ts) => Ok(ts),
        IValue::Tuple(items) | IValue::GenericList(items) => items
            .into_iter()
            .map(|i| match i {
                IValue::Tensor(t) => Ok(t),
                other => Err(EngineError::Output(format!(
                    "expected tensors, got {}",
                    ivalue_kind(&other)
                ))),
            })
            .collect(),
        other => Err(EngineError::Output(format!(
            "expected a tensor or a tuple of tensors, got {}",
            ivalue_kind(&other)
        ))),
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "Tensor",
        IValue::Double(_) => "float",
        IValue::Int(_) => "int",
        IValue::Bool(_) => "bool",
        IValue::Tuple(_) => "tuple",
        IValue::String(_) => "str",
        IValue::GenericDict(_) => "dict",
        _ => "a list or object",
    }
}

fn from_tensor(t: &Tensor) -> Result<HostTensor, EngineError> {
    let err = |e: tch::TchError| EngineError::Output(first_line(&e.to_string()));
    let kind = t.f_kind().map_err(err)?;
    let dtype = dtype_of(kind)
        .ok_or_else(|| EngineError::Output(format!("unsupported output dtype {kind:?}")))?;
    let t = t
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(err)?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel: usize = shape.iter().product();
    let mut data = vec![0u8; numel * dtype.size()];
    if numel > 0 {
        t.f_copy_data_u8(&mut data, numel).map_err(err)?;
    }
    HostTensor::new(dtype, shape, data).map_err(|e| EngineError::Output(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::{device_failure, first_line, EngineError};

    #[test]
    fn device_failures_are_told_from_bad_inputs() {
        let oom =
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)";
        let lost = "CUDA error: unspecified launch failure";
        for message in [
            oom,
            lost,
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes",
        ] {
            let e = device_failure("cuda:0", EngineError::Forward(message.into()));
            assert!(e.is_device_failure(), "{e}");
            assert!(e.to_string().starts_with("device cuda:0 failed: "), "{e}");
        }
        let shape = "mat1 and mat2 shapes cannot be multiplied (1x3 and 4x5)";
        let e = device_failure("cuda:0", EngineError::Forward(shape.into()));
        assert!(!e.is_device_failure(), "{e}");
    }

    #[test]
    fn only_mixed_floating_types_call_for_autocast() {
        for message in [
            "RuntimeError: mat1 and mat2 must have the same dtype, but got Float and BFloat16",
            "Input type (float) and bias type (c10::BFloat16) should be the same",
            "expected scalar type Half but found Float",
        ] {
            assert!(super::mixed_types(message), "{message}");
        }
        for message in [
            "expected scalar type Long but found Int",
            "mat1 and mat2 shapes cannot be multiplied (1x3 and 4x5)",
        ] {
            assert!(!super::mixed_types(message), "{message}");
        }
    }

    #[test]
    fn a_torchscript_error_keeps_its_reason() {
        let message = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript, serialized code (most recent call last):\n  File \"code/__torch__.py\", line 6, in forward\n    _0 = torch._convolution(x)\n         ~~~~ <--- HERE\n\nTraceback of TorchScript, original code (most recent call last):\nRuntimeError: expected scalar type BFloat16 but found Float\n";
        assert_eq!(
            first_line(message),
            "The following operation failed in the TorchScript interpreter. RuntimeError: expected scalar type BFloat16 but found Float"
        );
        assert_eq!(
            first_line("\nshape mismatch\nException raised from foo at bar.cpp:1"),
            "shape mismatch"
        );
    }
}
