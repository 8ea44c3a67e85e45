//! Configuration: model specifications (`model.toml`) and server-wide choices.

pub mod model_spec;
pub mod size;
pub mod torchscript;

use serde::Serialize;

/// How the model repository is managed at run time (Triton's model control modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// Load every model (or those named with --load-model) at start-up; the management API is
    /// read-only.
    #[default]
    None,
    /// Load at start-up as in `none`; then load, unload and reload through the management API.
    Explicit,
    /// Load at start-up as in `none`; then follow the repository on disk: new, changed and
    /// removed models or versions are loaded, reloaded or unloaded automatically. The disk is
    /// the source of truth, so the management API is read-only.
    Poll,
    /// Every model in the repository is listed as unloaded at start-up (pinned ones load); the
    /// first request for a model loads it, and under `--model-memory-budget` the least recently
    /// used idle models are evicted to make room. The repository is scanned for new and removed
    /// models as in `poll`; the management API loads (warms) and unloads (evicts) as in
    /// `explicit`.
    Lazy,
}

impl ModelControl {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelControl::None => "none",
            ModelControl::Explicit => "explicit",
            ModelControl::Poll => "poll",
            ModelControl::Lazy => "lazy",
        }
    }

    /// Whether the management API may load and unload models.
    pub fn allows_management(self) -> bool {
        matches!(self, ModelControl::Explicit | ModelControl::Lazy)
    }

    /// Whether the repository is scanned for changes at run time.
    pub fn polls(self) -> bool {
        matches!(self, ModelControl::Poll | ModelControl::Lazy)
    }
}
