//! The memory budget as a generative model's growing KV pool sees it: the pool asks for room
//! before it grows (a sync call from its scheduler thread), and the ledger asks pools to give
//! back their unused blocks before it evicts any model.
//!
//! A pool that grows with use (the CPU's) counts as its model's footprint beside the weights:
//! [`ServingModel::footprint`](super::ServingModel::footprint). When the budget has no room for a
//! pool to grow, the request is refused for now and room is made in the background (other pools
//! give back, then idle models are evicted least recently used first); the scheduler asks again
//! a little later, its sequences waiting meanwhile. What the pool can hold at most is the budget
//! less its model's own memory and that of the models never evicted for it (pinned ones, and
//! all without lazy model control): a sequence longer than that is refused at admission.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use super::Registry;
use crate::generate::scheduler::{KvCeiling, KvMemory};

/// One model version's KV pool in the budget.
pub(super) struct KvBudget {
    pub registry: Weak<Registry>,
    pub name: String,
    pub version: u64,
    pub device: String,
    /// What the model holds besides its KV pool, measured at load.
    pub weights: u64,
    pub runtime: tokio::runtime::Handle,
    /// Room is being made for this pool now.
    pub making_room: Arc<AtomicBool>,
}

impl KvMemory for KvBudget {
    fn grow(&self, bytes: u64) -> bool {
        let Some(registry) = self.registry.upgrade() else {
            return false;
        };
        let Some(budget) = registry.ledger.budget_of(&self.device) else {
            return true;
        };
        let used = registry.footprint_on(&self.device);
        if used.saturating_add(bytes) <= budget {
            return true;
        }
        if !self.making_room.swap(true, Ordering::AcqRel) {
            let (name, device, flag) = (
                self.name.clone(),
                self.device.clone(),
                self.making_room.clone(),
            );
            self.runtime.spawn(async move {
                if let Err(e) = registry.make_room(&name, &device, bytes).await {
                    tracing::debug!(model = %name, error = %e, "no room for the KV cache to grow");
                }
                flag.store(false, Ordering::Release);
            });
        }
        false
    }

    fn ceiling(&self) -> Option<KvCeiling> {
        let registry = self.registry.upgrade()?;
        let budget = registry.ledger.budget_of(&self.device)?;
        Some(KvCeiling {
            budget,
            weights: self.weights,
            kept: registry.kept_on(&self.device, &self.name),
        })
    }

    fn resized(&self, _bytes: u64) {
        if let Some(registry) = self.registry.upgrade() {
            registry.kv_resized(&self.name, self.version);
        }
    }
}
