//! Logs and metrics: the tracing subscriber (text, JSON or journald), the Prometheus recorder,
//! and [`RequestRecord`], which follows one proxied request to its end and then has its access
//! log line and its metrics written exactly once, however the request ended (completed, failed, or
//! dropped because the client went away): by its worker once the worker has written out what it
//! had to write and is about to wait for more work (`Deferred`), not before the response's last
//! bytes leave.
//!
//! On stderr the access log leaves the request path: its lines are formatted on the worker and
//! appended to the worker's part of a bounded queue, which a writer thread writes out in one piece
//! every 20 ms while lines come, so a slow reader of stderr never stalls a request and a request
//! costs no write and, while lines come, no thread wake-up (in the JSON format the record writes
//! its line itself, without the tracing formatter's per-event work, when the filter wants it).
//! After 20 ms without a line the writer sleeps until the next one, whose request wakes it: an idle
//! gateway does not wake up for its access log. When the queue is full a line is dropped and
//! counted (`gateway_log_lines_dropped_total`); [`flush_logs`] writes out what is queued before the
//! process exits. Every other line is written at once: nothing the supervisor or vLLM says is ever
//! dropped.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use foldhash::HashMap;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// The tracing target of vLLM's lines (`supervisor::output`); under journald they get their own
/// `SYSLOG_IDENTIFIER`.
pub const VLLM_TARGET: &str = "vllm";

/// Sets up the global tracing subscriber. `RUST_LOG`, when set, wins over `log_level`.
///
/// `auto` picks journald when stderr is the journal; if journald's socket cannot be opened then,
/// it falls back to JSON on stderr (which still reaches the journal) and says so, rather than
/// refusing to start. An explicit `journald` that cannot be opened is an error.
pub fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<LogFormat> {
    let (filter, handle) = reload::Layer::new(log_filter(level)?);
    // Set once: `init_logging` runs once per process (a second `try_init` fails anyway).
    let _ = LOG_FILTER.set(handle);
    let mut journald_unavailable = None;
    let journald = match format {
        LogFormat::Journald => Some(journald_layers().map_err(|error| {
            anyhow::anyhow!(
                "log_format = \"journald\", but journald's socket (/run/systemd/journal/socket) cannot be opened: {error}"
            )
        })?),
        LogFormat::Auto if stderr_is_journal() => match journald_layers() {
            Ok(layers) => Some(layers),
            Err(error) => {
                journald_unavailable = Some(error);
                None
            }
        },
        _ => None,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let format = match (journald, format) {
        (Some((gateway, vllm)), _) => {
            registry
                .with(gateway.with_filter(filter_fn(|metadata| metadata.target() != VLLM_TARGET)))
                .with(vllm.with_filter(filter_fn(|metadata| metadata.target() == VLLM_TARGET)))
                .try_init()?;
            LogFormat::Journald
        }
        (None, LogFormat::Text) => {
            registry.with(stderr_layers(false)).try_init()?;
            LogFormat::Text
        }
        (None, LogFormat::Auto) if std::io::stderr().is_terminal() => {
            registry.with(stderr_layers(false)).try_init()?;
            LogFormat::Text
        }
        (None, _) => {
            registry.with(stderr_layers(true)).try_init()?;
            ACCESS_JSON.store(true, Ordering::Relaxed);
            LogFormat::Json
        }
    };
    ask_filter_for_access_lines();
    if let Some(error) = journald_unavailable {
        tracing::warn!(%error, "stderr is the journal but journald's socket cannot be opened; logging JSON to stderr");
    }
    Ok(format)
}

/// The global filter, behind a reload layer so that a reload can change `log_level`.
static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The filter for `log_level`; `RUST_LOG`, when set, wins.
fn log_filter(level: &str) -> anyhow::Result<EnvFilter> {
    Ok(match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::try_new(level)?,
    })
}

/// Applies a reloaded `log_level` to every later event. With `RUST_LOG` set, which wins, the filter
/// stays as it is and this returns false.
pub fn set_log_level(level: &str) -> anyhow::Result<bool> {
    if std::env::var("RUST_LOG").is_ok_and(|directives| !directives.is_empty()) {
        return Ok(false);
    }
    let filter = log_filter(level)?;
    let handle = LOG_FILTER
        .get()
        .ok_or_else(|| anyhow::anyhow!("logging is not set up"))?;
    handle.reload(filter)?;
    ask_filter_for_access_lines();
    Ok(true)
}

/// Whether the filter passes access lines: asked when the filter is set, not for every request,
/// where the asking (through the reload layer and each layer's filter) took about a sixth of the
/// CPU samples the access log added to a profile.
static ACCESS_ENABLED: AtomicBool = AtomicBool::new(false);

fn ask_filter_for_access_lines() {
    let enabled = tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO);
    ACCESS_ENABLED.store(enabled, Ordering::Relaxed);
}

/// The access log's target: its lines go through the non-blocking writer.
pub const ACCESS_TARGET: &str = "gateway::access";

/// Bytes of access log lines the writer holds for each thread before it drops that thread's new
/// ones (about 12,000 JSON lines): seconds of a worker's full request rate, so only a stderr
/// nobody reads for that long loses lines.
const ACCESS_LOG_QUEUE_BYTES: usize = 4 << 20;

/// The room a thread's part of the queue, and the writer's batch, keep between writes: 20 ms of
/// lines at 40,000 requests a second. Under steady load no buffer then grows and is given back
/// every 20 ms, which cost a page fault for each of its pages every time (jemalloc hands freed
/// pages back at once).
const ACCESS_LOG_KEEP_BYTES: usize = 256 << 10;

/// How often the writer thread writes out what has been queued while lines come: one write for
/// every line queued meanwhile, and no wake-up per line. An interval with no line puts it to sleep
/// until the next one.
const ACCESS_LOG_WRITE_INTERVAL: Duration = Duration::from_millis(20);

/// A value kept in one part for each thread that uses it, each part behind a lock that only its
/// thread takes, but for a moment when [`PerThread::visit`] goes over the parts: threads on
/// different CPUs never pass a lock's cache line back and forth. The access log's queue and the
/// pending request metrics are kept so.
#[derive(Default)]
struct PerThread<T> {
    parts: Mutex<Vec<Arc<Mutex<T>>>>,
}

/// Where a thread keeps its part of a [`PerThread`], once it has one.
type ThreadPart<T> = std::thread::LocalKey<std::cell::OnceCell<Arc<Mutex<T>>>>;

impl<T: Default> PerThread<T> {
    const fn new() -> PerThread<T> {
        PerThread {
            parts: Mutex::new(Vec::new()),
        }
    }

    /// Runs `work` on this thread's part (kept in `local`). A thread already past its
    /// thread-locals gets a part for this once, visited like the others.
    fn with<R>(&self, local: &'static ThreadPart<T>, work: impl FnOnce(&mut T) -> R) -> R {
        // `work` goes to whichever of the two ways runs (`try_with` runs its closure or fails).
        let mut work = Some(work);
        let mut run = |part: &Mutex<T>| work.take().map(|work| work(&mut part.lock()));
        local
            .try_with(|part| run(part.get_or_init(|| self.new_part())))
            .unwrap_or_else(|_| run(&self.new_part()))
            .expect("`work` runs on one of the two ways")
    }

    fn new_part(&self) -> Arc<Mutex<T>> {
        let part = Arc::default();
        self.parts.lock().push(Arc::clone(&part));
        part
    }

    /// Runs `visit` on every part, and forgets the parts of threads that have ended.
    fn visit(&self, mut visit: impl FnMut(&mut T)) {
        self.parts.lock().retain(|part| {
            visit(&mut part.lock());
            Arc::strong_count(part) > 1
        });
    }
}

/// The access log's queue: one part for each thread that writes lines, which the writer thread
/// empties every 20 ms.
#[derive(Default)]
struct AccessQueue {
    parts: PerThread<Vec<u8>>,
    dropped: AtomicU64,
    closing: AtomicBool,
    /// Set while the writer sleeps until a line comes; the line's writer wakes it.
    idle: AtomicBool,
    /// The writer's thread, set by the writer itself before it can first be idle.
    writer: OnceLock<std::thread::Thread>,
}

thread_local! {
    /// This thread's part of the access log's queue, once it has written a line.
    static ACCESS_PART: std::cell::OnceCell<Arc<Mutex<Vec<u8>>>> = const { std::cell::OnceCell::new() };
}

static ACCESS_QUEUE: OnceLock<Arc<AccessQueue>> = OnceLock::new();
static ACCESS_WRITER: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

/// A line written by the fmt layer (one `write_all` of a whole line per event) is appended to the
/// queue, or dropped and counted when the queue is full.
#[derive(Clone)]
struct AccessLog(Arc<AccessQueue>);

impl AccessQueue {
    fn push(&self, line: &[u8]) {
        self.push_with(|lines| lines.extend_from_slice(line));
    }

    /// Appends what `write` writes to this thread's part, in place, or drops and counts it if
    /// that would overfill the part. The first line after the writer went idle wakes it (one
    /// futex wake, at most once per [`ACCESS_LOG_WRITE_INTERVAL`]).
    fn push_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let queued = self.parts.with(&ACCESS_PART, |lines| {
            let start = lines.len();
            write(lines);
            if lines.len() > ACCESS_LOG_QUEUE_BYTES {
                lines.truncate(start);
                return false;
            }
            true
        });
        if !queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::Relaxed) {
            // The part's lock orders this with the writer's look at the queue after it went
            // idle: either it saw the line, or this sees it idle.
            if let Some(writer) = self.writer.get() {
                writer.unpark();
            }
        }
    }

    /// The writer's wait between two looks at the queue: [`ACCESS_LOG_WRITE_INTERVAL`] after it
    /// wrote something, else until a line comes (or [`flush_logs`] asks it to finish). `batch`
    /// gets what it finds on its way to sleep.
    fn wait(&self, batch: &mut Vec<u8>, wrote: bool) {
        if wrote {
            std::thread::park_timeout(ACCESS_LOG_WRITE_INTERVAL);
            return;
        }
        self.idle.store(true, Ordering::Relaxed);
        // A line queued before the flag was set did not wake this thread: look once more.
        self.take(batch);
        if batch.is_empty() && !self.closing.load(Ordering::Acquire) {
            // Wakes for a line, for flush_logs, or spuriously; the caller looks again either way.
            std::thread::park();
        }
        self.idle.store(false, Ordering::Relaxed);
    }

    /// Moves every queued line into `batch`, and forgets the parts of threads that have ended.
    fn take(&self, batch: &mut Vec<u8>) {
        self.parts.visit(|lines| {
            if batch.is_empty() {
                std::mem::swap(lines, batch);
            } else {
                batch.extend_from_slice(lines);
                lines.clear();
            }
            lines.shrink_to(ACCESS_LOG_KEEP_BYTES);
        });
    }
}

impl Write for AccessLog {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AccessLog {
    type Writer = AccessLog;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Starts the access log's writer thread: it writes the queue to stderr every
/// [`ACCESS_LOG_WRITE_INTERVAL`] while lines come, and sleeps while none do, until
/// [`flush_logs`]; then it writes what is left.
fn access_log() -> AccessLog {
    let queue = Arc::clone(ACCESS_QUEUE.get_or_init(Default::default));
    let writer_queue = Arc::clone(&queue);
    let spawned = std::thread::Builder::new()
        .name("gateway-access-log".into())
        .spawn(move || {
            let _ = writer_queue.writer.set(std::thread::current());
            let mut batch = Vec::new();
            loop {
                let closing = writer_queue.closing.load(Ordering::Acquire);
                writer_queue.take(&mut batch);
                let wrote = !batch.is_empty();
                if wrote {
                    // Nothing to tell if stderr is gone: the lines are lost either way.
                    let _ = std::io::stderr().lock().write_all(&batch);
                    batch.clear();
                    batch.shrink_to(ACCESS_LOG_KEEP_BYTES);
                }
                if closing {
                    return;
                }
                writer_queue.wait(&mut batch, wrote);
            }
        });
    match spawned {
        Ok(handle) => {
            *ACCESS_WRITER.lock() = Some(handle);
        }
        // Without its thread the queue fills and the lines are counted as dropped.
        Err(error) => eprintln!("gateway: cannot start the access log writer: {error}"),
    }
    AccessLog(queue)
}

/// The stderr layers, JSON or text: the access log through a lossy non-blocking writer (its
/// thread holds stderr's lock only for one line at a time), everything else written at once.
fn stderr_layers<S>(json: bool) -> Vec<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let access_writer = access_log();
    let access = filter_fn(|metadata| metadata.target() == ACCESS_TARGET);
    let other = filter_fn(|metadata| metadata.target() != ACCESS_TARGET);
    if json {
        vec![
            json_layer(access_writer).with_filter(access).boxed(),
            json_layer(std::io::stderr).with_filter(other).boxed(),
        ]
    } else {
        let ansi = std::io::stderr().is_terminal();
        vec![
            text_layer(access_writer, ansi).with_filter(access).boxed(),
            text_layer(std::io::stderr, ansi).with_filter(other).boxed(),
        ]
    }
}

fn json_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_writer(writer)
}

fn text_layer<S, W>(writer: W, ansi: bool) -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer)
}

/// Writes out the access log lines still deferred or queued and stops the writer's thread.
/// Called once, right before the process exits; later lines are written nowhere.
pub fn flush_logs() {
    finish_all_deferred();
    let Some(queue) = ACCESS_QUEUE.get() else {
        return;
    };
    queue.closing.store(true, Ordering::Release);
    let writer = ACCESS_WRITER.lock().take();
    if let Some(writer) = writer {
        writer.thread().unpark();
        let _ = writer.join();
    }
}

/// Access log lines dropped because the writer fell behind.
fn log_lines_dropped() -> u64 {
    ACCESS_QUEUE
        .get()
        .map_or(0, |queue| queue.dropped.load(Ordering::Relaxed))
}

/// Two journald layers, one for the gateway's events and one for vLLM's lines, so that
/// `journalctl -u gateway` shows vLLM's output under its own identifier (`vllm[…]: INFO: …`).
fn journald_layers() -> std::io::Result<(tracing_journald::Layer, tracing_journald::Layer)> {
    Ok((journald_layer("gateway")?, journald_layer("vllm")?))
}

/// A journald layer whose fields keep their own names (`REQUEST_ID=`, `PID=`, `EXIT_CODE=`), so
/// `journalctl REQUEST_ID=…` finds a request; no field the gateway logs collides with journald's
/// well-known ones. Levels map to syslog priorities the usual way (info is 6, not 5).
fn journald_layer(identifier: &str) -> std::io::Result<tracing_journald::Layer> {
    let priorities = PriorityMappings {
        info: Priority::Informational,
        debug: Priority::Debug,
        ..PriorityMappings::new()
    };
    Ok(tracing_journald::layer()?
        .with_syslog_identifier(identifier.into())
        .with_field_prefix(None)
        .with_priority_mappings(priorities))
}

/// The check systemd documents: `$JOURNAL_STREAM` is `device:inode` of the journal's stream,
/// and it only counts when stderr is still that stream (not redirected since).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;

    let Ok(expected) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    expected == format!("{}:{}", stat.st_dev, stat.st_ino)
}

/// Buckets for LLM calls: 5 ms up to 10 minutes.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Installs the global Prometheus recorder and returns the handle `/metrics` renders.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .install_recorder()?;
    gauge!("gateway_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Keeps the recorder's histograms from growing between scrapes.
pub async fn run_metrics_upkeep(handle: PrometheusHandle) {
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        interval.tick().await;
        handle.run_upkeep();
    }
}

/// Collapses a request path to one of a bounded set of route labels.
pub fn route_label(path: &str) -> &'static str {
    const ROUTES: [&str; 16] = [
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/rerank",
        "/v1/score",
        "/v1/pooling",
        "/v1/classify",
        "/tokenize",
        "/detokenize",
        "/version",
        "/pooling",
        "/classify",
    ];
    if let Some(route) = ROUTES.iter().find(|route| **route == path) {
        return route;
    }
    if path.starts_with("/v1/responses/") {
        "/v1/responses/{id}"
    } else if path.starts_with("/v1/models/") {
        "/v1/models/{id}"
    } else if path.starts_with("/v1/") {
        "/v1/other"
    } else {
        "other"
    }
}

fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Proxied requests in flight, and the event streams among them: counted apart from the metrics
/// registry, so a request touches no registry for them. `/metrics` and the drain status read them.
static REQUESTS_IN_FLIGHT: SplitCount = SplitCount::new();
static STREAMS_ACTIVE: SplitCount = SplitCount::new();

pub fn requests_in_flight() -> i64 {
    REQUESTS_IN_FLIGHT.get()
}

/// A count that many threads move and few read: each thread moves a part of its own, on a cache
/// line of its own, and a read sums the parts. (One atomic for every worker moved its cache line
/// between their CPUs twice a request.)
struct SplitCount {
    parts: [Part; PARTS],
}

/// More parts than proxy workers, so that each worker has one to itself.
const PARTS: usize = 16;

#[repr(align(128))]
struct Part(AtomicI64);

impl SplitCount {
    const fn new() -> SplitCount {
        SplitCount {
            parts: [const { Part(AtomicI64::new(0)) }; PARTS],
        }
    }

    fn add(&self, delta: i64) {
        self.parts[thread_part()]
            .0
            .fetch_add(delta, Ordering::Relaxed);
    }

    fn get(&self) -> i64 {
        self.parts
            .iter()
            .map(|part| part.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// This thread's part of every [`SplitCount`] (threads take them in turn).
fn thread_part() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static PART: usize = NEXT.fetch_add(1, Ordering::Relaxed) % PARTS;
    }
    PART.with(|part| *part)
}

/// Copies the live counts into their gauges, and hands every worker's pending request metrics
/// (deferred ones too) to the registry; called right before `/metrics` renders.
pub fn publish_gauges() {
    finish_all_deferred();
    hand_over_pending();
    gauge!("gateway_requests_in_flight").set(requests_in_flight() as f64);
    gauge!("gateway_streams_active").set(STREAMS_ACTIVE.get() as f64);
    counter!("gateway_log_lines_dropped_total").absolute(log_lines_dropped());
}

/// One proxied request, from arrival to the last byte. Dropping it writes the access log line and
/// the request metrics; it lives in the response body, so for a stream that happens at stream end.
pub struct RequestRecord {
    facts: RequestFacts,
    started: Instant,
    complete: bool,
    /// Set once the response headers went out; decides between "failed" and "client went away".
    responding: bool,
}

/// What the access line and the request metrics tell of a request, gathered while it runs.
struct RequestFacts {
    request_id: http::HeaderValue,
    method: &'static str,
    route: &'static str,
    access_log: bool,
    status: u16,
    stream: bool,
    first_byte: Option<Duration>,
    bytes_out: u64,
    error_kind: Option<&'static str>,
}

impl RequestFacts {
    /// No request's facts: where a record's begin, and what a record keeps once it has handed
    /// its own on.
    const EMPTY: RequestFacts = RequestFacts {
        request_id: http::HeaderValue::from_static(""),
        method: "",
        route: "",
        access_log: false,
        status: 0,
        stream: false,
        first_byte: None,
        bytes_out: 0,
        error_kind: None,
    };

    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

impl RequestRecord {
    pub fn new(
        request_id: http::HeaderValue,
        method: &http::Method,
        path: &str,
        access_log: bool,
    ) -> Self {
        REQUESTS_IN_FLIGHT.add(1);
        RequestRecord {
            facts: RequestFacts {
                request_id,
                method: method_label(method),
                route: route_label(path),
                access_log,
                ..RequestFacts::EMPTY
            },
            started: Instant::now(),
            complete: false,
            responding: false,
        }
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn request_id(&self) -> &str {
        self.facts.request_id()
    }

    /// The response headers are about to be sent.
    pub fn set_response(&mut self, status: u16, stream: bool) {
        self.facts.status = status;
        self.facts.stream = stream;
        self.responding = true;
        if stream {
            STREAMS_ACTIVE.add(1);
        }
    }

    /// The request failed before any response headers were sent, answered with `status`.
    /// `error_kind` is the `kind` label of `gateway_upstream_errors_total`, if the upstream failed.
    pub fn set_failed(&mut self, status: u16, error_kind: Option<&'static str>) {
        self.facts.status = status;
        self.set_error(error_kind);
        self.complete = true;
    }

    pub fn set_error(&mut self, error_kind: Option<&'static str>) {
        self.facts.error_kind = error_kind;
    }

    pub fn add_bytes(&mut self, len: usize) {
        if self.facts.first_byte.is_none() && len > 0 {
            let elapsed = self.started.elapsed();
            self.facts.first_byte = Some(elapsed);
            if self.facts.stream {
                defer(Deferred::FirstByte {
                    route: self.facts.route,
                    elapsed,
                });
            }
        }
        self.facts.bytes_out += len as u64;
    }

    pub fn set_complete(&mut self) {
        self.complete = true;
    }
}

/// `duration` in milliseconds, to the nanosecond: `1.5`, `0.000183`, `2.0`. It is the decimal
/// the log formatter's float (seconds times 1,000) stands for, written from the integer
/// nanoseconds, which is cheaper than finding the float's shortest text (by 160 instructions a
/// request, of 34,000).
fn write_milliseconds(line: &mut Vec<u8>, duration: Duration) {
    // Apart, seconds and nanoseconds need no 128-bit division.
    let nanos = duration.subsec_nanos();
    let mut whole = duration
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(nanos / 1_000_000));
    // Written from the right, into one buffer: up to 20 digits, the point, 6 digits.
    let mut text = [b'0'; 27];
    write_digits(&mut text[21..], nanos % 1_000_000);
    text[20] = b'.';
    let mut start = 20;
    loop {
        start -= 1;
        text[start] = b'0' + (whole % 10) as u8;
        whole /= 10;
        if whole == 0 {
            break;
        }
    }
    // Trailing zeros go, but for the one after the point.
    let mut end = text.len();
    while end > 22 && text[end - 1] == b'0' {
        end -= 1;
    }
    line.extend_from_slice(&text[start..end]);
}

/// The last `digits.len()` decimal digits of `value`, zero-padded, into `digits`.
fn write_digits(digits: &mut [u8], mut value: u32) {
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Whether access lines are JSON on stderr (through the queue), which [`RequestRecord`] then
/// writes itself.
static ACCESS_JSON: AtomicBool = AtomicBool::new(false);

/// A thread's request metrics not yet handed to the registry, with the registry's handles for
/// them, found once rather than by building and hashing their labels for every request. The labels
/// are static strings of bounded sets, so their addresses identify them.
///
/// A handle's counter or histogram is one for every thread, and updating it from two workers moved
/// its cache line between their CPUs with every request (about 4% of the CPU a request took). So
/// each thread counts on its own and hands over what it holds every [`PENDING_MAX`] values, and
/// whenever `/metrics` is about to render: a scrape sees every request that has ended.
#[derive(Default)]
///
/// The maps hash with foldhash: their keys are a few machine words, which the standard library's
/// SipHash took as long to hash as the rest of the recording.
struct PendingMetrics {
    requests: HashMap<(usize, usize, u16), (metrics::Counter, u64)>,
    durations: HashMap<(usize, bool), (metrics::Histogram, Vec<f64>)>,
    first_bytes: HashMap<usize, (metrics::Histogram, Vec<f64>)>,
    /// Values held in `durations` and `first_bytes`.
    held: usize,
}

/// The most values a thread holds before it hands them over.
const PENDING_MAX: usize = 256;

impl PendingMetrics {
    fn request(
        &mut self,
        route: &'static str,
        method: &'static str,
        status: u16,
        stream: bool,
        duration: Duration,
    ) {
        self.requests
            .entry((route.as_ptr() as usize, method.as_ptr() as usize, status))
            .or_insert_with(|| {
                let counter = counter!("gateway_requests_total", "route" => route, "method" => method, "status" => status.to_string());
                (counter, 0)
            })
            .1 += 1;
        self.durations
            .entry((route.as_ptr() as usize, stream))
            .or_insert_with(|| {
                let stream_label = if stream { "true" } else { "false" };
                let histogram = histogram!("gateway_request_duration_seconds", "route" => route, "stream" => stream_label);
                (histogram, Vec::new())
            })
            .1
            .push(duration.as_secs_f64());
        self.held_one();
    }

    fn first_byte(&mut self, route: &'static str, elapsed: Duration) {
        self.first_bytes
            .entry(route.as_ptr() as usize)
            .or_insert_with(|| {
                let histogram = histogram!("gateway_time_to_first_byte_seconds", "route" => route);
                (histogram, Vec::new())
            })
            .1
            .push(elapsed.as_secs_f64());
        self.held_one();
    }

    fn held_one(&mut self) {
        self.held += 1;
        if self.held >= PENDING_MAX {
            self.hand_over();
        }
    }

    /// Gives the registry what this thread holds.
    fn hand_over(&mut self) {
        for (counter, count) in self.requests.values_mut() {
            if *count > 0 {
                counter.increment(std::mem::take(count));
            }
        }
        for (histogram, values) in self
            .durations
            .values_mut()
            .chain(self.first_bytes.values_mut())
        {
            for value in values.drain(..) {
                histogram.record(value);
            }
        }
        self.held = 0;
    }
}

/// Every thread's pending metrics, for `/metrics` to collect before it renders.
static PENDING: PerThread<PendingMetrics> = PerThread::new();

thread_local! {
    /// This thread's part of [`PENDING`], once it has recorded a request.
    static PENDING_PART: std::cell::OnceCell<Arc<Mutex<PendingMetrics>>> = const { std::cell::OnceCell::new() };
}

/// Hands every thread's pending request metrics to the registry.
fn hand_over_pending() {
    PENDING.visit(PendingMetrics::hand_over);
}

/// `gateway_requests_total` and `gateway_request_duration_seconds` for one request.
fn request_metrics(
    route: &'static str,
    method: &'static str,
    status: u16,
    stream: bool,
    duration: Duration,
) {
    PENDING.with(&PENDING_PART, |pending| {
        pending.request(route, method, status, stream, duration);
    });
}

/// `2026-11-30T08:20:31.665608Z`, as tracing-subscriber writes its timestamps (UTC, microseconds).
fn write_timestamp(line: &mut Vec<u8>, now: std::time::SystemTime) {
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    ACCESS_SECOND.with_borrow_mut(|(second, text)| {
        if *second != Some(seconds) {
            text.clear();
            write_second(text, seconds);
            *second = Some(seconds);
        }
        line.extend_from_slice(text);
    });
    let mut digits = [b'0'; 6];
    write_digits(&mut digits, since_epoch.subsec_micros());
    line.push(b'.');
    line.extend_from_slice(&digits);
    line.push(b'Z');
}

thread_local! {
    /// The second of this thread's last access line, as `write_second` wrote it.
    static ACCESS_SECOND: std::cell::RefCell<(Option<u64>, Vec<u8>)> =
        const { std::cell::RefCell::new((None, Vec::new())) };
}

/// `seconds` since the epoch as RFC 3339 UTC, to the second.
fn write_second(line: &mut Vec<u8>, seconds: u64) {
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let of_day = seconds % 86_400;
    // Howard Hinnant's days_from_civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let _ = write!(
        line,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3_600,
        of_day / 60 % 60,
        of_day % 60,
    );
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.complete && self.facts.error_kind.is_none() {
            // Dropped before the end and without an upstream error: the client went away.
            self.facts.error_kind = Some("client_disconnect");
        }
        if self.facts.status == 0 {
            self.facts.status = 499;
        }
        REQUESTS_IN_FLIGHT.add(-1);
        if self.facts.stream && self.responding {
            STREAMS_ACTIVE.add(-1);
        }
        let ended = Instant::now();
        defer(Deferred::Finished(Finished {
            facts: std::mem::replace(&mut self.facts, RequestFacts::EMPTY),
            ended: ended.into_std(),
            duration: ended - self.started,
        }));
    }
}

/// A request's bookkeeping, done once its worker has nothing else to do: its access line and
/// metrics when it ended, the stream's first-byte time when its first bytes went out.
///
/// A response's end (or a stream's first event) is read, and the response body dropped, before
/// the server writes out what it was given: a record written at its drop would hold the
/// response's last bytes (all of a short response) back by the time the access line and the
/// metrics take, and when other work ran since the last request, that is their code to load
/// again. Deferred, they are written when the worker is about to wait for more work
/// ([`finish_deferred`], the worker runtime's park hook), after its writes; at the latest once
/// [`DEFERRED_MAX`] are waiting, and by whoever renders `/metrics` or flushes the logs.
enum Deferred {
    Finished(Finished),
    FirstByte {
        route: &'static str,
        elapsed: Duration,
    },
}

/// What a [`RequestRecord`] leaves when it ends.
struct Finished {
    facts: RequestFacts,
    /// When the request ended: the access line's timestamp, however much later it is written.
    ended: std::time::Instant,
    duration: Duration,
}

impl Deferred {
    fn finish(self) {
        match self {
            Deferred::Finished(finished) => finished.write(),
            Deferred::FirstByte { route, elapsed } => {
                PENDING.with(&PENDING_PART, |pending| pending.first_byte(route, elapsed));
            }
        }
    }
}

/// The most deferred items a thread holds before it writes them (a worker busy for that long
/// without waiting for work).
const DEFERRED_MAX: usize = 64;

/// Every thread's deferred bookkeeping.
static DEFERRED: PerThread<Vec<Deferred>> = PerThread::new();

thread_local! {
    /// This thread's part of [`DEFERRED`], once it has deferred something.
    static DEFERRED_PART: std::cell::OnceCell<Arc<Mutex<Vec<Deferred>>>> = const { std::cell::OnceCell::new() };
    /// Whether this thread deferred something since it last wrote what it deferred: a worker
    /// waits for work several times a request, mostly with nothing deferred.
    static DEFERRED_SINCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn defer(item: Deferred) {
    let full = DEFERRED.with(&DEFERRED_PART, |items| {
        items.push(item);
        items.len() >= DEFERRED_MAX
    });
    let _ = DEFERRED_SINCE.try_with(|since| since.set(true));
    if full {
        finish_deferred();
    }
}

/// Writes what this thread's requests left to write (`Deferred`). A worker's runtime calls it
/// before it waits for more work.
pub fn finish_deferred() {
    if DEFERRED_SINCE.try_with(|since| since.replace(false)) == Ok(false) {
        return;
    }
    DEFERRED.with(&DEFERRED_PART, |items| {
        items.drain(..).for_each(Deferred::finish);
    });
}

/// Writes what every thread's requests left to write.
fn finish_all_deferred() {
    DEFERRED.visit(|items| items.drain(..).for_each(Deferred::finish));
}

impl Finished {
    /// The access log line and the request metrics.
    fn write(self) {
        request_metrics(
            self.facts.route,
            self.facts.method,
            self.facts.status,
            self.facts.stream,
            self.duration,
        );
        if let Some(kind) = self.facts.error_kind {
            counter!("gateway_upstream_errors_total", "kind" => kind).increment(1);
        }
        if self.facts.access_log
            && ACCESS_JSON.load(Ordering::Relaxed)
            && ACCESS_ENABLED.load(Ordering::Relaxed)
        {
            if let Some(queue) = ACCESS_QUEUE.get() {
                queue.push_with(|lines| self.write_json(lines));
            }
        } else if self.facts.access_log {
            tracing::info!(
                target: ACCESS_TARGET,
                request_id = %self.facts.request_id(),
                method = self.facts.method,
                route = self.facts.route,
                status = self.facts.status,
                duration_ms = self.duration.as_secs_f64() * 1000.0,
                ttfb_ms = self.facts.first_byte.map(|d| d.as_secs_f64() * 1000.0),
                bytes_out = self.facts.bytes_out,
                stream = self.facts.stream,
                error = self.facts.error_kind,
                "request finished"
            );
        }
    }

    /// When the request ended, on the wall clock.
    fn ended_at(&self) -> std::time::SystemTime {
        let now = std::time::SystemTime::now();
        now.checked_sub(self.ended.elapsed()).unwrap_or(now)
    }

    /// The access line as the JSON log format writes it (the same fields, in the same order), made
    /// without the formatter's per-event work: it is a tenth of the cost of a request.
    fn write_json(&self, line: &mut Vec<u8>) {
        fn string(line: &mut Vec<u8>, value: &str) {
            // Ids, methods and routes have nothing JSON escapes (what serde_json escapes: quote,
            // backslash, control characters), and are written as they are. (Every byte is looked
            // at, without stopping at the first to escape, so that the loop vectorises.)
            let escapes = value.bytes().fold(false, |escapes, byte| {
                escapes | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
            });
            if !escapes {
                line.push(b'"');
                line.extend_from_slice(value.as_bytes());
                line.push(b'"');
            } else {
                // Writing into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *line, value);
            }
        }
        fn number(line: &mut Vec<u8>, value: impl serde::Serialize) {
            let _ = serde_json::to_writer(&mut *line, &value);
        }
        line.extend_from_slice(b"{\"timestamp\":\"");
        write_timestamp(line, self.ended_at());
        line.extend_from_slice(
            b"\",\"level\":\"INFO\",\"message\":\"request finished\",\"request_id\":",
        );
        string(line, self.facts.request_id());
        line.extend_from_slice(b",\"method\":");
        string(line, self.facts.method);
        line.extend_from_slice(b",\"route\":");
        string(line, self.facts.route);
        line.extend_from_slice(b",\"status\":");
        number(line, self.facts.status);
        line.extend_from_slice(b",\"duration_ms\":");
        write_milliseconds(line, self.duration);
        if let Some(first_byte) = self.facts.first_byte {
            line.extend_from_slice(b",\"ttfb_ms\":");
            write_milliseconds(line, first_byte);
        }
        line.extend_from_slice(b",\"bytes_out\":");
        number(line, self.facts.bytes_out);
        line.extend_from_slice(b",\"stream\":");
        number(line, self.facts.stream);
        if let Some(error) = self.facts.error_kind {
            line.extend_from_slice(b",\"error\":");
            string(line, error);
        }
        line.extend_from_slice(b",\"target\":\"gateway::access\"}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metrics_reach_the_registry_in_batches_and_whenever_metrics_render() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let value = move |name: &str| -> u64 {
            let text = handle.render();
            let line = text
                .lines()
                .find(|line| line.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
            line.rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a count")
        };
        let requests = "gateway_requests_total{";
        let durations = "gateway_request_duration_seconds_count{";
        std::thread::spawn(move || {
            metrics::with_local_recorder(&recorder, || {
                for _ in 0..PENDING_MAX + 10 {
                    request_metrics(
                        "/v1/responses",
                        "POST",
                        200,
                        false,
                        Duration::from_millis(3),
                    );
                }
            });
            assert_eq!(
                value(requests),
                PENDING_MAX as u64,
                "handed over at the batch's end"
            );
            assert_eq!(value(durations), PENDING_MAX as u64);
            hand_over_pending();
            assert_eq!(
                value(requests),
                PENDING_MAX as u64 + 10,
                "and the rest before a render"
            );
            assert_eq!(value(durations), PENDING_MAX as u64 + 10);
        })
        .join()
        .expect("the recording thread");
    }

    #[test]
    fn deferred_requests_are_counted_once_their_thread_writes_them_or_enough_wait() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let requests = move || -> u64 {
            hand_over_pending();
            handle
                .render()
                .lines()
                .find(|line| line.starts_with("gateway_requests_total{"))
                .and_then(|line| line.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0)
        };
        let finished = || {
            Deferred::Finished(Finished {
                facts: RequestFacts {
                    request_id: http::HeaderValue::from_static("id"),
                    method: "POST",
                    route: "/v1/responses",
                    access_log: false,
                    status: 200,
                    stream: false,
                    first_byte: None,
                    bytes_out: 10,
                    error_kind: None,
                },
                ended: std::time::Instant::now(),
                duration: Duration::from_millis(3),
            })
        };
        std::thread::spawn(move || {
            metrics::with_local_recorder(&recorder, || {
                defer(finished());
                assert_eq!(requests(), 0, "still deferred");
                finish_deferred();
                assert_eq!(requests(), 1, "written by its thread");
                finish_deferred();
                assert_eq!(requests(), 1, "and only once");
                for _ in 0..DEFERRED_MAX {
                    defer(finished());
                }
                assert_eq!(
                    requests(),
                    1 + DEFERRED_MAX as u64,
                    "written once enough wait"
                );
            });
        })
        .join()
        .expect("the recording thread");
    }

    #[test]
    fn a_split_count_sums_what_every_thread_moved() {
        static COUNT: SplitCount = SplitCount::new();
        let threads: Vec<_> = (0..20)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1_000 {
                        COUNT.add(1);
                    }
                    COUNT.add(-400);
                })
            })
            .collect();
        threads
            .into_iter()
            .for_each(|thread| thread.join().expect("a counting thread"));
        assert_eq!(COUNT.get(), 20 * 600);
    }

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label("/v1/responses"), "/v1/responses");
        assert_eq!(route_label("/v1/responses/resp_123"), "/v1/responses/{id}");
        assert_eq!(route_label("/v1/anything/else"), "/v1/other");
        assert_eq!(route_label("/random/8f3a"), "other");
    }

    #[test]
    fn access_timestamps_are_utc_with_microseconds() {
        let at = |seconds: u64, micros: u64| {
            let mut line = Vec::new();
            let time = std::time::UNIX_EPOCH
                + Duration::from_secs(seconds)
                + Duration::from_micros(micros);
            write_timestamp(&mut line, time);
            String::from_utf8(line).expect("ascii")
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_782_332_947, 123_456), "2026-06-24T20:29:07.123456Z");
        assert_eq!(at(1_709_164_800, 500_000), "2024-02-29T00:00:00.500000Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn access_durations_are_milliseconds_to_the_nanosecond() {
        let written = |duration: Duration| {
            let mut line = Vec::new();
            write_milliseconds(&mut line, duration);
            let text = String::from_utf8(line).expect("ascii");
            let float: f64 = serde_json::from_str(&text).expect("a JSON number");
            assert!((float - duration.as_secs_f64() * 1000.0).abs() < 1e-9);
            text
        };
        assert_eq!(written(Duration::from_micros(1500)), "1.5");
        assert_eq!(written(Duration::from_nanos(183_215)), "0.183215");
        assert_eq!(written(Duration::from_nanos(1)), "0.000001");
        assert_eq!(written(Duration::from_nanos(10_000_001)), "10.000001");
        assert_eq!(written(Duration::ZERO), "0.0");
        assert_eq!(written(Duration::from_secs(86_400)), "86400000.0");
    }

    #[test]
    fn access_lines_have_the_json_formats_fields_in_its_order() {
        let finished = Finished {
            facts: RequestFacts {
                request_id: http::HeaderValue::from_static("id-\"1"),
                method: "POST",
                route: "/v1/responses",
                access_log: true,
                status: 200,
                stream: true,
                first_byte: Some(Duration::from_micros(700)),
                bytes_out: 10,
                error_kind: Some("reset_mid_stream"),
            },
            ended: std::time::Instant::now(),
            duration: Duration::from_micros(1500),
        };
        let mut line = Vec::new();
        finished.write_json(&mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        let text = String::from_utf8(line).expect("utf-8");
        let value: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
        assert_eq!(value["request_id"], "id-\"1");
        assert_eq!(value["duration_ms"], 1.5);
        let keys: Vec<&str> = text
            .split(",\"")
            .skip(1)
            .map(|field| field.split('"').next().unwrap_or_default())
            .collect();
        assert_eq!(
            keys,
            [
                "level",
                "message",
                "request_id",
                "method",
                "route",
                "status",
                "duration_ms",
                "ttfb_ms",
                "bytes_out",
                "stream",
                "error",
                "target"
            ]
        );
    }
}
