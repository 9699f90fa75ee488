//! The endpoints the gateway answers itself, for orchestrators and scrapers: `/livez`, `/readyz`
//! (also served as `/health`) and `/metrics`. They read the status watch and the drain token; they
//! never probe the upstream themselves.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::proxy::state::AppState;
use crate::telemetry;

/// 200 while the process serves (and, under `serve`, while the supervisor loop runs: it publishes
/// `Exited` when it stops). The body also names the gateway's version, so that an operator sees
/// which binary runs.
pub async fn livez(State(state): State<Arc<AppState>>) -> Response {
    let status = state.status.borrow().clone();
    let ready = status.is_ready(state.probe_freshness) && !state.draining.is_cancelled();
    let mut report = status.report(ready, state.draining.is_cancelled());
    // Alive until the child is gone for good (`Exited`); a vLLM the gateway does not own never is.
    let alive = status.may_become_ready();
    report.status = if alive { "alive" } else { "dead" };
    let code = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::to_value(report).unwrap_or_default();
    if let Some(fields) = body.as_object_mut() {
        fields.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    }
    (code, Json(body)).into_response()
}

/// 200 when the upstream is ready to serve and the gateway is not draining, else 503.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let draining = state.draining.is_cancelled();
    let status = state.status.borrow().clone();
    let ready = !draining && status.is_ready(state.probe_freshness);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status.report(ready, draining))).into_response()
}

/// Prometheus text exposition, optionally followed by the upstream's own metrics.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are disabled\n").into_response();
    };
    telemetry::publish_gauges();
    let mut body = handle.render();
    if state.live.load().config.metrics_merge_upstream {
        let url = format!("{}/metrics", state.upstream_base);
        match state
            .client
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => {
                if let Ok(text) = response.text().await {
                    if !body.ends_with('\n') {
                        body.push('\n');
                    }
                    body.push_str(&text);
                }
            }
            Ok(response) => {
                tracing::debug!(status = %response.status(), "upstream /metrics failed")
            }
            Err(error) => tracing::debug!(error = %error, "upstream /metrics failed"),
        }
    }
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
