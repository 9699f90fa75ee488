//! The listening socket and the proxy's worker threads: one per CPU, each a single-threaded
//! runtime with its own accept loop on the shared socket (balanced by open connections, see
//! [`conn::Balance`]) and its own upstream pool, and the graceful drain that ends them.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::proxy::conn;
use crate::proxy::router::Surface;
use crate::proxy::state::{AppState, LiveConfig};
use crate::telemetry;

/// How many proxy workers to run: one per CPU the process may use (cgroup quotas and affinity
/// count), at most `MAX_WORKERS`.
pub fn worker_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |cpus| cpus.get())
        .min(MAX_WORKERS)
}

/// More workers than this only add idle upstream connections: one vLLM is the bottleneck long
/// before eight cores of proxying are.
const MAX_WORKERS: usize = 8;

/// The proxy's worker threads, started and serving.
///
/// The work is split across threads, each a single-threaded runtime with its own accept loop on
/// the shared listening socket and its own upstream connection pool, as nginx splits it across
/// worker processes: a request is read, forwarded and answered on one thread, with no wake-ups
/// across threads on the way.
pub struct Workers {
    /// One per worker: its outcome once its server has stopped.
    finished: FuturesUnordered<oneshot::Receiver<std::io::Result<()>>>,
    /// Cancelled to drop every worker's connections at once.
    close: CancellationToken,
    draining: CancellationToken,
    closing: CancellationToken,
    cut: CancellationToken,
    give_up: CancellationToken,
    /// For `drain_timeout`, read when the drain begins.
    live: LiveConfig,
}

impl Workers {
    /// Builds every worker (runtime, listener registration, upstream pool) before starting any,
    /// so that a failure (no file descriptors left, say) fails the start instead of leaving the
    /// gateway short of workers. Each worker is built on its own thread, so that what its requests
    /// touch (its state, its pool, its tokens) is allocated from that thread's memory: built
    /// together on one thread, two workers' counters and locks shared cache lines, which moved
    /// between their CPUs on every request.
    /// Each worker gets a copy of `listener`; the caller's stays open (and the socket with it).
    pub fn start(
        listener: &std::net::TcpListener,
        state: &AppState,
        count: usize,
    ) -> std::io::Result<Workers> {
        let close = CancellationToken::new();
        let count = count.max(1);
        let limit = conn::ConnectionLimit::new(conn::max_connections(
            state.live.load().config.proxy.max_connections,
            count,
        ));
        tracing::info!(
            max_connections = limit.max(),
            "client connections are limited"
        );
        let max_idle = limit.max().div_ceil(count);
        let finished = FuturesUnordered::new();
        // Each thread says whether its worker was built, then waits to be told to run it (true)
        // or to drop it (false, or the sender gone).
        let mut starting = Vec::with_capacity(count);
        let mut failure = None;
        for (index, balance) in conn::Balance::new(count).into_iter().enumerate() {
            let listener = match listener.try_clone() {
                Ok(listener) => listener,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            let (state, close, limit) = (state.clone(), close.clone(), limit.clone());
            let (built_tx, built_rx) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
            let (run_tx, run_rx) = std::sync::mpsc::sync_channel::<bool>(1);
            let (done_tx, done_rx) = oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || {
                    let worker =
                        match Worker::build(listener, &state, &close, &limit, balance, max_idle) {
                            Ok(worker) => worker,
                            Err(error) => {
                                let _ = built_tx.send(Err(error));
                                return;
                            }
                        };
                    let _ = built_tx.send(Ok(()));
                    if run_rx.recv() == Ok(true) {
                        let _ = done_tx.send(worker.run());
                    } else {
                        worker.discard();
                    }
                });
            if let Err(error) = spawned {
                failure = Some(error);
                break;
            }
            match built_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    failure = Some(error);
                    break;
                }
                Err(_) => {
                    failure = Some(std::io::Error::other("a proxy worker thread died at start"));
                    break;
                }
            }
            starting.push(run_tx);
            finished.push(done_rx);
        }
        if let Some(error) = failure {
            // The workers built so far are dropped on their own threads.
            for run in &starting {
                let _ = run.send(false);
            }
            return Err(error);
        }
        for run in &starting {
            let _ = run.send(true);
        }
        Ok(Workers {
            finished,
            close,
            draining: state.draining.clone(),
            closing: state.closing.clone(),
            cut: state.cut.token.clone(),
            give_up: state.give_up.clone(),
            live: Arc::clone(&state.live),
        })
    }

    /// Cancelled when the drain before a stop begins.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Cancelled when the workers stop accepting: at the drain before a stop, or alone before
    /// an in-place upgrade's exec.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Serves until `closing` is cancelled, then stops accepting and lets in-flight requests
    /// finish for up to `drain_timeout` (as configured when the drain begins), or until `abort` is
    /// cancelled (a second signal). Streams still running then end with the SSE `error` event,
    /// given a moment to send it before every connection is dropped. A worker that fails ends
    /// every worker at once.
    pub async fn serve(mut self, abort: CancellationToken) -> std::io::Result<()> {
        let close = self.close.clone();
        let closing = self.closing.clone();
        let cut = self.cut.clone();
        let give_up = self.give_up.clone();
        let all_finished = async move {
            while let Some(done) = self.finished.next().await {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Err(error),
                    Err(_) => {
                        return Err(std::io::Error::other("a proxy worker stopped unexpectedly"));
                    }
                }
            }
            Ok(())
        };
        tokio::pin!(all_finished);
        let result = tokio::select! {
            result = &mut all_finished => Some(result),
            () = closing.cancelled() => None,
        };
        let result = match result {
            Some(result) => result,
            None => {
                let drain_timeout = self.live.load().config.drain_timeout;
                tracing::info!(drain_timeout = %humantime::format_duration(drain_timeout), "draining in-flight requests");
                tokio::select! {
                    result = &mut all_finished => result,
                    () = tokio::time::sleep(drain_timeout) => {
                        tracing::warn!("drain_timeout expired; ending the remaining streams and closing the connections");
                        cut.cancel();
                        give_up.cancel();
                        let _ = tokio::time::timeout(CUT_GRACE, &mut all_finished).await;
                        Ok(())
                    }
                    () = abort.cancelled() => {
                        tracing::warn!("second signal; closing the remaining connections");
                        Ok(())
                    }
                }
            }
        };
        close.cancel();
        result
    }
}

/// How long streams cut at `drain_timeout` have to send their final event before their
/// connections are dropped.
const CUT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// One proxy worker: a thread with its own runtime, accept loop and upstream pool.
struct Worker {
    runtime: tokio::runtime::Runtime,
    listener: AsyncFd<std::net::TcpListener>,
    state: Arc<AppState>,
    close: CancellationToken,
    limit: conn::ConnectionLimit,
    balance: conn::Balance,
}

impl Worker {
    fn build(
        listener: std::net::TcpListener,
        state: &AppState,
        close: &CancellationToken,
        limit: &conn::ConnectionLimit,
        balance: conn::Balance,
        max_idle: usize,
    ) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Requests' access lines and metrics, once their responses are written.
            .on_thread_park(telemetry::finish_deferred)
            .build()?;
        let listener = {
            // Registers the socket with this worker's runtime, not the caller's.
            let _runtime = runtime.enter();
            // SAFETY: the AsyncFd owns the socket, so the descriptor stays open for as long as it
            // is registered.
            unsafe { AsyncFd::register(listener) }.map_err(std::io::Error::from)
        };
        let listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                runtime.shutdown_background();
                return Err(error);
            }
        };
        let state = match state.for_worker(max_idle) {
            Ok(state) => Arc::new(state),
            Err(error) => {
                drop(listener);
                runtime.shutdown_background();
                return Err(std::io::Error::other(error));
            }
        };
        Ok(Worker {
            runtime,
            listener,
            state,
            close: close.clone(),
            limit: limit.clone(),
            balance,
        })
    }

    /// Drops a worker that never ran: its socket first, while its runtime still drives it.
    fn discard(self) {
        drop(self.listener);
        self.runtime.shutdown_background();
    }

    fn run(self) -> std::io::Result<()> {
        let Worker {
            runtime,
            listener,
            state,
            close,
            limit,
            balance,
        } = self;
        runtime.block_on(async move {
            let closing = state.closing.clone();
            let live = Arc::clone(&state.live);
            let served = conn::serve(listener, Surface::new(state), live, limit, balance, closing);
            tokio::select! {
                () = served => {}
                () = close.cancelled() => {}
            }
        });
        // The requests its tasks still held end with the runtime; what they and the last ones
        // served left to write is written now (see `telemetry::Deferred`), not at the exit.
        drop(runtime);
        telemetry::finish_deferred();
        Ok(())
    }
}

/// Binds the listening address without listening yet: a port in use fails at once, and clients
/// are refused until [`listen`].
pub fn bind(address: SocketAddr) -> anyhow::Result<TcpSocket> {
    let bind = || {
        let socket = match address {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        Ok::<_, std::io::Error>(socket)
    };
    bind().map_err(|error| anyhow::anyhow!("cannot listen on {address}: {error}"))
}

/// Starts listening on a socket from [`bind`] (or one a previous image listened on already).
pub fn listen(socket: TcpSocket) -> anyhow::Result<std::net::TcpListener> {
    let address = socket.local_addr()?;
    let listener = socket
        .listen(1024)
        .map_err(|error| anyhow::anyhow!("cannot listen on {address}: {error}"))?;
    Ok(listener.into_std()?)
}
