//! `AppState`, shared by every handler: the served model names, the keys, the knobs, the
//! tokenizer's vocabulary, the counters `/_mock/stats` reports, and the per-request outcome that
//! keeps them consistent.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::request::Parts;
use axum::http::{Method, header};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, VERSION};
use crate::knobs::Knobs;
use crate::responses::Recording;
use crate::stream::Pacing;
use crate::tokens::Vocabulary;

/// State shared by every request handler.
pub(crate) struct AppState {
    /// Every name the model is served under, in the command line's order.
    pub(crate) served_model_names: Vec<String>,
    /// The model as given on the command line, which each model card reports as its `root`.
    pub(crate) model: String,
    /// The context length `/v1/models` and `/tokenize` report.
    pub(crate) max_model_len: u64,
    /// What completions report as their `system_fingerprint`: vLLM's version and a hash of its
    /// configuration, which stays the same for as long as the server runs.
    pub(crate) system_fingerprint: String,
    /// The ids `/tokenize` handed out, which `/detokenize` turns back into words.
    pub(crate) vocabulary: Mutex<Vocabulary>,
    /// The keys a `/v1` request may carry, any of them; empty when none is needed.
    pub(crate) api_keys: Vec<String>,
    pub(crate) knobs: Knobs,
    /// The recorded Responses API traffic, parsed once.
    pub(crate) recording: Arc<Recording>,
    /// Turns true when the server begins to shut down.
    pub(crate) stopping: watch::Receiver<bool>,
    pub(crate) stats: Stats,
    /// The latest `/v1` request, as `/_mock/last-request` reports it.
    pub(crate) last_request: Mutex<Option<RequestRecord>>,
    /// xorshift state for response ids; random enough to tell responses apart.
    pub(crate) id_state: AtomicU64,
    /// Cancelled to close the listener without ending the process (`/_mock/exit?linger=`).
    pub(crate) stop_listening: CancellationToken,
    /// The engine core's pid, when the engine runs in processes of its own.
    pub(crate) engine_pid: Option<u32>,
    /// Cancelled to kill an engine that has no process of its own (`MOCK_VLLM_ENGINE_PROCESSES=0`).
    pub(crate) kill_simulated_engine: CancellationToken,
    /// Cancelled when the engine dies, which ends the streams in flight.
    pub(crate) engine_died: CancellationToken,
    /// Cancelled when a generation request met the dead engine, which makes vLLM exit without
    /// waiting out the death linger.
    pub(crate) end_death_linger: CancellationToken,
}

/// Counters and flags `/_mock/stats` reports.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) signals: Mutex<Vec<&'static str>>,
    /// When set, `/health` never answers, like a vLLM whose engine is wedged.
    pub(crate) health_hung: AtomicBool,
    /// Set once the engine died; `/health` answers 503 until the server exits.
    pub(crate) engine_dead: AtomicBool,
    /// Connections closed because they were idle for the keep-alive timeout.
    pub(crate) keep_alive_closes: AtomicU64,
}

/// Settles one `/v1` request as completed or disconnected, whichever comes first; dropping it
/// unsettled means the client left before the response was fully produced.
pub(crate) struct Outcome {
    pub(crate) state: Arc<AppState>,
    pub(crate) settled: bool,
}

/// A response body that settles its request's [`Outcome`] when the body ends or is dropped.
pub(crate) struct TrackedBody {
    pub(crate) inner: Body,
    pub(crate) outcome: Outcome,
}

/// What `/_mock/last-request` answers.
#[derive(Clone, Serialize)]
pub(crate) struct RequestRecord {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    /// Lowercase names; the values of a repeated header are joined with ", ".
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body_len: usize,
}

impl AppState {
    pub(crate) fn new(
        cli: &Cli,
        knobs: Knobs,
        engine_pid: Option<u32>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        let seed = u64::from(std::process::id()) ^ u64::from(unix_nanos());
        AppState {
            served_model_names: cli.served_model_names.clone(),
            model: cli.model.clone(),
            max_model_len: cli.max_model_len,
            system_fingerprint: system_fingerprint(cli),
            vocabulary: Mutex::new(Vocabulary::default()),
            api_keys: cli.api_keys.clone(),
            knobs,
            recording: Arc::new(
                Recording::parse().expect("the embedded recordings parse, as a unit test checks"),
            ),
            stopping,
            stats: Stats::default(),
            last_request: Mutex::new(None),
            // xorshift never leaves zero, so the seed must not be zero.
            id_state: AtomicU64::new(seed | 1),
            stop_listening: CancellationToken::new(),
            engine_pid,
            kill_simulated_engine: CancellationToken::new(),
            engine_died: CancellationToken::new(),
            end_death_linger: CancellationToken::new(),
        }
    }

    /// The name answers report as their model, whichever name the request used: the first
    /// served name, as in vLLM.
    pub(crate) fn served_model(&self) -> &str {
        self.served_model_names.first().unwrap_or(&self.model)
    }

    pub(crate) fn pacing(&self) -> Pacing {
        Pacing {
            delay: self.knobs.stream_delay,
            die_after: self.knobs.die_mid_stream,
            stall_after: self.knobs.stall_mid_stream,
            stopping: self.stopping.clone(),
            engine_died: self.engine_died.clone(),
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        let step = |mut x: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let previous = self
            .id_state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap_or_else(|x| x);
        step(previous)
    }

    pub(crate) fn record_last_request(&self, parts: &Parts, body_len: usize) {
        let mut headers = BTreeMap::new();
        for name in parts.headers.keys() {
            let values: Vec<_> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect();
            headers.insert(name.as_str().to_owned(), values.join(", "));
        }
        let record = RequestRecord {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers,
            body_len,
        };
        *self
            .last_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(record);
    }

    /// vLLM's check: OPTIONS passes, otherwise the scheme must be bearer (in any case) and the
    /// token must be one of the keys.
    pub(crate) fn is_authorized(&self, parts: &Parts) -> bool {
        if self.api_keys.is_empty() || parts.method == Method::OPTIONS {
            return true;
        }
        let Some(authorization) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
        else {
            return false;
        };
        let (scheme, token) = authorization.split_once(' ').unwrap_or((authorization, ""));
        scheme.eq_ignore_ascii_case("bearer") && self.api_keys.iter().any(|key| key == token)
    }
}

impl Outcome {
    pub(crate) fn complete(&mut self) {
        if !self.settled {
            self.settled = true;
            self.state.stats.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.settled {
            self.state.stats.disconnects.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => false,
        };
        if ended {
            this.outcome.complete();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // A body that was empty from the start may be dropped without ever being polled.
        if self.inner.is_end_stream() {
            self.outcome.complete();
        }
    }
}

/// `vllm-<version>-<hash>`, as vLLM writes its fingerprint, with a hash of the options that make
/// this server's configuration (FNV-1a, where vLLM hashes its whole configuration).
fn system_fingerprint(cli: &Cli) -> String {
    let configuration = format!(
        "{}\0{}\0{}",
        cli.model,
        cli.served_model_names.join("\0"),
        cli.max_model_len
    );
    let hash = configuration.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    format!("vllm-{VERSION}-{hash:08x}")
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

pub(crate) fn unix_nanos() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos())
}
