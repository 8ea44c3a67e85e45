//! aiaas: TorchScript models behind a REST API, with a dynamic batcher per model.
//!
//! Layers, lowest first; each imports only layers below it (`tests/architecture.rs` holds the
//! table and fails on an import against it):
//!
//! ```text
//! server       start-up, shutdown; wires everything below            (all)
//! grpc         KServe v2 over gRPC, beside http and reusing it       http, registry, codec, config, telemetry, tensor
//! http         routes, dialects (native, KServe v2, OpenAI), errors   registry, codec, config, telemetry, tensor
//! registry     models by name: table, lifecycle, on-demand loads,     batcher, codec, engine, config, telemetry,
//!              polling, memory ledger; the kind step (spec.rs)        repository, idle_poll, tensor
//! telemetry    Prometheus metrics                                     batcher, config, generate, tensor
//! codec        payloads <-> tensors per model kind (kinds/)           config, tensor
//! batcher      one queue per model, batches to engine threads        engine, config, tensor
//! generate     sampling, stop strings, streamed detokenisation       engine, config, tensor
//! engine       the only module that touches libtorch                  config, tensor
//! config       model.toml's shared settings and server choices        tensor
//! tensor       plain host tensors, Item and Inferred                  -
//! ```
//!
//! Beside them: [`repository`] (model folders on disk), [`connections`] (the accept loop with
//! its timeouts and cap), [`idle_poll`] (the optional `--idle-poll-us` CPU polling). Config
//! knows no model kind: a kind's file under [`codec::kinds`] reads its own model.toml tables,
//! and [`registry::spec`] runs that kind step for every reader of a model.toml.

pub mod batcher;
pub mod codec;
pub mod config;
pub mod connections;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod idle_poll;
pub mod registry;
pub mod repository;
pub mod server;
pub mod telemetry;
pub mod tensor;

pub use http::{app, AppState};
