//! Configuration: model specifications (`model.toml`) and server-wide choices.

pub mod model_spec;
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
}

impl ModelControl {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelControl::None => "none",
            ModelControl::Explicit => "explicit",
            ModelControl::Poll => "poll",
        }
    }
}
