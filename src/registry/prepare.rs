//! Loading one model version: parse its spec, load every engine instance, warm each up and check
//! its outputs against the declared signature. Blocking work, run off the async workers.

use std::time::{Duration, Instant};

use super::RegistrySettings;
use crate::batcher::BatchConfig;
use crate::codec::ModelCodec;
use crate::config::model_spec::ModelSpec;
use crate::engine::torch::{resolve_device, EngineOptions, TorchEngine};
use crate::engine::{Engine, EngineError};
use crate::repository::VersionSource;

/// A model version loaded and warmed up, before its queue starts.
pub(super) struct Prepared {
    pub spec: ModelSpec,
    pub codec: ModelCodec,
    pub engines: Vec<Box<dyn Engine>>,
    pub batch_config: BatchConfig,
    pub device: String,
    pub load_time: Duration,
    pub warmup_time: Duration,
}

/// Parses the spec, loads every engine instance and warms each up: blocking work.
pub(super) fn prepare(
    name: &str,
    config: &std::path::Path,
    v: &VersionSource,
    settings: &RegistrySettings,
) -> Result<Prepared, String> {
    let started = Instant::now();
    let spec = ModelSpec::load(name, config, &v.dir).map_err(|e| e.to_string())?;
    let codec = ModelCodec::new(&spec, settings.image_limits, settings.max_text_bytes)?;
    let device = resolve_device(spec.device).map_err(|e| e.to_string())?;
    let mut engines: Vec<Box<dyn Engine>> = Vec::with_capacity(spec.instances);
    for _ in 0..spec.instances {
        let options = EngineOptions {
            intra_op_threads: intra_op_threads(&spec),
            channels_last: spec.channels_last,
        };
        let engine = TorchEngine::load(&spec.file, device, options).map_err(|e| e.to_string())?;
        engines.push(Box::new(engine));
    }
    let load_time = started.elapsed();
    let warm = Instant::now();
    for engine in &mut engines {
        for rows in [1, spec.batching.max_batch_size] {
            let var_len = spec.text.as_ref().map_or(8, |t| t.max_length.min(16));
            let item = codec.warmup_item(rows, var_len);
            let outputs = engine
                .forward(item.inputs)
                .map_err(|e| format!("warm-up at batch {rows} failed: {e}"))?;
            check_outputs(&spec, &outputs, rows).map_err(|e| e.to_string())?;
        }
    }
    let batch_config = BatchConfig {
        model: name.to_string(),
        max_batch_size: spec.batching.max_batch_size,
        max_queue_delay: spec.batching.max_queue_delay(),
        queue_capacity: spec.batching.queue_capacity,
        pad_values: spec.inputs.iter().map(|i| i.pad_value).collect(),
        latency_target: spec.batching.latency_target(),
        poll_window: settings.idle_polling.window(),
    };
    Ok(Prepared {
        device: device.to_string(),
        warmup_time: warm.elapsed(),
        load_time,
        spec,
        codec,
        engines,
        batch_config,
    })
}

/// Threads per engine instance: as configured, else the cores shared out between the instances
/// (more threads than cores make libtorch's parallel regions wait on each other).
fn intra_op_threads(spec: &ModelSpec) -> Option<usize> {
    if spec.intra_op_threads > 0 {
        return Some(spec.intra_op_threads);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / spec.instances).max(1))
}

/// The model's outputs must match what model.toml declares: count, batch dimension, dims.
fn check_outputs(
    spec: &ModelSpec,
    outputs: &[crate::tensor::HostTensor],
    rows: usize,
) -> Result<(), EngineError> {
    let bad = |m: String| EngineError::Output(m);
    if outputs.len() != spec.outputs.len() {
        return Err(bad(format!(
            "the model returns {} output(s); model.toml declares {}",
            outputs.len(),
            spec.outputs.len()
        )));
    }
    for (o, s) in outputs.iter().zip(&spec.outputs) {
        let dims_ok = o.shape.len() == s.dims.len() + 1
            && o.shape[0] == rows
            && o.shape[1..]
                .iter()
                .zip(&s.dims)
                .all(|(&a, &d)| d < 0 || a == d as usize);
        if !dims_ok {
            return Err(bad(format!(
                "output '{}' has shape {:?} for a batch of {rows}; model.toml declares [-1] + {:?}",
                s.name, o.shape, s.dims
            )));
        }
        if o.dtype != s.datatype {
            return Err(bad(format!(
                "output '{}' is {}; model.toml declares {}",
                s.name, o.dtype, s.datatype
            )));
        }
    }
    Ok(())
}
