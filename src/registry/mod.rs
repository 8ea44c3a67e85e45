//! The registry: model name → versions → state and, when ready, a [`ServingModel`].
//!
//! Reads are lock-free: the table is an immutable map behind an `ArcSwap`, replaced whole on
//! every change (changes are rare: loads, unloads, reloads). Operations on one model (load,
//! reload, unload) are serialised by that model's operation lock — a second one waits for the
//! first — while different models load concurrently.
//!
//! A reload loads and warms the new copy beside the old one, then swaps the table entry in one
//! store: requests that found the old copy finish on it, new ones go to the new one. A retired
//! copy drains its queue before its threads exit and its engines are dropped.

mod fingerprint;
mod prepare;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

use self::fingerprint::Fingerprints;
use self::prepare::prepare;
pub use self::prepare::LoadError;
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
}

impl ModelState {
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
    pub loaded_at: SystemTime,
    /// Content fingerprint of the files it was loaded from.
    fingerprint: u64,
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

/// Settings that apply to every model the registry loads.
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    pub image_limits: ImageLimits,
    /// Longest text instance accepted, in bytes (0: no limit).
    pub max_text_bytes: usize,
    /// `--idle-poll-us`: each model's queue and engine threads poll for work within its window
    /// before they block.
    pub idle_polling: IdlePolling,
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
}

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
        })
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
            tracing::warn!(repository = %self.repo.root().display(), "no models to load");
        }
        let tasks: Vec<_> = names
            .iter()
            .cloned()
            .map(|name| {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.load(&name).await {
                        tracing::error!(model = %name, error = %e, "start-up load failed");
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        *self.required.lock().expect("required lock") = Some(names.into_iter().collect());
        Ok(())
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
        self.sync(name, false).await
    }

    /// Loads every selected version of `name` again from disk, beside the serving copies,
    /// and swaps them in once warm.
    pub async fn reload(self: &Arc<Self>, name: &str) -> Result<(), ManageError> {
        self.sync(name, true).await
    }

    async fn sync(self: &Arc<Self>, name: &str, force: bool) -> Result<(), ManageError> {
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
            .filter(|v| wanted.contains(&v.version))
            .cloned()
            .map(|v| {
                let me = self.clone();
                let name = name.to_string();
                let config = source.config.clone();
                tokio::spawn(async move { me.load_version(&name, &config, v, force).await })
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
        let started = Instant::now();
        let (settings, engines) = (self.settings.clone(), self.engines.clone());
        let (name_owned, config_owned) = (name.to_string(), config.to_path_buf());
        let loaded = tokio::task::spawn_blocking(move || {
            prepare(&name_owned, &config_owned, &v, &settings, engines.as_ref())
        })
        .await
        .unwrap_or_else(|e| Err(LoadError::Task(e.to_string())));
        let p = match loaded {
            Ok(p) => p,
            Err(err) => {
                let reason = err.to_string();
                tracing::error!(model = name, version, error = %reason, "model failed to load");
                match old {
                    // keep serving the old copy; say why the new one was not taken
                    Some(old) => self.set_version(
                        name,
                        version,
                        ModelState::Ready,
                        Some(format!(
                            "reload failed, still serving the previous copy: {reason}"
                        )),
                        Some(old),
                    ),
                    None => self.set_version(name, version, ModelState::Failed, Some(reason), None),
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
        let handle = ModelHandle::spawn(p.batch_config, p.engines, metrics.clone());
        tracing::info!(
            model = name,
            version,
            device = %p.device,
            instances = p.spec.instances,
            max_batch_size = p.spec.batching.max_batch_size,
            load_ms = p.load_time.as_millis() as u64,
            warmup_ms = p.warmup_time.as_millis() as u64,
            "model ready: {name} v{version} on {} (load {} ms, warm-up {} ms){}",
            p.device,
            p.load_time.as_millis(),
            p.warmup_time.as_millis(),
            if old.is_some() { ", swapped in" } else { "" }
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
            loaded_at: SystemTime::now(),
            fingerprint,
        });
        self.set_version(name, version, ModelState::Ready, None, Some(serving));
        if let Some(old) = old {
            // requests that found the old copy finish on it; it goes once they are done
            tokio::spawn(retire(old));
        }
        Ok(())
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
        let versions: Vec<u64> = self
            .entry(name)
            .map(|e| {
                e.versions
                    .iter()
                    .filter(|(_, v)| v.serving.is_some())
                    .map(|(k, _)| *k)
                    .collect()
            })
            .unwrap_or_default();
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
            retire(serving).await;
            self.metrics.forget_model(name, version);
        }
        self.set_version(
            name,
            version,
            ModelState::Unavailable,
            Some(reason.to_string()),
            None,
        );
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
        let known: Vec<String> = self.table.load().keys().cloned().collect();
        let mut tasks = Vec::new();
        for name in &on_disk {
            let me = self.clone();
            let name = name.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = me.load(&name).await {
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

    pub fn entry(&self, name: &str) -> Option<Arc<ModelEntry>> {
        self.table.load().get(name).cloned()
    }

    /// The model's folder and parsed spec from disk (for models not loaded).
    pub fn spec_on_disk(&self, name: &str) -> Result<(ModelSource, ModelSpec), String> {
        let source = self.repo.find(name).map_err(|e| e.to_string())?;
        let spec = ModelSpec::load(name, &source.config, &source.dir).map_err(|e| e.to_string())?;
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

    /// Rows queued per ready model version, for the pending-requests gauge.
    pub fn refresh_gauges(&self) {
        for (name, entry) in self.table.load().iter() {
            for (version, v) in &entry.versions {
                if let Some(s) = &v.serving {
                    self.metrics.set_pending(name, *version, s.handle.queued());
                }
            }
        }
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
