//! The test-control endpoints under `/_mock/`, which vLLM does not have.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::sleep;

use crate::log::{exit_now, say};
use crate::openai::openai_error;
use crate::state::{AppState, RequestRecord};
use crate::stream::FLUSH_GRACE;

/// What `/_mock/stats` answers.
#[derive(Serialize)]
pub(crate) struct StatsBody {
    pub(crate) pid: u32,
    pub(crate) requests: u64,
    pub(crate) completed: u64,
    pub(crate) disconnects: u64,
    pub(crate) signals: Vec<&'static str>,
    pub(crate) health_hung: bool,
    /// The `VLLM::EngineCore` process, or `null` when the engine runs in this process.
    pub(crate) engine_pid: Option<u32>,
    pub(crate) engine_dead: bool,
    /// Connections closed because they were idle for the keep-alive timeout.
    pub(crate) keep_alive_closes: u64,
}

pub(crate) async fn last_request(
    State(state): State<Arc<AppState>>,
) -> Json<Option<RequestRecord>> {
    let last = state
        .last_request
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Json(last)
}

pub(crate) async fn stats(State(state): State<Arc<AppState>>) -> Json<StatsBody> {
    let stats = &state.stats;
    let signals = stats
        .signals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Json(StatsBody {
        pid: std::process::id(),
        requests: stats.requests.load(Ordering::SeqCst),
        completed: stats.completed.load(Ordering::SeqCst),
        disconnects: stats.disconnects.load(Ordering::SeqCst),
        signals,
        health_hung: stats.health_hung.load(Ordering::SeqCst),
        engine_pid: state.engine_pid,
        engine_dead: stats.engine_dead.load(Ordering::SeqCst),
        keep_alive_closes: stats.keep_alive_closes.load(Ordering::SeqCst),
    })
}

pub(crate) async fn hang_health(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.stats.health_hung.store(true, Ordering::SeqCst);
    Json(json!({ "health_hung": true }))
}

pub(crate) async fn unhang_health(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.stats.health_hung.store(false, Ordering::SeqCst);
    Json(json!({ "health_hung": false }))
}

pub(crate) async fn exit_on_request(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let param = |wanted: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == wanted)
            .map(|(_, value)| value.to_string())
    };
    let code = match param("code").map(|value| value.parse::<u8>()) {
        None => 0,
        Some(Ok(code)) => code,
        Some(Err(_)) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "code must be an exit code from 0 to 255",
            );
        }
    };
    let linger = match param("linger").map(|value| humantime::parse_duration(&value)) {
        None => None,
        Some(Ok(linger)) => Some(linger),
        Some(Err(_)) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "linger must be a duration such as 500ms",
            );
        }
    };
    if linger.is_some() {
        say(format_args!("INFO:     Shutting down"));
        state.stop_listening.cancel();
    }
    tokio::spawn(async move {
        sleep(linger.unwrap_or(FLUSH_GRACE)).await;
        say(format_args!(
            "INFO:     exiting with code {code} as /_mock/exit asks"
        ));
        exit_now(code);
    });
    Json(json!({ "exiting": true, "code": code })).into_response()
}
