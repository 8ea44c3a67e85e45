//! aiaas: TorchScript models behind a REST API, with a dynamic batcher per model.
//!
//! Layers, each knowing only the one below: [`http`] → [`codec`] / [`registry`] → [`batcher`] →
//! [`engine`]. [`tensor`] is the plain-data currency between them; [`engine::torch`] is the only
//! module that touches libtorch; [`connections`] is the accept loop with its timeouts and cap.
//! [`idle_poll`] is the optional `--idle-poll-us` CPU polling.

pub mod batcher;
pub mod codec;
pub mod config;
pub mod connections;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod idle_poll;
pub mod registry;
pub mod repository;
pub mod server;
pub mod telemetry;
pub mod tensor;

pub use http::{app, AppState};
