//! The registry: model name → versions → state and, when ready, a [`ServingModel`].
//!
//! Reads are lock-free: the table is an immutable map behind an `ArcSwap`, replaced whole on
//! every change (changes are rare: loads, unloads, reloads). Operations on one model (load,
//! reload, unload) are serialised by that model's operation lock — a second one waits for the
//! first — while different models load concurrently; under a memory budget or lazy model control
//! loads run one at a time instead, so that each is measured alone and room is made for one
//! after another (see [`memory`]).
//!
//! A reload loads and warms the new copy beside the old one, then swaps the table entry in one
//! store: requests that found the old copy finish on it, new ones go to the new one. A retired
//! copy drains its queue before its threads exit and its engines are dropped.

mod fingerprint;
pub mod memory;
mod prepare;
pub mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

use self::fingerprint::Fingerprints;
use self::memory::{plan_evictions, MemoryBudget, NoRoom, Resident};
pub use self::prepare::LoadError;
use self::prepare::{parse, prepare};
/// Why a request to a model's queue was not answered: part of the registry's API, since its
/// models' handles return it.
pub use crate::batcher::InferError;
use crate::batcher::ModelHandle;
use crate::codec::{ImageLimits, ModelCodec};
use crate::config::model_spec::ModelSpec;
use crate::engine::EngineFactory;
use crate::idle_poll::IdlePolling;
use crate::repository::{ModelRepository, ModelSource, RepositoryError, VersionSource};
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
    /// Lazy model control: in the repository, not in memory; the next request loads it.
    Unloaded,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Unloading => "unloading",
            ModelState::Unavailable => "unavailable",
            ModelState::Failed => "failed",
            ModelState::Unloaded => "unloaded",
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
    /// The device of its first instance, e.g. `cpu` or `cuda:0`: the one the memory budget
    /// counts it on.
    pub device: String,
    /// Each engine instance's device, in order.
    pub instance_devices: Vec<String>,
    pub metrics: Arc<ModelMetrics>,
    pub load_time: Duration,
    pub warmup_time: Duration,
    pub loaded_at: SystemTime,
    /// Content fingerprint of the files it was loaded from.
    fingerprint: u64,
    /// Memory it holds on `device`, measured at load after warm-up (see [`memory`]).
    pub memory_bytes: u64,
    /// Requests holding it now ([`ModelLease`]s).
    leases: AtomicUsize,
    /// When a request last took it, in microseconds since the registry started.
    last_used: AtomicU64,
}

impl ServingModel {
    /// Whether requests are using it or waiting in its queue.
    fn busy(&self) -> bool {
        self.leases.load(Ordering::Acquire) > 0 || self.handle.queued() > 0
    }
}

/// A request's hold on a serving model version: while any is alive the version is busy and is
/// never evicted. `cold` says the request waited for the model to be loaded.
pub struct ModelLease {
    model: Arc<ServingModel>,
    /// How long the request waited for the model to load (zero when it was in memory): it
    /// counts against the request's deadline.
    pub waited: Duration,
}

impl ModelLease {
    fn new(model: Arc<ServingModel>, waited: Duration, now_us: u64) -> Self {
        model.leases.fetch_add(1, Ordering::AcqRel);
        model.last_used.fetch_max(now_us, Ordering::AcqRel);
        ModelLease { model, waited }
    }

    /// Whether the request waited for its model to be loaded.
    pub fn cold(&self) -> bool {
        !self.waited.is_zero()
    }
}

impl Clone for ModelLease {
    fn clone(&self) -> Self {
        self.model.leases.fetch_add(1, Ordering::AcqRel);
        ModelLease {
            model: self.model.clone(),
            waited: self.waited,
        }
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        self.model.leases.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::ops::Deref for ModelLease {
    type Target = Arc<ServingModel>;
    fn deref(&self) -> &Arc<ServingModel> {
        &self.model
    }
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
    /// Why the version failed, is unavailable, or why its last reload failed.
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
        let has = |s| self.versions.values().any(|v| v.state == s);
        if has(ModelState::Ready) {
            ModelState::Ready
        } else if has(ModelState::Loading) {
            ModelState::Loading
        } else if has(ModelState::Unloading) {
            ModelState::Unloading
        } else if self.error.is_some() || has(ModelState::Failed) {
            ModelState::Failed
        } else if has(ModelState::Unloaded) {
            ModelState::Unloaded
        } else {
            ModelState::Unavailable
        }
    }

    /// The model-wide error, else the newest version's reason.
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
    /// Lazy model control: the request's deadline passed while the model was being loaded.
    #[error("model '{name}' is still loading after {} ms, the request's deadline", waited.as_millis())]
    LoadTimedOut { name: String, waited: Duration },
}

/// Why a management operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("model '{0}' is not loaded")]
    NotLoaded(String),
    #[error("model '{name}' failed to load: {reason}")]
    LoadFailed { name: String, reason: String },
}

/// Why a model version was loaded (the `reason` of `aiaas_model_loads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadReason {
    /// At start-up.
    Startup,
    /// A request found it not in memory (lazy model control).
    OnDemand,
    /// Asked for through the management API.
    Explicit,
    /// A new model or version found by repository polling.
    Poll,
    /// A serving version loaded again: its files changed, or a reload was asked for.
    Reload,
}

impl LoadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadReason::Startup => "startup",
            LoadReason::OnDemand => "on_demand",
            LoadReason::Explicit => "explicit",
            LoadReason::Poll => "poll",
            LoadReason::Reload => "reload",
        }
    }
}

/// Settings that apply to every model the registry loads.
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    pub image_limits: ImageLimits,
    /// Longest text instance accepted, in bytes (0: no limit).
    pub max_text_bytes: usize,
    /// `--idle-poll-us`: each model's queue and engine threads poll for work within its window
    /// before they block.
    pub idle_polling: IdlePolling,
    /// `--model-memory-budget`: the most model footprint each device holds.
    pub memory_budget: MemoryBudget,
    /// `--model-control lazy`: models load when a request needs them and the least recently
    /// used idle ones are evicted when the budget is full.
    pub lazy: bool,
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
    /// How engines are built: libtorch in the server, a fake in tests.
    engines: Arc<dyn EngineFactory>,
    metrics: Arc<Metrics>,
    table: ArcSwap<HashMap<String, Arc<ModelEntry>>>,
    /// Serialises read-modify-write of `table` (held for microseconds, never across awaits).
    write: Mutex<()>,
    /// One operation lock per model name.
    ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Models that must be ready for `/health/ready`, once start-up loading has finished.
    required: Mutex<Option<HashSet<String>>>,
    fingerprints: Fingerprints,
    /// The model folders of the last repository scan and when it ran: listings reuse it for
    /// [`SCAN_REUSE`] instead of reading the disk on every request.
    scanned: Mutex<Option<(Instant, Vec<String>)>>,
    /// One version loads at a time: its footprint is measured alone, and room in the budget is
    /// made for one load after another.
    load_gate: tokio::sync::Mutex<()>,
    /// The last measured footprint of each version's files (name, version, fingerprint), kept
    /// after eviction: the estimate for its next load.
    footprints: Mutex<HashMap<(String, u64, u64), u64>>,
    /// Bytes per device of copies unloaded but still draining (their memory not yet freed):
    /// counted as in use until they are gone.
    retiring: Mutex<HashMap<String, u64>>,
    /// On-demand loads under way: the requests for a model wait on the same load.
    on_demand: Mutex<HashMap<String, LoadWatch>>,
    /// The registry's clock for least-recently-used order.
    epoch: Instant,
}

/// The outcome of an on-demand load, once it is known.
type LoadWatch = tokio::sync::watch::Receiver<Option<Result<(), String>>>;

/// Removes a model's on-demand load from the registry when dropped.
struct ForgetOnDemand<'a>(&'a Registry, &'a str);

impl Drop for ForgetOnDemand<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.0.on_demand.lock() {
            pending.remove(self.1);
        }
    }
}

/// How long a request waits for a model to load when neither it nor the model says.
const DEFAULT_LOAD_WAIT: Duration = Duration::from_secs(30);

/// How long a repository scan answers listings of models that are not loaded.
const SCAN_REUSE: Duration = Duration::from_secs(1);

impl Registry {
    pub fn new(
        repo: ModelRepository,
        settings: RegistrySettings,
        engines: Arc<dyn EngineFactory>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            repo,
            settings,
            engines,
            metrics,
            table: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
            ops: Mutex::new(HashMap::new()),
            required: Mutex::new(None),
            fingerprints: Fingerprints::default(),
            scanned: Mutex::new(None),
            load_gate: tokio::sync::Mutex::new(()),
            footprints: Mutex::new(HashMap::new()),
            retiring: Mutex::new(HashMap::new()),
            on_demand: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        })
    }

    /// Whether models load on demand (`--model-control lazy`).
    pub fn is_lazy(&self) -> bool {
        self.settings.lazy
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Loads the given models (every model in the repository when `only` is `None`),
    /// concurrently, and marks them as required for readiness. Under lazy model control only
    /// the pinned models and those named load now; the others are listed as unloaded.
    pub async fn load_startup(
        self: &Arc<Self>,
        only: Option<&[String]>,
    ) -> Result<(), RepositoryError> {
        let names = match (only, self.settings.lazy) {
            (only, true) => {
                let mut now = only.map(<[String]>::to_vec).unwrap_or_default();
                for name in self.repo.model_names()? {
                    if self.register_unloaded(&name) && !now.contains(&name) {
                        now.push(name);
                    }
                }
                now
            }
            (Some(names), false) => names.to_vec(),
            (None, false) => self.repo.model_names()?,
        };
        if names.is_empty() && !self.settings.lazy {
            tracing::warn!(repository = %self.repo.root().display(), "no models to load");
        }
        let tasks: Vec<_> = names
            .iter()
            .cloned()
            .map(|name| {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.sync(&name, false, LoadReason::Startup).await {
                        tracing::error!(model = %name, error = %e, "start-up load failed");
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        if self.settings.lazy {
            let listed = self.table.load().len();
            tracing::info!(
                models = listed,
                loaded = names.len(),
                budget = %self.settings.memory_budget,
                "lazy model control: {} of {listed} models load when first requested",
                listed.saturating_sub(names.len())
            );
        }
        *self.required.lock().expect("required lock") = Some(names.into_iter().collect());
        Ok(())
    }

    /// Lists a model that is not in memory as unloaded, with the versions its policy selects
    /// (lazy model control); a model being loaded or in memory is left alone. Returns whether
    /// it is pinned (and so loads at start-up).
    fn register_unloaded(&self, name: &str) -> bool {
        let (source, spec) = match self.spec_on_disk(name) {
            Ok(found) => found,
            Err(reason) => {
                self.set_model_error(name, reason);
                return false;
            }
        };
        let Ok(_op) = self.op_lock(name).try_lock_owned() else {
            return spec.pinned;
        };
        let available: Vec<u64> = source.versions.iter().map(|v| v.version).collect();
        let wanted = spec.version_policy.select(&available);
        self.update(name, |e| {
            if e.versions.values().any(|v| v.serving.is_some()) {
                return;
            }
            e.error = None;
            e.versions.retain(|v, _| wanted.contains(v));
            for v in &wanted {
                let entry = e.versions.entry(*v).or_insert(VersionEntry {
                    state: ModelState::Unloaded,
                    reason: None,
                    serving: None,
                });
                if entry.state != ModelState::Unloaded {
                    // a failed load is tried again by the next request; say what happened
                    entry.reason = entry
                        .reason
                        .take()
                        .map(|r| format!("the last load failed: {r}"));
                    entry.state = ModelState::Unloaded;
                }
            }
        });
        spec.pinned
    }

    fn op_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ops
            .lock()
            .expect("ops lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Brings `name` in line with the repository: loads the versions its policy selects that
    /// are new or whose files changed, and unloads versions no longer selected. Unchanged
    /// ready versions are left alone.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<(), ManageError> {
        self.sync(name, false, LoadReason::Explicit).await
    }

    /// Loads every selected version of `name` again from disk, beside the serving copies,
    /// and swaps them in once warm.
    pub async fn reload(self: &Arc<Self>, name: &str) -> Result<(), ManageError> {
        self.sync(name, true, LoadReason::Reload).await
    }

    async fn sync(
        self: &Arc<Self>,
        name: &str,
        force: bool,
        reason: LoadReason,
    ) -> Result<(), ManageError> {
        let lock = self.op_lock(name);
        let _op = lock.lock().await;
        let source = match self.repo.find(name) {
            Ok(s) => s,
            Err(e @ RepositoryError::Escapes(_)) | Err(e @ RepositoryError::Io(..)) => {
                tracing::error!(model = name, error = %e, "model refused");
                self.set_model_error(name, e.to_string());
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        // The model-level spec decides which versions to serve.
        let spec = match ModelSpec::load(name, &source.config, &source.dir) {
            Ok(spec) => spec,
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(model = name, error = %reason, "model failed to load");
                self.set_model_error(name, reason.clone());
                return Err(ManageError::LoadFailed {
                    name: name.to_string(),
                    reason,
                });
            }
        };
        let available: Vec<u64> = source.versions.iter().map(|v| v.version).collect();
        let wanted = spec.version_policy.select(&available);
        self.update(name, |e| e.error = None);
        // lazy: a repository scan reloads changed versions that are in memory and loads
        // nothing else (one evicted meanwhile stays out until a request wants it)
        let loadable: Vec<u64> = if self.settings.lazy && reason == LoadReason::Poll {
            let entry = self.entry(name);
            wanted
                .iter()
                .copied()
                .filter(|v| {
                    entry
                        .as_ref()
                        .and_then(|e| e.versions.get(v))
                        .is_some_and(|ve| ve.serving.is_some())
                })
                .collect()
        } else {
            wanted.clone()
        };

        // Versions no longer on disk or no longer selected go away.
        let current: Vec<u64> = self
            .entry(name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default();
        for v in current.iter().filter(|v| !wanted.contains(v)) {
            self.unload_version(
                name,
                *v,
                "not selected by the version policy or removed from disk",
            )
            .await;
            self.update(name, |e| {
                e.versions.remove(v);
            });
            self.metrics.forget_state(name, *v);
        }

        let tasks: Vec<_> = source
            .versions
            .iter()
            .filter(|v| loadable.contains(&v.version))
            .cloned()
            .map(|v| {
                let me = self.clone();
                let name = name.to_string();
                let config = source.config.clone();
                tokio::spawn(async move { me.load_version(&name, &config, v, force, reason).await })
            })
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("loading task failed: {e}")),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ManageError::LoadFailed {
                name: name.to_string(),
                reason: failures.join("; "),
            })
        }
    }

    /// Loads one version unless it is ready with the same files (or `force`); on success swaps
    /// it in and retires the copy it replaces. A failed reload leaves the serving copy in place.
    async fn load_version(
        self: &Arc<Self>,
        name: &str,
        config: &Path,
        v: VersionSource,
        force: bool,
        reason: LoadReason,
    ) -> Result<(), LoadError> {
        let version = v.version;
        let fingerprint = self.fingerprints.of(config, &v.dir).unwrap_or(0);
        let old = self
            .entry(name)
            .and_then(|e| e.versions.get(&version).and_then(|ve| ve.serving.clone()));
        if let Some(old) = &old {
            if !force && old.fingerprint == fingerprint {
                return Ok(());
            }
        } else {
            self.set_version(name, version, ModelState::Loading, None, None);
        }
        let reason = if old.is_some() {
            LoadReason::Reload
        } else {
            reason
        };
        let started = Instant::now();
        let (p, memory_bytes, _gate) = match self.load_measured(name, config, v, fingerprint).await
        {
            Ok(loaded) => loaded,
            Err(err) => {
                let why = err.to_string();
                tracing::error!(model = name, version, error = %why, "model failed to load");
                let transient = matches!(&err, LoadError::NoRoom(r) if r.is_transient());
                match old {
                    // keep serving the old copy; say why the new one was not taken
                    Some(old) => self.set_version(
                        name,
                        version,
                        ModelState::Ready,
                        Some(format!(
                            "reload failed, still serving the previous copy: {why}"
                        )),
                        Some(old),
                    ),
                    // the budget is held by busy models now: a later request tries again
                    None if transient && self.settings.lazy => {
                        self.set_version(name, version, ModelState::Unloaded, Some(why), None)
                    }
                    None => self.set_version(name, version, ModelState::Failed, Some(why), None),
                }
                return Err(err);
            }
        };
        let metrics = self.metrics.for_model(name, version);
        metrics.loaded(started.elapsed());
        {
            use crate::batcher::BatchObserver;
            // fixed batching settings; an adaptive queue overwrites them as it tunes
            metrics.tuned(
                p.spec.batching.max_batch_size,
                p.spec.batching.max_queue_delay(),
            );
        }
        self.metrics.model_loaded(name, reason.as_str());
        let (device, devices) = (p.device().to_string(), p.devices_summary());
        self.metrics
            .set_model_memory(name, version, &device, memory_bytes);
        let handle = ModelHandle::spawn(p.batch_config, p.engines, metrics.clone());
        tracing::info!(
            model = name,
            version,
            device = %devices,
            precision = %p.spec.precision,
            instances = p.spec.instances,
            max_batch_size = p.spec.batching.max_batch_size,
            load_ms = p.load_time.as_millis() as u64,
            warmup_ms = p.warmup_time.as_millis() as u64,
            memory_mib = memory_bytes >> 20,
            reason = reason.as_str(),
            "model ready: {name} v{version} on {devices}{} (load {} ms, warm-up {} ms, {}){}",
            match p.spec.precision {
                crate::config::model_spec::Precision::Fp32 => String::new(),
                other => format!(" in {other}"),
            },
            p.load_time.as_millis(),
            p.warmup_time.as_millis(),
            memory::mib(memory_bytes),
            if old.is_some() { ", swapped in" } else { "" }
        );
        let serving = Arc::new(ServingModel {
            name: name.to_string(),
            version,
            spec: Arc::new(p.spec),
            codec: Arc::new(p.codec),
            handle,
            device,
            instance_devices: p.devices,
            metrics,
            load_time: p.load_time,
            warmup_time: p.warmup_time,
            loaded_at: SystemTime::now(),
            fingerprint,
            memory_bytes,
            leases: AtomicUsize::new(0),
            last_used: AtomicU64::new(self.now_us()),
        });
        self.set_version(name, version, ModelState::Ready, None, Some(serving));
        self.refresh_memory_gauges();
        if let Some(old) = old {
            // requests that found the old copy finish on it; it goes once they are done
            let me = self.clone();
            tokio::spawn(async move { me.retire(old).await });
        }
        Ok(())
    }

    /// Parses the version's spec, makes room for it in the memory budget, loads and warms it
    /// up, and measures its footprint. Under a budget (or lazy model control) loads run one at
    /// a time, each measured alone, and this returns with the load gate held: the caller puts
    /// the version in the table before the next load counts what is in memory. Otherwise loads
    /// overlap as before, and a footprint may include another load's memory.
    async fn load_measured(
        self: &Arc<Self>,
        name: &str,
        config: &Path,
        v: VersionSource,
        fingerprint: u64,
    ) -> Result<
        (
            prepare::Prepared,
            u64,
            Option<tokio::sync::MutexGuard<'_, ()>>,
        ),
        LoadError,
    > {
        let version = v.version;
        let (name_owned, config_owned) = (name.to_string(), config.to_path_buf());
        let spec = blocking(move || parse(&name_owned, &config_owned, &v)).await?;
        let device = self.engines.device(&spec);
        let devices = self.engines.devices(&spec);
        let file_bytes = std::fs::metadata(&spec.file).map_or(0, |m| m.len());
        let budgeted = self.settings.lazy || !self.settings.memory_budget.is_unlimited();
        let gate = match budgeted {
            true => Some(self.load_gate.lock().await),
            false => None,
        };
        // the same files measure the same: a changed file is estimated afresh
        let key = (name.to_string(), version, fingerprint);
        let estimate = self
            .footprints
            .lock()
            .expect("footprints lock")
            .get(&key)
            .copied()
            .unwrap_or(file_bytes);
        self.make_room(name, &device, estimate).await?;
        let before = self.memory_in_use_on(&devices);
        let (settings, engines) = (self.settings.clone(), self.engines.clone());
        let p = blocking(move || prepare(spec, &settings, engines.as_ref())).await?;
        // memory in use after warm-up, less before, over every device its instances use; at
        // least the weights' file size (memory other requests free meanwhile makes the
        // difference too small)
        let measured = match (before, self.memory_in_use_on(&devices)) {
            (Some(before), Some(after)) => after.saturating_sub(before).max(file_bytes),
            _ => file_bytes,
        };
        if measured > estimate {
            // the first load of a version is estimated from its file: make the rest of the room
            self.make_room(name, p.device(), measured).await?;
        }
        // kept only once it fits: a measurement inflated by other requests' memory must not
        // refuse the model for good
        self.footprints
            .lock()
            .expect("footprints lock")
            .insert(key, measured);
        Ok((p, measured, gate))
    }

    /// Bytes in use on `device` now: the runtime's own count where it keeps one, else the
    /// process's heap in use for the CPU.
    fn memory_in_use(&self, device: &str) -> Option<u64> {
        self.engines
            .memory_in_use(device)
            .or_else(|| (device == "cpu").then(memory::heap_in_use_bytes).flatten())
    }

    /// Bytes in use over `devices` together; `None` where one of them has no count.
    fn memory_in_use_on(&self, devices: &[String]) -> Option<u64> {
        devices.iter().map(|d| self.memory_in_use(d)).sum()
    }

    /// Makes `need` bytes of room on `device` for a version of `name` (no-op without a budget
    /// for it): evicts least recently used idle models under lazy model control, else refuses
    /// a load that does not fit. Models whose operation lock is held (loading, unloading) count
    /// as busy, so this never waits on another model's operation.
    async fn make_room(&self, name: &str, device: &str, need: u64) -> Result<(), NoRoom> {
        let Some(budget) = self.settings.memory_budget.limit(device) else {
            return Ok(());
        };
        // the snapshot goes before evicting: it holds the victims' serving copies, whose
        // retirement waits for every holder
        let table = self.table.load_full();
        let mut used = 0;
        let mut resident = Vec::new();
        let mut locks = HashMap::new();
        for (model, entry) in table.iter() {
            let copies: Vec<&Arc<ServingModel>> = entry
                .versions
                .values()
                .filter_map(|v| v.serving.as_ref())
                .filter(|s| s.device == device)
                .collect();
            let bytes: u64 = copies.iter().map(|s| s.memory_bytes).sum();
            used += bytes;
            if bytes == 0 || model == name {
                continue;
            }
            let lock = self.op_lock(model).try_lock_owned();
            resident.push(Resident {
                name: model.clone(),
                bytes,
                last_used: copies
                    .iter()
                    .map(|s| s.last_used.load(Ordering::Acquire))
                    .max()
                    .unwrap_or(0),
                pinned: copies.iter().any(|s| s.spec.pinned),
                busy: lock.is_err() || copies.iter().any(|s| s.busy()),
            });
            if let Ok(lock) = lock {
                locks.insert(model.clone(), lock);
            }
        }
        drop(table);
        used += self
            .retiring
            .lock()
            .expect("retiring lock")
            .get(device)
            .copied()
            .unwrap_or(0);
        let victims = plan_evictions(device, budget, used, need, &resident, self.settings.lazy)?;
        // only the victims stay locked while they drain
        locks.retain(|model, _| victims.contains(model));
        for victim in victims {
            let _op = locks.remove(&victim);
            self.evict(&victim, name).await;
        }
        Ok(())
    }

    /// The versions of `name` with a serving copy in memory.
    fn loaded_versions(&self, name: &str) -> Vec<u64> {
        self.entry(name)
            .map(|e| {
                e.versions
                    .iter()
                    .filter(|(_, v)| v.serving.is_some())
                    .map(|(k, _)| *k)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Unloads every version of `victim` to make room for `for_whom` (its operation lock held
    /// by the caller); requests that already hold it finish first.
    async fn evict(&self, victim: &str, for_whom: &str) {
        let versions = self.loaded_versions(victim);
        tracing::info!(
            model = victim,
            for_model = for_whom,
            "evicting {victim} (least recently used) to make room for {for_whom}"
        );
        for v in versions {
            self.unload_version(
                victim,
                v,
                &format!("evicted (least recently used) to make room for '{for_whom}'"),
            )
            .await;
        }
        self.metrics.model_evicted(victim);
    }

    /// Sets the model-memory gauges from the table: per device, the footprint of every
    /// version in memory, and the budget.
    fn refresh_memory_gauges(&self) {
        let mut resident: BTreeMap<String, u64> = BTreeMap::new();
        resident.insert("cpu".into(), 0);
        for (device, _) in self.settings.memory_budget.named() {
            resident.insert(device.to_string(), 0);
        }
        for entry in self.table.load().values() {
            for s in entry.versions.values().filter_map(|v| v.serving.as_ref()) {
                *resident.entry(s.device.clone()).or_default() += s.memory_bytes;
            }
        }
        for (device, bytes) in resident {
            let budget = self.settings.memory_budget.limit(&device);
            self.metrics.set_device_memory(&device, bytes, budget);
        }
    }

    /// Unloads every version of `name`: new requests are refused at once, accepted ones
    /// complete, then the engines are dropped. Returns once all of that is done.
    pub async fn unload(self: &Arc<Self>, name: &str) -> Result<(), ManageError> {
        // as load and reload refuse it through the repository
        if !crate::repository::valid_name(name) {
            return Err(RepositoryError::InvalidName(name.to_string()).into());
        }
        let lock = self.op_lock(name);
        let _op = lock.lock().await;
        let versions = self.loaded_versions(name);
        if versions.is_empty() {
            return Err(ManageError::NotLoaded(name.to_string()));
        }
        let tasks: Vec<_> = versions
            .into_iter()
            .map(|v| {
                let me = self.clone();
                let name = name.to_string();
                tokio::spawn(async move { me.unload_version(&name, v, "unloaded").await })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    }

    async fn unload_version(&self, name: &str, version: u64, reason: &str) {
        let serving = self
            .entry(name)
            .and_then(|e| e.versions.get(&version).and_then(|v| v.serving.clone()));
        self.set_version(name, version, ModelState::Unloading, None, None);
        if let Some(serving) = serving {
            tracing::info!(
                model = name,
                version,
                "unloading: draining accepted requests"
            );
            let device = serving.device.clone();
            self.retire(serving).await;
            self.metrics.forget_model(name, version);
            self.metrics.forget_model_memory(name, version, &device);
        }
        // under lazy model control the next request loads it again
        let state = if self.settings.lazy {
            ModelState::Unloaded
        } else {
            ModelState::Unavailable
        };
        self.set_version(name, version, state, Some(reason.to_string()), None);
        self.refresh_memory_gauges();
        tracing::info!(model = name, version, "unloaded");
    }

    /// Forgets a model whose folder disappeared (poll mode).
    async fn remove(self: &Arc<Self>, name: &str) {
        let _ = self.unload(name).await;
        let lock = self.op_lock(name);
        let _op = lock.lock().await;
        let versions: Vec<u64> = self
            .entry(name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default();
        {
            let _guard = self.write.lock().expect("registry write lock");
            let mut table: HashMap<String, Arc<ModelEntry>> = (**self.table.load()).clone();
            table.remove(name);
            self.table.store(Arc::new(table));
        }
        for v in versions {
            self.metrics.forget_state(name, v);
        }
        tracing::info!(model = name, "removed from the repository");
    }

    /// One pass of repository polling: new and changed models load, removed ones unload.
    pub async fn poll_once(self: &Arc<Self>) {
        let on_disk = match self.repo.model_names() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot scan the repository");
                return;
            }
        };
        // names and flags only: a table snapshot held across the awaits below would hold the
        // serving copies that unloads wait to see dropped
        let (known, resident): (Vec<String>, HashSet<String>) = {
            let table = self.table.load();
            let resident = table
                .iter()
                .filter(|(_, e)| e.versions.values().any(|v| v.serving.is_some()))
                .map(|(name, _)| name.clone())
                .collect();
            (table.keys().cloned().collect(), resident)
        };
        let mut tasks = Vec::new();
        for name in &on_disk {
            let resident = resident.contains(name);
            // lazy: models not in memory are listed (as unloaded) and wait for a request
            if self.settings.lazy && !resident {
                self.register_unloaded(name);
                continue;
            }
            let me = self.clone();
            let name = name.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = me.sync(&name, false, LoadReason::Poll).await {
                    tracing::warn!(model = %name, error = %e, "poll: load failed");
                }
            }));
        }
        for name in known.into_iter().filter(|n| !on_disk.contains(n)) {
            let me = self.clone();
            tasks.push(tokio::spawn(async move { me.remove(&name).await }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ModelEntry)) {
        let _guard = self.write.lock().expect("registry write lock");
        let mut table: HashMap<String, Arc<ModelEntry>> = (**self.table.load()).clone();
        let mut entry = table.get(name).map(|e| (**e).clone()).unwrap_or_default();
        f(&mut entry);
        for (version, v) in &entry.versions {
            self.metrics.set_state(name, *version, v.state.as_str());
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
        let found = match version {
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
        }?;
        match found.handle.failure() {
            None => Ok(found),
            Some(reason) => {
                drop(table);
                self.fail_after_device_failure(&found, &reason);
                Err(not_ready(ModelState::Failed, Some(reason)))
            }
        }
    }

    /// Marks a version whose device failed as failed (if the table still holds that copy) and
    /// lets the copy go: its engines may hold a broken device context. A load brings it back.
    fn fail_after_device_failure(&self, copy: &Arc<ServingModel>, reason: &str) {
        let (name, version) = (copy.name.as_str(), copy.version);
        let mut taken = None;
        self.update(name, |e| {
            if let Some(ve) = e.versions.get_mut(&version) {
                if ve.serving.as_ref().is_some_and(|s| Arc::ptr_eq(s, copy)) {
                    taken = ve.serving.take();
                    ve.state = ModelState::Failed;
                    ve.reason = Some(reason.to_string());
                }
            }
        });
        if let Some(copy) = taken {
            tracing::error!(
                model = name,
                version,
                reason,
                "model failed: its device failed"
            );
            self.metrics
                .forget_model_memory(name, version, &copy.device);
            self.refresh_memory_gauges();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(retire(copy));
            }
        }
    }

    /// Takes the version that serves `name` for one request. Under lazy model control a model
    /// that is not in memory is loaded first (requests that arrive meanwhile wait for the same
    /// load), the wait bounded by `deadline` (else the model's timeout): the lease then says how
    /// long it waited. A model that failed to load is not tried again until the next repository
    /// scan.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &str,
        version: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<ModelLease, LookupError> {
        let started = Instant::now();
        let mut limit = None;
        let mut failure = None;
        // a model evicted again between its load and this request taking it (a budget that
        // holds few models) is loaded once more, while the deadline allows
        for _ in 0..3 {
            let missing = match self.serving(name, version) {
                Ok(model) => {
                    // zero when it was in memory at once
                    let waited = limit.map_or(Duration::ZERO, |_| started.elapsed());
                    return Ok(ModelLease::new(model, waited, self.now_us()));
                }
                Err(e) => e,
            };
            if let Some(reason) = failure.take() {
                // the load failed and nothing serves: say why
                let state = self.entry(name).map_or(ModelState::Failed, |e| e.state());
                return Err(LookupError::NotReady {
                    name: name.to_string(),
                    state,
                    reason: Some(reason),
                });
            }
            if !self.loads_on_demand(name, &missing) {
                return Err(missing);
            }
            let limit = *limit.get_or_insert_with(|| {
                deadline.unwrap_or_else(|| started + self.load_wait_limit(name))
            });
            let mut outcome = self.load_on_demand(name);
            let waited =
                tokio::time::timeout_at(limit.into(), outcome.wait_for(Option::is_some)).await;
            self.metrics.load_waited(name, started.elapsed());
            match waited {
                Err(_) => {
                    return Err(LookupError::LoadTimedOut {
                        name: name.to_string(),
                        waited: started.elapsed(),
                    })
                }
                Ok(Ok(result)) => failure = result.clone().and_then(Result::err),
                Ok(Err(_)) => failure = Some("the loading task failed".into()),
            }
        }
        self.serving(name, version)
            .map(|model| ModelLease::new(model, started.elapsed(), self.now_us()))
    }

    /// Whether a request that found nothing to serve loads the model (lazy model control): a
    /// model or version not in memory, or on disk since the last scan; not one that failed.
    fn loads_on_demand(&self, name: &str, missing: &LookupError) -> bool {
        let on_disk = |version: Option<u64>| {
            self.repo
                .find(name)
                .is_ok_and(|s| version.is_none_or(|v| s.versions.iter().any(|d| d.version == v)))
        };
        self.settings.lazy
            && match missing {
                LookupError::NotReady { state, .. } => *state != ModelState::Failed,
                LookupError::UnknownModel(_) => on_disk(None),
                LookupError::UnknownVersion(_, v) => on_disk(Some(*v)),
                LookupError::LoadTimedOut { .. } => false,
            }
    }

    /// The load of `name` a request waits for: the one under way, else a new one.
    fn load_on_demand(self: &Arc<Self>, name: &str) -> LoadWatch {
        let mut pending = self.on_demand.lock().expect("on-demand lock");
        if let Some(watch) = pending.get(name) {
            return watch.clone();
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        pending.insert(name.to_string(), rx.clone());
        let (me, name) = (self.clone(), name.to_string());
        // its own task: a request that gives up does not stop the load the others wait for
        tokio::spawn(async move {
            // forgets the load however the task ends (a panic included), so that the next
            // request starts another instead of finding this one's closed channel forever
            let _forget = ForgetOnDemand(&me, &name);
            let result = me
                .sync(&name, false, LoadReason::OnDemand)
                .await
                .map_err(|e| match e {
                    ManageError::LoadFailed { reason, .. } => reason,
                    other => other.to_string(),
                });
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// The model's own timeout from its model.toml (requests wait at most that for a load).
    fn load_wait_limit(&self, name: &str) -> Duration {
        self.spec_on_disk(name)
            .map_or(DEFAULT_LOAD_WAIT, |(_, spec)| spec.batching.timeout())
    }

    /// Every model in the table, and every model in the repository not loaded yet (as an
    /// empty entry), sorted by name.
    /// The loaded ones come from memory; the repository is scanned at most once per
    /// [`SCAN_REUSE`] for the others.
    pub fn list(&self) -> Vec<(String, Arc<ModelEntry>)> {
        let table = self.table.load();
        let mut all: BTreeMap<String, Arc<ModelEntry>> =
            table.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for name in self.model_names_recent() {
            all.entry(name).or_default();
        }
        all.into_iter().collect()
    }

    /// The repository's model names from a scan at most [`SCAN_REUSE`] old.
    fn model_names_recent(&self) -> Vec<String> {
        let mut scanned = self.scanned.lock().expect("scan lock");
        if let Some((at, names)) = scanned.as_ref() {
            if at.elapsed() < SCAN_REUSE {
                return names.clone();
            }
        }
        let names = self.repo.model_names().unwrap_or_default();
        *scanned = Some((Instant::now(), names.clone()));
        names
    }

    /// The table's entry for `name`, with any version whose device failed marked failed.
    pub fn entry(&self, name: &str) -> Option<Arc<ModelEntry>> {
        let entry = self.table.load().get(name).cloned()?;
        let failed: Vec<(Arc<ServingModel>, String)> = entry
            .versions
            .values()
            .filter_map(|v| v.serving.as_ref())
            .filter_map(|s| s.handle.failure().map(|reason| (s.clone(), reason)))
            .collect();
        if failed.is_empty() {
            return Some(entry);
        }
        drop(entry);
        for (copy, reason) in failed {
            self.fail_after_device_failure(&copy, &reason);
        }
        self.table.load().get(name).cloned()
    }

    /// The model's folder and parsed spec from disk (for models not loaded).
    pub fn spec_on_disk(&self, name: &str) -> Result<(ModelSource, ModelSpec), String> {
        let source = self.repo.find(name).map_err(|e| e.to_string())?;
        let spec = spec::load_spec(name, &source.config, &source.dir).map_err(|e| e.to_string())?;
        Ok((source, spec))
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

    /// Rows queued per ready model version, for the pending-requests gauge, and each GPU's
    /// allocator bytes; a version whose device failed is marked failed here too, without
    /// waiting for a request to find it.
    pub fn refresh_gauges(&self) {
        let mut failed = Vec::new();
        for (name, entry) in self.table.load().iter() {
            for (version, v) in &entry.versions {
                if let Some(s) = &v.serving {
                    self.metrics.set_pending(name, *version, s.handle.queued());
                    if let Some(reason) = s.handle.failure() {
                        failed.push((s.clone(), reason));
                    }
                }
            }
        }
        for (copy, reason) in failed {
            self.fail_after_device_failure(&copy, &reason);
        }
        for gpu in self.engines.gpu_memory() {
            self.metrics
                .set_gpu_memory(&gpu.device, gpu.allocated, gpu.reserved);
        }
    }
}

/// Runs blocking work (file reads, libtorch) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
) -> Result<T, LoadError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(LoadError::Task(e.to_string())))
}

impl Registry {
    /// Lets a serving copy go (see [`retire`]), its memory counted as in use on its device
    /// until it is freed.
    async fn retire(&self, serving: Arc<ServingModel>) {
        /// Takes the bytes off the count when the retirement ends, however it ends.
        struct Counted<'a>(&'a Registry, String, u64);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                if let Ok(mut retiring) = self.0.retiring.lock() {
                    if let Some(slot) = retiring.get_mut(&self.1) {
                        *slot = slot.saturating_sub(self.2);
                    }
                }
            }
        }
        let (device, bytes) = (serving.device.clone(), serving.memory_bytes);
        *self
            .retiring
            .lock()
            .expect("retiring lock")
            .entry(device.clone())
            .or_default() += bytes;
        let _counted = Counted(self, device, bytes);
        retire(serving).await;
    }
}

/// Lets a serving copy go: waits until requests holding it have finished, its queue has
/// drained and its engine threads have exited (dropping the engines).
async fn retire(serving: Arc<ServingModel>) {
    let (name, version) = (serving.name.clone(), serving.version);
    // Take the handle out: dropping our Arc leaves the in-flight requests' clones the only ones.
    let retired = match Arc::try_unwrap(serving) {
        Ok(s) => s.handle.retire(),
        Err(shared) => shared.handle.clone().retire(),
    };
    let _ = tokio::task::spawn_blocking(move || {
        retired.wait();
        release_free_memory();
    })
    .await;
    tracing::debug!(model = %name, version, "retired copy drained and dropped");
}

/// Hands memory freed by a dropped model back to the system. glibc keeps freed heap pages
/// (and raises its mmap threshold after large frees), so without this RSS stays at its high
/// mark after an unload.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
