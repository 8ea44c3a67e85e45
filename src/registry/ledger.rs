//! The memory ledger: what each model version holds on its device, what is in use, and room
//! made in the budget for a load, evicting least recently used idle models under lazy model
//! control (the rules themselves are [`super::memory`]'s).
//!
//! Under a budget (or lazy model control) loads run one at a time through the ledger's load
//! gate, so that each footprint is measured alone and room is made for one load after another.
//! The ledger keeps each version's last measured footprint as the estimate for its next load,
//! and counts copies being retired as in use until their memory is freed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::memory::{self, plan_evictions, MemoryBudget, NoRoom, Resident};
use super::prepare::{self, parse, prepare, LoadError};
use super::table::Models;
use super::{blocking, Registry, RegistrySettings, ServingModel};
use crate::engine::EngineFactory;
use crate::repository::VersionSource;
use crate::telemetry::Metrics;

/// The memory room's state and accounts.
pub(super) struct MemoryLedger {
    budget: MemoryBudget,
    /// Lazy model control: idle models are evicted to make room (else a load that does not fit
    /// is refused).
    evicts: bool,
    engines: Arc<dyn EngineFactory>,
    metrics: Arc<Metrics>,
    /// One version loads at a time under a budget: its footprint is measured alone, and room
    /// in the budget is made for one load after another.
    load_gate: tokio::sync::Mutex<()>,
    books: Mutex<Books>,
    /// The clock for least-recently-used order.
    epoch: Instant,
}

/// Which files a footprint was measured for: name, version and content fingerprint.
type FootprintKey = (String, u64, u64);

#[derive(Default)]
struct Books {
    /// The last measured footprint of each version's files, kept after eviction: the estimate
    /// for its next load.
    footprints: HashMap<FootprintKey, u64>,
    /// Bytes per device of copies unloaded but still draining (their memory not yet freed):
    /// counted as in use until they are gone.
    retiring: HashMap<String, u64>,
}

/// Counts a retiring copy's bytes as in use on its device until dropped.
pub(super) struct Retiring<'a> {
    ledger: &'a MemoryLedger,
    device: String,
    bytes: u64,
}

impl Drop for Retiring<'_> {
    fn drop(&mut self) {
        if let Ok(mut books) = self.ledger.books.lock() {
            if let Some(slot) = books.retiring.get_mut(&self.device) {
                *slot = slot.saturating_sub(self.bytes);
            }
        }
    }
}

impl MemoryLedger {
    pub(super) fn new(
        settings: &RegistrySettings,
        engines: Arc<dyn EngineFactory>,
        metrics: Arc<Metrics>,
    ) -> Self {
        MemoryLedger {
            budget: settings.memory_budget.clone(),
            evicts: settings.lazy,
            engines,
            metrics,
            load_gate: tokio::sync::Mutex::new(()),
            books: Mutex::new(Books::default()),
            epoch: Instant::now(),
        }
    }

    /// The budget on `device`, if it has one.
    pub(super) fn budget_of(&self, device: &str) -> Option<u64> {
        self.budget.limit(device)
    }

    /// Bytes of copies retiring from `device`, still counted as in use.
    fn retiring_on(&self, device: &str) -> u64 {
        let books = self.books.lock().expect("ledger lock");
        books.retiring.get(device).copied().unwrap_or(0)
    }

    /// Now on the least-recently-used clock, in microseconds.
    pub(super) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Under a budget (or lazy model control), waits for the loads before this one.
    async fn gate(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.evicts || !self.budget.is_unlimited() {
            true => Some(self.load_gate.lock().await),
            false => None,
        }
    }

    /// The footprint last measured for these files.
    fn footprint(&self, key: &FootprintKey) -> Option<u64> {
        let books = self.books.lock().expect("ledger lock");
        books.footprints.get(key).copied()
    }

    fn remember_footprint(&self, key: FootprintKey, bytes: u64) {
        let mut books = self.books.lock().expect("ledger lock");
        books.footprints.insert(key, bytes);
    }

    /// Counts `bytes` on `device` as in use until the returned guard is dropped.
    pub(super) fn retiring(&self, device: &str, bytes: u64) -> Retiring<'_> {
        let mut books = self.books.lock().expect("ledger lock");
        *books.retiring.entry(device.to_string()).or_default() += bytes;
        Retiring {
            ledger: self,
            device: device.to_string(),
            bytes,
        }
    }

    /// Bytes in use on `device` now: the runtime's own count where it keeps one, else the
    /// process's heap in use for the CPU.
    fn in_use(&self, device: &str) -> Option<u64> {
        self.engines
            .memory_in_use(device)
            .or_else(|| (device == "cpu").then(memory::heap_in_use_bytes).flatten())
    }

    /// Bytes in use over `devices` together; `None` where one of them has no count.
    fn in_use_on(&self, devices: &[String]) -> Option<u64> {
        devices.iter().map(|d| self.in_use(d)).sum()
    }

    /// Which of `resident` to evict so that `need` more bytes fit on `device`, where the
    /// serving copies hold `used` bytes and retiring ones the rest.
    fn plan(
        &self,
        device: &str,
        budget: u64,
        used: u64,
        need: u64,
        resident: &[Resident],
    ) -> Result<Vec<String>, NoRoom> {
        let retiring = self.retiring_on(device);
        plan_evictions(device, budget, used + retiring, need, resident, self.evicts)
    }

    /// Sets the model-memory gauges from `models`: per device, the footprint of every version
    /// in memory, and the budget.
    fn refresh_gauges(&self, models: &Models) {
        let mut resident: BTreeMap<String, u64> = BTreeMap::new();
        resident.insert("cpu".into(), 0);
        for (device, _) in self.budget.named() {
            resident.insert(device.to_string(), 0);
        }
        for entry in models.values() {
            for s in entry.versions.values().filter_map(|v| v.serving.as_ref()) {
                *resident.entry(s.device.clone()).or_default() += s.footprint();
            }
        }
        for (device, bytes) in resident {
            let budget = self.budget.limit(&device);
            self.metrics.set_device_memory(&device, bytes, budget);
        }
    }

    /// Sets each GPU's allocator gauges.
    pub(super) fn refresh_gpu_gauges(&self) {
        for gpu in self.engines.gpu_memory() {
            self.metrics
                .set_gpu_memory(&gpu.device, gpu.allocated, gpu.reserved);
        }
    }
}

impl Registry {
    /// Parses the version's spec, makes room for it in the memory budget, loads and warms it
    /// up, and measures its footprint. Under a budget (or lazy model control) loads run one at
    /// a time, each measured alone, and this returns with the load gate held: the caller puts
    /// the version in the table before the next load counts what is in memory. Otherwise loads
    /// overlap as before, and a footprint may include another load's memory.
    pub(super) async fn load_measured(
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
        let file_bytes = prepare::footprint_floor(&spec, self.engines.as_ref());
        let gate = self.ledger.gate().await;
        // the same files measure the same: a changed file is estimated afresh
        let key = (name.to_string(), version, fingerprint);
        let estimate = self.ledger.footprint(&key).unwrap_or(file_bytes);
        self.make_room(name, &device, estimate).await?;
        let before = self.ledger.in_use_on(&devices);
        let (settings, engines) = (self.settings.clone(), self.engines.clone());
        let p = blocking(move || prepare(spec, &settings, engines.as_ref())).await?;
        // memory in use after warm-up, less before, over every device its instances use; at
        // least the weights' file size (memory other requests free meanwhile makes the
        // difference too small)
        // a KV pool that grows with use is counted apart (its memory is outside the heap)
        let floor = file_bytes.saturating_sub(p.kv_counted_apart());
        let measured = match (before, self.ledger.in_use_on(&devices)) {
            (Some(before), Some(after)) => after.saturating_sub(before).max(floor),
            _ => floor,
        };
        if measured + p.kv_counted_apart() > estimate {
            // the first load of a version is estimated from its file: make the rest of the room
            self.make_room(name, p.device(), measured + p.kv_counted_apart())
                .await?;
        }
        // kept only once it fits: a measurement inflated by other requests' memory must not
        // refuse the model for good
        self.ledger.remember_footprint(key, measured);
        Ok((p, measured, gate))
    }

    /// Makes `need` bytes of room on `device` for a version of `name` (no-op without a budget
    /// for it): evicts least recently used idle models under lazy model control, else refuses
    /// a load that does not fit. Models whose operation lock is held (loading, unloading) count
    /// as busy, so this never waits on another model's operation.
    pub(super) async fn make_room(
        &self,
        name: &str,
        device: &str,
        need: u64,
    ) -> Result<(), NoRoom> {
        let Some(budget) = self.ledger.budget.limit(device) else {
            return Ok(());
        };
        self.take_back_kv(name, device, budget, need).await;
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
            let bytes: u64 = copies.iter().map(|s| s.footprint()).sum();
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
        let victims = self.ledger.plan(device, budget, used, need, &resident)?;
        // only the victims stay locked while they drain
        locks.retain(|model, _| victims.contains(model));
        for victim in victims {
            let _op = locks.remove(&victim);
            self.evict(&victim, name).await;
        }
        Ok(())
    }

    /// What the models on `device` other than `name` that are never evicted to make room (the
    /// pinned ones; all of them without lazy model control) hold besides their KV pools, which
    /// give their memory back when asked.
    pub(super) fn kept_on(&self, device: &str, name: &str) -> u64 {
        let table = self.table.load();
        table
            .iter()
            .filter(|(model, _)| model.as_str() != name)
            .flat_map(|(_, e)| e.versions.values())
            .filter_map(|v| v.serving.as_ref())
            .filter(|s| s.device == device && (!self.settings.lazy || s.spec.pinned))
            .map(|s| s.memory_bytes)
            .sum()
    }

    /// What the serving copies on `device` hold now, and copies retiring from it.
    pub(super) fn footprint_on(&self, device: &str) -> u64 {
        let table = self.table.load();
        let serving: u64 = table
            .values()
            .flat_map(|e| e.versions.values())
            .filter_map(|v| v.serving.as_ref())
            .filter(|s| s.device == device)
            .map(|s| s.footprint())
            .sum();
        serving + self.ledger.retiring_on(device)
    }

    /// Before any model is evicted for `need` bytes on `device`: asks the generative models
    /// there (`name`'s excepted) to give back KV pool memory no sequence holds, the largest
    /// pools first, until `need` fits or none has more to give.
    async fn take_back_kv(&self, name: &str, device: &str, budget: u64, need: u64) {
        let table = self.table.load_full();
        let mut pools: Vec<(u64, Arc<ServingModel>)> = table
            .iter()
            .filter(|(model, _)| model.as_str() != name)
            .flat_map(|(_, e)| e.versions.values())
            .filter_map(|v| v.serving.clone())
            .filter(|s| s.device == device && s.runner.kv_bytes() > 0)
            .map(|s| (s.runner.kv_bytes(), s))
            .collect();
        drop(table);
        pools.sort_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
        for (_, s) in pools {
            let used = self.footprint_on(device);
            let short = (used + need).saturating_sub(budget);
            if short == 0 {
                return;
            }
            if let Some(g) = s.generator() {
                let given = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    g.scheduler().give_back(short),
                )
                .await
                .unwrap_or(0);
                if given > 0 {
                    tracing::info!(
                        model = %s.name,
                        for_model = name,
                        mib = given >> 20,
                        "KV cache memory given back to make room for {name}"
                    );
                }
            }
        }
    }

    /// A KV pool changed size: its model's memory gauge and the device's follow.
    pub(super) fn kv_resized(&self, name: &str, version: u64) {
        let table = self.table.load();
        let copy = table
            .get(name)
            .and_then(|e| e.versions.get(&version))
            .and_then(|v| v.serving.as_ref());
        if let Some(s) = copy {
            self.metrics
                .set_model_memory(name, version, &s.device, s.footprint());
        }
        drop(table);
        self.refresh_memory_gauges();
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

    /// Sets the model-memory gauges from the table.
    pub(super) fn refresh_memory_gauges(&self) {
        self.ledger.refresh_gauges(&self.table.load());
    }
}
