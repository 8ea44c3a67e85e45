//! Lifecycle: loading, reloading, unloading and retiring model versions.
//!
//! Operations on one model (load, reload, unload) are serialised by that model's operation
//! lock — a second one waits for the first — while different models load concurrently; under a
//! memory budget or lazy model control loads run one at a time instead (see [`super::ledger`]).
//!
//! A reload loads and warms the new copy beside the old one, then swaps the table entry in one
//! store: requests that found the old copy finish on it, new ones go to the new one. A retired
//! copy drains its runner before its threads exit and its engines are dropped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use super::fingerprint::Fingerprints;
use super::memory;
use super::prepare::LoadError;
use super::{ModelState, Registry, Runner, ServingModel};
use crate::repository::{RepositoryError, VersionSource};

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

/// The lifecycle room's state.
#[derive(Default)]
pub(super) struct Lifecycle {
    /// One operation lock per model name.
    ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// What each version's files were when it was loaded: a poll reloads only changed ones.
    fingerprints: Fingerprints,
}

impl Registry {
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
        self.table.require(names.into_iter().collect());
        Ok(())
    }

    /// The operation lock of `name`: held through a load, reload or unload of it.
    pub(super) fn op_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.lifecycle
            .ops
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

    pub(super) async fn sync(
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
        let spec = match super::spec::load_spec(name, &source.config, &source.dir) {
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
        let fingerprint = self.lifecycle.fingerprints.of(config, &v.dir).unwrap_or(0);
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
                let transient = matches!(&err, LoadError::NoRoom(r) if r.is_transient());
                if transient && self.settings.lazy {
                    // requests wait for room and try again every few hundred ms: not an error
                    tracing::info!(model = name, version, reason = %why, "no room to load yet");
                } else {
                    tracing::error!(model = name, version, error = %why, "model failed to load");
                }
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
        self.metrics.model_loaded(name, reason.as_str());
        let (device, devices) = (p.device().to_string(), p.devices_summary());
        self.metrics
            .set_model_memory(name, version, &device, memory_bytes);
        let memory = Arc::new(super::kv_budget::KvBudget {
            registry: Arc::downgrade(self),
            name: name.to_string(),
            version,
            device: device.clone(),
            weights: memory_bytes,
            runtime: tokio::runtime::Handle::current(),
            making_room: Default::default(),
        });
        let runner = Runner::spawn(
            p.work,
            name,
            metrics.clone(),
            self.metrics.generation(name, version),
            memory,
        );
        let generation = match &runner {
            Runner::Generative(g) => {
                let kv = g.scheduler().geometry();
                let quantized = g
                    .settings()
                    .quantization()
                    .map_or_else(String::new, |q| format!("; weights {q}"));
                format!(
                    "{quantized}; KV cache {} tokens ({} blocks of {}, {}{}), context {} tokens",
                    kv.num_blocks * kv.block_size,
                    kv.num_blocks,
                    kv.block_size,
                    memory::mib(kv.bytes_per_block * kv.num_blocks as u64),
                    match g.scheduler().kv_bytes() {
                        Some(now) => format!(", {} of it now, growing with use", memory::mib(now)),
                        None => String::new(),
                    },
                    kv.context_len
                )
            }
            Runner::Batched(_) => String::new(),
        };
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
            "model ready: {name} v{version} on {devices}{} (load {} ms, warm-up {} ms, {}){}{generation}",
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
            runner,
            device,
            instance_devices: p.devices,
            metrics,
            load_time: p.load_time,
            warmup_time: p.warmup_time,
            loaded_at: SystemTime::now(),
            fingerprint,
            memory_bytes,
            leases: AtomicUsize::new(0),
            last_used: AtomicU64::new(self.ledger.now_us()),
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

    /// Unloads one version: its copy leaves the table at once and is retired.
    pub(super) async fn unload_version(&self, name: &str, version: u64, reason: &str) {
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
    pub(super) async fn remove(self: &Arc<Self>, name: &str) {
        let _ = self.unload(name).await;
        let lock = self.op_lock(name);
        let _op = lock.lock().await;
        let versions: Vec<u64> = self
            .entry(name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default();
        self.forget_entry(name);
        for v in versions {
            self.metrics.forget_state(name, v);
        }
        tracing::info!(model = name, "removed from the repository");
    }

    /// Marks a version whose device failed as failed (if the table still holds that copy) and
    /// lets the copy go: its engines may hold a broken device context. A load brings it back.
    pub(super) fn fail_after_device_failure(&self, copy: &Arc<ServingModel>, reason: &str) {
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

    /// Lets a serving copy go (see [`retire`]), its memory counted as in use on its device
    /// until it is freed.
    async fn retire(&self, serving: Arc<ServingModel>) {
        // the bytes come off the count when the retirement ends, however it ends
        let _counted = self.ledger.retiring(&serving.device, serving.footprint());
        retire(serving).await;
    }
}

/// Lets a serving copy go: waits until requests holding it have finished, its runner has
/// drained and its threads have exited (dropping the engines).
async fn retire(serving: Arc<ServingModel>) {
    let (name, version) = (serving.name.clone(), serving.version);
    // Take the runner out: dropping our Arc leaves the in-flight requests' clones the only ones.
    let runner = match Arc::try_unwrap(serving) {
        Ok(s) => s.runner,
        Err(shared) => shared.runner.clone(),
    };
    runner.retire().await;
    let _ = tokio::task::spawn_blocking(release_free_memory).await;
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
