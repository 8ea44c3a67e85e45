//! The registry: model name → versions → state and, when ready, a [`ServingModel`].
//!
//! Reads are lock-free: the whole table is an immutable map behind an `ArcSwap`, replaced as a
//! whole on every change (changes are rare: loads, unloads, reloads). Long operations on one model
//! are serialised by that model's operation lock; different models load concurrently.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::batcher::{BatchConfig, ModelHandle};
use crate::codec::{ImageLimits, ModelCodec};
use crate::config::model_spec::ModelSpec;
use crate::engine::torch::{resolve_device, TorchEngine};
use crate::engine::{Engine, EngineError};
use crate::repository::{ModelRepository, RepositoryError, VersionSource};
use crate::telemetry::{Metrics, ModelMetrics};

/// Lifecycle state of one model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Loading,
    Ready,
    Unloading,
    Unavailable,
    Failed,
}

impl ModelState {
    pub const ALL: [ModelState; 5] = [
        ModelState::Loading,
        ModelState::Ready,
        ModelState::Unloading,
        ModelState::Unavailable,
        ModelState::Failed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Unloading => "unloading",
            ModelState::Unavailable => "unavailable",
            ModelState::Failed => "failed",
        }
    }
}

/// A loaded, warmed-up model version that can take requests.
pub struct ServingModel {
    pub name: String,
    pub version: u64,
    pub spec: Arc<ModelSpec>,
    pub codec: Arc<ModelCodec>,
    pub handle: ModelHandle,
    /// The device it runs on, e.g. `cpu` or `cuda:0`.
    pub device: String,
    pub metrics: Arc<ModelMetrics>,
    pub load_time: Duration,
    pub warmup_time: Duration,
}

impl std::fmt::Debug for ServingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("device", &self.device)
            .finish()
    }
}

/// One version's entry in the table.
#[derive(Debug, Clone)]
pub struct VersionEntry {
    pub state: ModelState,
    /// Why the version failed or is unavailable.
    pub reason: Option<String>,
    pub serving: Option<Arc<ServingModel>>,
}

/// One model's entry in the table.
#[derive(Debug, Clone, Default)]
pub struct ModelEntry {
    pub versions: BTreeMap<u64, VersionEntry>,
    /// A problem with the model as a whole (e.g. a model.toml that does not parse).
    pub error: Option<String>,
}

impl ModelEntry {
    /// The newest ready version, which serves requests that name no version.
    pub fn default_version(&self) -> Option<&Arc<ServingModel>> {
        self.versions
            .values()
            .rev()
            .find(|v| v.state == ModelState::Ready)
            .and_then(|v| v.serving.as_ref())
    }

    /// The state shown for the model as a whole.
    pub fn state(&self) -> ModelState {
        let states: Vec<ModelState> = self.versions.values().map(|v| v.state).collect();
        if states.contains(&ModelState::Ready) {
            ModelState::Ready
        } else if states.contains(&ModelState::Loading) {
            ModelState::Loading
        } else if states.contains(&ModelState::Unloading) {
            ModelState::Unloading
        } else if self.error.is_some() || states.contains(&ModelState::Failed) {
            ModelState::Failed
        } else {
            ModelState::Unavailable
        }
    }

    /// The first failure reason, if any.
    pub fn reason(&self) -> Option<String> {
        self.error
            .clone()
            .or_else(|| self.versions.values().rev().find_map(|v| v.reason.clone()))
    }
}

/// Why a lookup found nothing to serve.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("model '{0}' not found")]
    UnknownModel(String),
    #[error("model '{0}' has no version {1}")]
    UnknownVersion(String, u64),
    #[error("model '{name}' is {}{}", state.as_str(), reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotReady {
        name: String,
        state: ModelState,
        reason: Option<String>,
    },
}

/// Settings that apply to every model the registry loads.
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    pub image_limits: ImageLimits,
}

/// What `/health/ready` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Required models that are not ready, with their state.
    pub waiting_for: BTreeMap<String, ModelState>,
}

pub struct Registry {
    repo: ModelRepository,
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
    table: ArcSwap<HashMap<String, Arc<ModelEntry>>>,
    /// Serialises read-modify-write of `table` (held for microseconds, never across awaits).
    write: Mutex<()>,
    /// Models that must be ready for `/health/ready`, once start-up loading has finished.
    required: Mutex<Option<HashSet<String>>>,
}

impl Registry {
    pub fn new(
        repo: ModelRepository,
        settings: RegistrySettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            repo,
            settings,
            metrics,
            table: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
            required: Mutex::new(None),
        })
    }

    pub fn repository(&self) -> &ModelRepository {
        &self.repo
    }

    /// Loads the given models (every model in the repository when `only` is `None`),
    /// concurrently, and marks them as required for readiness.
    pub async fn load_startup(
        self: &Arc<Self>,
        only: Option<&[String]>,
    ) -> Result<(), RepositoryError> {
        let names = match only {
            Some(names) => names.to_vec(),
            None => self.repo.model_names()?,
        };
        if names.is_empty() {
            tracing::warn!(repository = %self.repo.root().display(), "no models found");
        }
        let tasks: Vec<_> = names
            .iter()
            .cloned()
            .map(|name| {
                let me = self.clone();
                tokio::spawn(async move { me.load_model(&name).await })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        *self.required.lock().expect("required lock") = Some(names.into_iter().collect());
        Ok(())
    }

    /// Loads (or loads again) every version of `name` found on disk.
    pub async fn load_model(self: &Arc<Self>, name: &str) -> Result<(), RepositoryError> {
        let source = match self.repo.find(name) {
            Ok(s) => s,
            Err(e @ RepositoryError::NotFound(_)) | Err(e @ RepositoryError::InvalidName(_)) => {
                return Err(e)
            }
            Err(e) => {
                tracing::error!(model = name, error = %e, "model refused");
                self.set_model_error(name, e.to_string());
                return Err(e);
            }
        };
        let tasks: Vec<_> = source
            .versions
            .iter()
            .cloned()
            .map(|v| {
                let me = self.clone();
                let name = name.to_string();
                let config = source.config.clone();
                tokio::spawn(async move { me.load_version(&name, &config, v).await })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    }

    async fn load_version(
        self: &Arc<Self>,
        name: &str,
        config: &std::path::Path,
        v: VersionSource,
    ) {
        let version = v.version;
        self.set_version(name, version, ModelState::Loading, None, None);
        let started = Instant::now();
        let settings = self.settings.clone();
        let (name_owned, config) = (name.to_string(), config.to_path_buf());
        let loaded =
            tokio::task::spawn_blocking(move || prepare(&name_owned, &config, &v, &settings))
                .await
                .unwrap_or_else(|e| Err(format!("loading panicked: {e}")));
        match loaded {
            Ok(p) => {
                let metrics = self.metrics.for_model(name, version);
                let took = started.elapsed();
                metrics.loaded(took);
                let handle = ModelHandle::spawn(p.batch_config, p.engines, metrics.clone());
                tracing::info!(
                    model = name,
                    version,
                    device = %p.device,
                    instances = p.spec.instances,
                    max_batch_size = p.spec.batching.max_batch_size,
                    load_ms = p.load_time.as_millis() as u64,
                    warmup_ms = p.warmup_time.as_millis() as u64,
                    "model ready: {name} v{version} on {} (load {} ms, warm-up {} ms)",
                    p.device,
                    p.load_time.as_millis(),
                    p.warmup_time.as_millis()
                );
                let serving = Arc::new(ServingModel {
                    name: name.to_string(),
                    version,
                    spec: Arc::new(p.spec),
                    codec: Arc::new(p.codec),
                    handle,
                    device: p.device,
                    metrics,
                    load_time: p.load_time,
                    warmup_time: p.warmup_time,
                });
                self.set_version(name, version, ModelState::Ready, None, Some(serving));
            }
            Err(reason) => {
                tracing::error!(model = name, version, error = %reason, "model failed to load");
                self.set_version(name, version, ModelState::Failed, Some(reason), None);
            }
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ModelEntry)) {
        let _guard = self.write.lock().expect("registry write lock");
        let mut table: HashMap<String, Arc<ModelEntry>> = (**self.table.load()).clone();
        let mut entry = table.get(name).map(|e| (**e).clone()).unwrap_or_default();
        f(&mut entry);
        for (version, v) in &entry.versions {
            let vs = version.to_string();
            for s in ModelState::ALL {
                self.metrics
                    .model_state
                    .with_label_values(&[name, vs.as_str(), s.as_str()])
                    .set((s == v.state) as i64);
            }
        }
        table.insert(name.to_string(), Arc::new(entry));
        self.table.store(Arc::new(table));
    }

    fn set_version(
        &self,
        name: &str,
        version: u64,
        state: ModelState,
        reason: Option<String>,
        serving: Option<Arc<ServingModel>>,
    ) {
        self.update(name, |e| {
            e.error = None;
            e.versions.insert(
                version,
                VersionEntry {
                    state,
                    reason,
                    serving,
                },
            );
        });
    }

    fn set_model_error(&self, name: &str, error: String) {
        self.update(name, |e| e.error = Some(error));
    }

    /// The version that serves `name` (the default one when `version` is `None`).
    pub fn serving(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Arc<ServingModel>, LookupError> {
        let table = self.table.load();
        let entry = table
            .get(name)
            .ok_or_else(|| LookupError::UnknownModel(name.to_string()))?;
        let not_ready = |state, reason| LookupError::NotReady {
            name: name.to_string(),
            state,
            reason,
        };
        match version {
            None => entry
                .default_version()
                .cloned()
                .ok_or_else(|| not_ready(entry.state(), entry.reason())),
            Some(v) => {
                let ve = entry
                    .versions
                    .get(&v)
                    .ok_or_else(|| LookupError::UnknownVersion(name.to_string(), v))?;
                match (&ve.serving, ve.state) {
                    (Some(s), ModelState::Ready) => Ok(s.clone()),
                    _ => Err(not_ready(ve.state, ve.reason.clone())),
                }
            }
        }
    }

    /// A snapshot of the table, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Arc<ModelEntry>)> {
        let table = self.table.load();
        let mut all: Vec<_> = table.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn entry(&self, name: &str) -> Option<Arc<ModelEntry>> {
        self.table.load().get(name).cloned()
    }

    /// Ready once start-up loading is over and every required model has a ready version.
    pub fn readiness(&self) -> Readiness {
        let required = self.required.lock().expect("required lock").clone();
        let Some(required) = required else {
            return Readiness {
                ready: false,
                waiting_for: BTreeMap::new(),
            };
        };
        let table = self.table.load();
        let waiting_for: BTreeMap<String, ModelState> = required
            .iter()
            .filter_map(|name| {
                let state = table
                    .get(name)
                    .map(|e| e.state())
                    .unwrap_or(ModelState::Unavailable);
                (state != ModelState::Ready).then(|| (name.clone(), state))
            })
            .collect();
        Readiness {
            ready: waiting_for.is_empty(),
            waiting_for,
        }
    }

    /// Rows queued per ready model version, for the pending-requests gauge.
    pub fn refresh_gauges(&self) {
        for (name, entry) in self.table.load().iter() {
            for (version, v) in &entry.versions {
                if let Some(s) = &v.serving {
                    self.metrics
                        .pending
                        .with_label_values(&[name.as_str(), version.to_string().as_str()])
                        .set(s.handle.queued() as i64);
                }
            }
        }
    }
}

/// A model version loaded and warmed up, before its queue starts.
struct Prepared {
    spec: ModelSpec,
    codec: ModelCodec,
    engines: Vec<Box<dyn Engine>>,
    batch_config: BatchConfig,
    device: String,
    load_time: Duration,
    warmup_time: Duration,
}

/// Parses the spec, loads every engine instance and warms each up: blocking work.
fn prepare(
    name: &str,
    config: &std::path::Path,
    v: &VersionSource,
    settings: &RegistrySettings,
) -> Result<Prepared, String> {
    let started = Instant::now();
    let spec = ModelSpec::load(name, config, &v.dir).map_err(|e| e.to_string())?;
    let codec = ModelCodec::new(&spec, settings.image_limits)?;
    let device = resolve_device(spec.device).map_err(|e| e.to_string())?;
    let mut engines: Vec<Box<dyn Engine>> = Vec::with_capacity(spec.instances);
    for _ in 0..spec.instances {
        let threads = intra_op_threads(&spec);
        let engine = TorchEngine::load(&spec.file, device, threads).map_err(|e| e.to_string())?;
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
