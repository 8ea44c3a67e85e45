//! Generation's plain-Rust parts, testable without libtorch: how the next token is chosen
//! ([`sampling`]), where an answer stops ([`stop`]), how tokens become streamed text
//! ([`detok`]) and how chat messages become a prompt ([`template`]). The scheduler that steps a
//! model's running sequences over its paged KV cache joins them here.

pub mod detok;
pub mod observe;
pub mod sampling;
pub mod stop;
pub mod template;
