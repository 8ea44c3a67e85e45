//! Model management (admin): load, unload and reload without a restart.
//!
//! Every route here is in the route table as `Access::Admin`, so one authorisation layer wraps
//! them all (see [`super::app`]). They answer with the model's description after the change.
//! Operations on one model are serialised: a second one waits for the first to finish.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::Value;

use super::models::model_json;
use super::{ApiError, AppState};
use crate::config::ModelControl;

/// Refuses changes unless the server runs with `--model-control explicit` (or `lazy`).
fn allowed(state: &AppState) -> Result<(), ApiError> {
    match state.settings.model_control {
        mode if mode.allows_management() => Ok(()),
        mode => Err(ApiError::Forbidden(format!(
            "model control mode is '{}': the repository is {}; start the server with --model-control explicit (or lazy) to load, unload and reload through the API",
            mode.as_str(),
            if mode == ModelControl::Poll { "followed from disk" } else { "fixed at start-up" }
        ))),
    }
}

/// `POST /v1/models/{name}/load`: loads the model's selected versions from the repository;
/// versions already loaded from unchanged files are kept as they are.
pub async fn load(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    allowed(&state)?;
    state.registry.load(&name).await?;
    Ok(Json(model_json(&state, &name, None)?))
}

/// `POST /v1/models/{name}/reload`: loads the files now on disk beside the serving copies and
/// swaps them in atomically once warm; the old copies finish their requests, then go.
pub async fn reload(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    allowed(&state)?;
    state.registry.reload(&name).await?;
    Ok(Json(model_json(&state, &name, None)?))
}

/// `POST /v1/models/{name}/unload` and `DELETE /v1/models/{name}`: new requests are refused
/// at once, accepted ones complete, then the model's memory is released. Answers when done.
pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    allowed(&state)?;
    state.registry.unload(&name).await?;
    Ok(Json(model_json(&state, &name, None)?))
}
