//! The upstream's `/health` probe, and the poller that keeps the standalone [`UpstreamStatus`]
//! current. Under `serve` the supervisor runs the same probe on its own schedule.
//!
//! Probes use their own client that never reuses a connection: a pooled connection that the
//! upstream closed while idle would otherwise fail the next probe and make readiness flap.

use std::time::Duration;

use http::StatusCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HealthConfig;
use crate::resources::Exhausted;
use crate::status::{ExternalHealth, Probe, UpstreamStatus, VllmReads};

/// A client for probes: no pooling, so every probe opens a fresh connection.
pub fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .no_proxy()
        .http1_only()
        .build()
        .expect("a client without TLS or proxies always builds")
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// The upstream answered something other than 200, or could not be reached: this counts
    /// against it.
    Upstream(String),
    /// The upstream did not answer within the timeout: this counts against it, unless it is
    /// answering requests meanwhile (then it is slow, not down).
    Slow(String),
    /// The gateway could not even send the probe, for lack of a resource of its own (descriptors,
    /// memory): this says nothing about the upstream.
    Local(Exhausted),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Upstream(reason) | ProbeError::Slow(reason) => f.write_str(reason),
            ProbeError::Local(exhausted) => {
                write!(
                    f,
                    "the gateway could not send the /health probe: {exhausted}"
                )
            }
        }
    }
}

/// One GET of `{base}/health`; Ok when it answers 200 within `timeout`.
pub async fn probe(
    client: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let url = format!("{base}/health");
    match client.get(&url).timeout(timeout).send().await {
        Ok(response) if response.status() == StatusCode::OK => Ok(()),
        Ok(response) => Err(ProbeError::Upstream(format!(
            "upstream /health answered {}",
            response.status()
        ))),
        Err(error) => Err(match Exhausted::in_chain(&error) {
            Some(exhausted) => ProbeError::Local(exhausted),
            None if error.is_timeout() => ProbeError::Slow(format!(
                "upstream /health did not answer within {}",
                humantime::format_duration(timeout)
            )),
            None if error.is_connect() => {
                ProbeError::Upstream("upstream /health: connection refused".into())
            }
            None => ProbeError::Upstream("upstream /health: connection failed".into()),
        }),
    }
}

/// Standalone mode: probes the upstream every interval and publishes the outcome. A probe that
/// timed out while the proxy's reads from the upstream (`reads`) have moved on since the last one
/// counts as passed: the upstream answers requests, its `/health` is only slow.
pub async fn poll_upstream(
    base: String,
    health: HealthConfig,
    status: watch::Sender<UpstreamStatus>,
    cancel: CancellationToken,
    reads: VllmReads,
) {
    let client = probe_client();
    let mut interval = tokio::time::interval(health.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = None;
    let mut reads_at_probe = reads.total();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = cancel.cancelled() => return,
        }
        let outcome = probe(&client, &base, health.timeout).await;
        let answering = reads.moved_since(&mut reads_at_probe);
        let excused = match &outcome {
            Err(reason @ ProbeError::Slow(_)) if answering => {
                tracing::warn!(upstream = %base, %reason, "upstream /health is slow, but the upstream is answering requests: still ready");
                true
            }
            _ => false,
        };
        let ok = outcome.is_ok() || excused;
        if was_ok != Some(ok) {
            match &outcome {
                Err(reason) if !ok => {
                    tracing::warn!(upstream = %base, %reason, "upstream is not healthy");
                }
                _ => tracing::info!(upstream = %base, "upstream is healthy"),
            }
            was_ok = Some(ok);
        }
        let probe = Probe {
            ok,
            at: Instant::now(),
            detail: outcome
                .err()
                .filter(|_| !ok)
                .map(|error| error.to_string())
                .unwrap_or_default(),
        };
        status.send_replace(UpstreamStatus::External(ExternalHealth {
            last_probe: Some(probe),
        }));
    }
}
