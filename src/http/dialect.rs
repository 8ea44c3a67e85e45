//! The API dialects the server speaks. Each route declares its own in the route table
//! ([`super::routes`]); the router gives every route of a dialect the middleware of that
//! dialect, so that its handlers' errors and its middleware's (authorisation, limits, body
//! reading, unknown methods) are answered in one shape, never guessed from the path.

use axum::response::{IntoResponse, Response};

use super::{openai, v2, ApiError};

/// Which API a route belongs to: it decides the shape and statuses of the route's error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The native API (`/v1`, `/health`, `/metrics`, and paths no route matches):
    /// `{"error": {"code", "message"}}`.
    Native,
    /// KServe's Open Inference Protocol (`/v2`): `{"error": "message"}` with Triton's statuses.
    V2,
    /// OpenAI's API (`/v1/embeddings`): `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
}

impl Dialect {
    /// Every dialect.
    pub const ALL: [Dialect; 3] = [Dialect::Native, Dialect::V2, Dialect::OpenAi];

    /// `err` answered in this dialect.
    pub fn error_response(self, err: ApiError) -> Response {
        match self {
            Dialect::Native => err.into_response(),
            Dialect::V2 => v2::error_response(err),
            Dialect::OpenAi => openai::error_response(err, None),
        }
    }
}
