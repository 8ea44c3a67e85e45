//! On-demand loading and leases (lazy model control).
//!
//! A request takes the version that serves it as a [`ModelLease`]: while any lease is alive
//! the version is busy and never evicted. Under lazy model control a model that is not in
//! memory is loaded when a request needs it; the requests that arrive meanwhile wait for the
//! same load, each within its own deadline.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    LoadReason, LookupError, ManageError, ModelState, Registry, ServingModel, VersionEntry,
};

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

/// The outcome of an on-demand load, once it is known.
type LoadWatch = tokio::sync::watch::Receiver<Option<Result<(), String>>>;

/// The on-demand room's state: the loads under way, by model name; the requests for a model
/// wait on the same load.
#[derive(Default)]
pub(super) struct OnDemand {
    pending: Mutex<HashMap<String, LoadWatch>>,
}

/// Removes a model's on-demand load from the registry when dropped.
struct ForgetOnDemand<'a>(&'a Registry, &'a str);

impl Drop for ForgetOnDemand<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.0.on_demand.pending.lock() {
            pending.remove(self.1);
        }
    }
}

/// How long a request waits for a model to load when neither it nor the model says.
const DEFAULT_LOAD_WAIT: Duration = Duration::from_secs(30);

/// How often a request whose model found no room (busy models hold the budget) tries again.
const ROOM_RETRY: Duration = Duration::from_millis(200);

impl Registry {
    /// Lists a model that is not in memory as unloaded, with the versions its policy selects
    /// (lazy model control); a model being loaded or in memory is left alone. Returns whether
    /// it is pinned (and so loads at start-up).
    pub(super) fn register_unloaded(&self, name: &str) -> bool {
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

    /// Takes the version that serves `name` for one request. Under lazy model control a model
    /// that is not in memory is loaded first (requests that arrive meanwhile wait for the same
    /// load), the wait bounded by `deadline` (else the model's timeout): the lease then says how
    /// long it waited. A model that failed to load is not tried again until the next repository
    /// scan; one that found the budget held by busy models is tried again every
    /// [`ROOM_RETRY`] until one becomes idle or the deadline passes (then 503, naming them).
    pub async fn acquire(
        self: &Arc<Self>,
        name: &str,
        version: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<ModelLease, LookupError> {
        let started = Instant::now();
        let mut limit: Option<Instant> = None;
        let mut failure = None;
        // a model evicted again between its load and this request taking it (a budget that
        // holds few models) is loaded once more, while the deadline allows
        let mut reloads = 0;
        while reloads < 3 {
            let missing = match self.serving(name, version) {
                Ok(model) => {
                    // zero when it was in memory at once
                    let waited = limit.map_or(Duration::ZERO, |_| started.elapsed());
                    return Ok(ModelLease::new(model, waited, self.ledger.now_us()));
                }
                Err(e) => e,
            };
            if let Some(reason) = failure.take() {
                let state = self.entry(name).map_or(ModelState::Failed, |e| e.state());
                // the budget's room is held by busy models (the load left it unloaded, to be
                // tried again): wait for one to become idle, within the deadline
                let retry_at = Instant::now() + ROOM_RETRY;
                if state != ModelState::Unloaded || limit.is_none_or(|l| retry_at >= l) {
                    // the load failed and nothing serves: say why
                    return Err(LookupError::NotReady {
                        name: name.to_string(),
                        state,
                        reason: Some(reason),
                    });
                }
                tokio::time::sleep_until(retry_at.into()).await;
            } else if limit.is_some() {
                reloads += 1;
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
            .map(|model| ModelLease::new(model, started.elapsed(), self.ledger.now_us()))
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
        let mut pending = self.on_demand.pending.lock().expect("on-demand lock");
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
}
