//! Generation's plain-Rust parts, testable without libtorch: how the next token is chosen
//! ([`sampling`]), where an answer stops ([`stop`]) and how tokens become streamed text
//! ([`detok`]). The scheduler that steps a model's running sequences over its paged KV cache
//! joins them here.

pub mod detok;
pub mod generator;
pub mod observe;
pub mod sampling;
pub mod scheduler;
pub mod settings;
pub mod stop;
pub mod template;
