//! The table: model name → versions → state and, when ready, a [`ServingModel`]; its lookups,
//! listings and readiness.
//!
//! Reads are lock-free: the table is an immutable map behind an `ArcSwap`, replaced whole on
//! every change (changes are rare: loads, unloads, reloads) under a write lock held for
//! microseconds. A lookup that finds a copy whose device failed marks it failed on the way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};
use serde::Serialize;

use super::{Registry, ServingModel};
use crate::config::model_spec::ModelSpec;
use crate::repository::ModelSource;

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

/// What `/health/ready` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Required models that are not ready, with their state.
    pub waiting_for: BTreeMap<String, ModelState>,
}

/// Every model's entry, by name.
pub(super) type Models = HashMap<String, Arc<ModelEntry>>;

/// How long a repository scan answers listings of models that are not loaded.
const SCAN_REUSE: Duration = Duration::from_secs(1);

/// The table room's state.
#[derive(Default)]
pub(super) struct Table {
    models: ArcSwap<Models>,
    /// Serialises read-modify-write of `models` (held for microseconds, never across awaits).
    write: Mutex<()>,
    /// Models that must be ready for `/health/ready`, set once start-up loading has finished.
    required: OnceLock<HashSet<String>>,
    /// The model folders of the last repository scan and when it ran: listings reuse it for
    /// [`SCAN_REUSE`] instead of reading the disk on every request.
    scanned: Mutex<Option<(Instant, Vec<String>)>>,
}

impl Table {
    /// The table now, without locking.
    pub(super) fn load(&self) -> Guard<Arc<Models>> {
        self.models.load()
    }

    /// The table now, as an `Arc` that may be held across awaits (it holds the serving copies
    /// in it: a retirement waits for it to be dropped).
    pub(super) fn load_full(&self) -> Arc<Models> {
        self.models.load_full()
    }

    /// Replaces the table by `f` applied to a copy of it, under the write lock.
    fn rewrite(&self, f: impl FnOnce(&mut Models)) {
        let _guard = self.write.lock().expect("registry write lock");
        let mut models: Models = (**self.models.load()).clone();
        f(&mut models);
        self.models.store(Arc::new(models));
    }

    /// Marks start-up loading as over: `/health/ready` waits for `names` from now on.
    pub(super) fn require(&self, names: HashSet<String>) {
        let _ = self.required.set(names);
    }
}

impl Registry {
    /// Changes `name`'s entry (a new, empty one if it has none) and sets its versions' state
    /// gauges.
    pub(super) fn update(&self, name: &str, f: impl FnOnce(&mut ModelEntry)) {
        self.table.rewrite(|models| {
            let mut entry = models.get(name).map(|e| (**e).clone()).unwrap_or_default();
            f(&mut entry);
            for (version, v) in &entry.versions {
                self.metrics.set_state(name, *version, v.state.as_str());
            }
            models.insert(name.to_string(), Arc::new(entry));
        });
    }

    /// Takes `name` out of the table.
    pub(super) fn forget_entry(&self, name: &str) {
        self.table.rewrite(|models| {
            models.remove(name);
        });
    }

    pub(super) fn set_version(
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

    pub(super) fn set_model_error(&self, name: &str, error: String) {
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
        match found.runner.failure() {
            None => Ok(found),
            Some(reason) => {
                drop(table);
                self.fail_after_device_failure(&found, &reason);
                Err(not_ready(ModelState::Failed, Some(reason)))
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
        let mut scanned = self.table.scanned.lock().expect("scan lock");
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
            .filter_map(|s| s.runner.failure().map(|reason| (s.clone(), reason)))
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

    /// The versions of `name` with a serving copy in memory.
    pub(super) fn loaded_versions(&self, name: &str) -> Vec<u64> {
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

    /// The model's folder and parsed spec from disk (for models not loaded).
    pub fn spec_on_disk(&self, name: &str) -> Result<(ModelSource, ModelSpec), String> {
        let source = self.repo.find(name).map_err(|e| e.to_string())?;
        let spec =
            super::spec::load_spec(name, &source.config, &source.dir).map_err(|e| e.to_string())?;
        Ok((source, spec))
    }

    /// Ready once start-up loading is over and every required model has a ready version.
    pub fn readiness(&self) -> Readiness {
        let Some(required) = self.table.required.get() else {
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
                    self.metrics.set_pending(name, *version, s.runner.queued());
                    if let Some(reason) = s.runner.failure() {
                        failed.push((s.clone(), reason));
                    }
                }
            }
        }
        for (copy, reason) in failed {
            self.fail_after_device_failure(&copy, &reason);
        }
        self.ledger.refresh_gpu_gauges();
    }
}
