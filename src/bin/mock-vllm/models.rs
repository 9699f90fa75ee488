//! `/health`, `/version` and `/v1/models`, as vLLM answers them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::cli::VERSION;
use crate::openai::{ModelCard, ModelList};
use crate::state::{AppState, unix_now};

/// The context length `/v1/models` advertises, a common vLLM setting.
pub(crate) const MAX_MODEL_LEN: u64 = 8192;

pub(crate) async fn health(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.stats.health_hung.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if state.stats.engine_dead.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::OK
}

pub(crate) async fn version() -> Json<Value> {
    Json(json!({ "version": VERSION }))
}

pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let card = ModelCard {
        id: &state.served_model,
        object: "model",
        created: unix_now(),
        owned_by: "vllm",
        root: &state.served_model,
        parent: None,
        max_model_len: MAX_MODEL_LEN,
        permission: Vec::new(),
    };
    Json(ModelList {
        object: "list",
        data: vec![card],
    })
    .into_response()
}
