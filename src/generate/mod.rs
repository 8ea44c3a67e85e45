//! Generation, in plain Rust over the engine's [`Decoder`](crate::engine::Decoder) trait: the
//! [`scheduler`] steps a model's running sequences together over its paged KV cache (continuous
//! batching); the [`generator`] is the model as the API sees it (checkpoint text, request
//! checks, choices) with its [`settings`] from model.toml. The pieces they use: how the next
//! token is chosen ([`sampling`]), where an answer stops ([`stop`]), how tokens become streamed
//! text ([`detok`]), how chat messages become a prompt ([`template`]) and what the scheduler
//! reports for metrics ([`observe`]).

pub mod constraint;
pub mod detok;
pub mod generator;
pub mod observe;
pub mod sampling;
pub mod scheduler;
pub mod settings;
pub mod stop;
pub mod template;
pub mod tools;
