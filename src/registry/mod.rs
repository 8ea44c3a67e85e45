//! The registry: model name → versions → state and, when ready, a [`ServingModel`].
//!
//! It is split into rooms, one per job, each owning its own state:
//! - `table.rs`: the table and its states, lookups, listings and readiness (lock-free reads);
//! - `lifecycle.rs`: load, reload, unload and retirement, one operation at a time per model;
//! - `on_demand.rs`: leases, and loading a model when a request needs it (lazy model control);
//! - `ledger.rs`: memory accounting, room in the budget and eviction (the rules: [`memory`]);
//! - `poll.rs`: repository polling;
//! - `serving.rs`: a serving version and its [`Runner`], the seam for how a model runs;
//! - `prepare.rs` loads and warms one version, `fingerprint.rs` tells changed files.

mod fingerprint;
mod kv_budget;
mod ledger;
mod lifecycle;
pub mod memory;
mod on_demand;
mod poll;
mod prepare;
mod serving;
pub mod spec;
mod table;

use std::sync::Arc;

use self::ledger::MemoryLedger;
use self::lifecycle::Lifecycle;
pub use self::lifecycle::{LoadReason, ManageError};
use self::memory::MemoryBudget;
pub use self::on_demand::ModelLease;
use self::on_demand::OnDemand;
pub use self::prepare::LoadError;
pub use self::serving::{Runner, ServingModel};
use self::table::Table;
pub use self::table::{LookupError, ModelEntry, ModelState, Readiness, VersionEntry};
/// Why a request to a model's queue was not answered: part of the registry's API, since its
/// models' handles return it.
pub use crate::batcher::InferError;
/// What the API layer uses of generative models: part of the registry's API, since its
/// generative models answer with them.
pub mod generate {
    pub use crate::generate::constraint::{GrammarError, GrammarSpec};
    pub use crate::generate::generator::{GenerateError, GenerateParams, Generator};
    pub use crate::generate::sampling::{ParamError, MAX_TOP_LOGPROBS};
    pub use crate::generate::scheduler::{Event, Finish, SequenceError, SubmitError, TokenInfo};
    pub use crate::generate::tools::{
        call_json, forced_grammar, parse_choice, parse_tools, split_answer, Tool, ToolChoice,
        ToolEvent, ToolFormat, ToolParser,
    };
}
use crate::codec::ImageLimits;
use crate::engine::EngineFactory;
use crate::idle_poll::IdlePolling;
use crate::repository::ModelRepository;
use crate::telemetry::Metrics;

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

/// The registry (see the module documentation): what it is given, then each room's state.
pub struct Registry {
    repo: ModelRepository,
    settings: RegistrySettings,
    /// How engines are built: libtorch in the server, a fake in tests.
    engines: Arc<dyn EngineFactory>,
    metrics: Arc<Metrics>,
    /// The table, its write lock, the models required for readiness, the last scan.
    table: Table,
    /// One operation lock per model, and the fingerprints of loaded files.
    lifecycle: Lifecycle,
    /// On-demand loads under way.
    on_demand: OnDemand,
    /// Footprints, copies being retired, the load gate and the least-recently-used clock.
    ledger: MemoryLedger,
}

impl Registry {
    pub fn new(
        repo: ModelRepository,
        settings: RegistrySettings,
        engines: Arc<dyn EngineFactory>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ledger: MemoryLedger::new(&settings, engines.clone(), metrics.clone()),
            repo,
            settings,
            engines,
            metrics,
            table: Table::default(),
            lifecycle: Lifecycle::default(),
            on_demand: OnDemand::default(),
        })
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
