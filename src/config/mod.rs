//! Configuration: model specifications (`model.toml`).

pub mod model_spec;
