//! `/metrics`: a few of vLLM's Prometheus metrics, counting this process's `/v1` requests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

/// Prometheus text exposition with vLLM's metric names and labels.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = &state.stats;
    let requests = stats.requests.load(Ordering::SeqCst);
    let completed = stats.completed.load(Ordering::SeqCst);
    let disconnects = stats.disconnects.load(Ordering::SeqCst);
    let running = requests.saturating_sub(completed + disconnects);
    let labels = format!("engine=\"0\",model_name=\"{}\"", state.served_model());
    let body = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{{labels}}} {running}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{{labels}}} 0.0\n\
         # HELP vllm:request_success_total Count of successfully processed requests.\n\
         # TYPE vllm:request_success_total counter\n\
         vllm:request_success_total{{{labels},finished_reason=\"stop\"}} {completed}.0\n"
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
