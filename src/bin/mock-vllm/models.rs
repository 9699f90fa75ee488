//! `/health` (and `/ping`, its SageMaker name), `/version` and `/v1/models`, as vLLM answers them.

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

/// One card per served name, each rooted at the model as given, as vLLM lists them.
pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let created = unix_now();
    let cards = state
        .served_model_names
        .iter()
        .map(|name| ModelCard {
            id: name,
            object: "model",
            created,
            owned_by: "vllm",
            root: &state.model,
            parent: None,
            max_model_len: state.max_model_len,
            permission: Vec::new(),
        })
        .collect();
    Json(ModelList {
        object: "list",
        data: cards,
    })
    .into_response()
}
