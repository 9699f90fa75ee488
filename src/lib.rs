//! `gateway`: a supervisor and reverse proxy for vLLM's OpenAI-compatible API.
//!
//! # Codemap
//!
//! Modules in layers; a module uses only modules of the layers below it (no import cycles):
//!
//! ```text
//!  main.rs, cli  process-wide setup, subcommands; the flags, made from config's table
//!     │
//!  run           the run sequence            (beside it: commands)
//!     │
//!  signals       reload
//!     │
//!  proxy: workers ─▶ conn, router ─▶ endpoints       supervisor (the actor, its handle)
//!     │                                                 │
//!  proxy::forward ─▶ body, errors, headers,          supervisor::child ─▶ reaper; port,
//!    admission, keepalive, upstream, timer, wake;    descendants ─▶ guard; output
//!  telemetry; notify
//!     │                                                 │
//!  probe         the upstream /health probe, the standalone poller
//!     │
//!  status        the upstream's state on a watch     upgrade (in-place upgrade: its parts)
//!     │
//!  lifecycle     state, backoff, schedule, outcome: the supervisor's pure parts
//!  config, resources
//! ```
//!
//! - `run`: the run sequence, given a config, a bound socket and the shutdown triggers
//!   ([`run::run`]); under `serve` it starts the supervisor, in both modes the proxy workers and
//!   the health listener. It holds the old image's side of an in-place upgrade: drain with the
//!   socket kept open, the supervisor's hand-over, the exec.
//! - `commands`: the subcommands that do not run the gateway (`healthcheck`, `config check`).
//! - `signals`: the one task that turns signals into stop requests, reloads, or signals to forward
//!   to the child; the one thread that takes them (every other blocks them), which an upgrade's
//!   exec holds back.
//! - `reload`: SIGHUP: reads the configuration again and swaps in what may change while vLLM runs
//!   (`config::KEYS` says which keys) as the proxy's `proxy::Live`; or, when the binary was
//!   replaced, runs the new one on trial and asks `run` to upgrade in place.
//! - `proxy`: the HTTP surface, served by one worker thread per CPU (each its own single-threaded
//!   runtime, accept loop and upstream pool: `proxy::workers`, which also binds the listener).
//!   `proxy::router` is the router, and the `Surface` each connection calls, which skips it for a
//!   forwarded request while CORS is off; `proxy::endpoints` the gateway's own `/livez`, `/readyz`,
//!   `/health`, `/metrics`; `proxy::state` the state handlers share, the live configuration and
//!   each worker's copy of it (`LiveCopy`), and each worker's copy of vLLM's readiness
//!   (`StatusCopy`).
//!   `proxy::conn` accepts client connections under the shared `max_connections` limit, spreading
//!   them evenly over the workers, and enforces the client-side header, idle and send timeouts on
//!   the socket; it also serves the health listener (`health_port`: the gateway's own endpoints
//!   alone, under a limit of their own) on the main runtime, which `run` opens at start.
//!   `proxy::forward` forwards one request; `proxy::admission` holds it to the gateway-wide
//!   `max_concurrent_requests` (a semaphore every worker shares, a bounded FIFO queue);
//!   `proxy::keepalive` begins the stream of a streaming request still waiting for vLLM and
//!   finishes it from a task (forward hands it the rest of the exchange, so keepalive never names
//!   forward); `proxy::upstream` holds a worker's connections to vLLM (HTTP/1.1 over plain
//!   sockets, and the worker's pool of idle ones); `proxy::headers` holds the hop-by-hop
//!   rules; `proxy::body` wraps bodies with limits and timeouts; `proxy::timer` arms the sleeps of
//!   those, of the client-side deadlines and of the first-byte deadline only when something has
//!   to wait; `proxy::wake` polls a shutdown token's wait (a connection's drain) only once it has
//!   woken, and gives requests the cut as a flag their connection sets; `proxy::errors` shapes
//!   every error as OpenAI JSON or a final SSE `error` event.
//! - `supervisor`: `gateway serve`, the actor that owns the child (one task); others hold a
//!   `SupervisorHandle` (its `Control` sender and status receiver). `child` spawns and
//!   stops process groups, `port` checks that `vllm_port` is free and that vLLM's group owns the
//!   socket that answered before `Ready`, `descendants` stops what vLLM left outside its group
//!   (adopted orphans) before each start and before exit, `guard` stops a group whose gateway was
//!   SIGKILLed (`gateway __guard`), `reaper` owns every `waitpid`, `output` relays the child's
//!   stdout/stderr into the log.
//! - `telemetry`: logging setup (the access log through a queue off the request path), Prometheus
//!   metrics, one access-log record per request.
//! - `notify`: systemd `sd_notify` (readiness, status, start-timeout extensions, drain, watchdog,
//!   reloads).
//! - `status`: [`status::UpstreamStatus`], the one value on a `watch` channel that tells the proxy
//!   and the health endpoints whether the upstream can serve.
//! - `probe`: the upstream `/health` probe, and the standalone poller that publishes its outcome.
//! - `lifecycle`: the child's life as data: `state` is the child's state machine, `backoff`
//!   decides restarts, `schedule` holds the supervisor's timing (next deadline, startup timeout,
//!   the streak of failed probes), `outcome` says how supervision ended and with which exit code.
//! - `config`: `table` is the one table of keys (type, default, help, flag, variables, reload);
//!   `load` merges flags > `GATEWAY_*` environment > file > defaults key by key, each value
//!   remembering its origin; `validate` makes the checks that span keys and builds
//!   [`config::Config`], every mistake blamed on the flag, variable or file key that gave it.
//! - `cli`: the command line (clap). The flags of configuration keys are made from
//!   `config::KEYS` and passed on as text; nothing here has a default or reads the environment.
//! - `upgrade`: the parts of re-executing a replaced binary in place: `identity` tells a replaced
//!   binary by device and inode, `handover` is the versioned description a new image validates or
//!   refuses (yet still adopts vLLM by pid), `fds` clears close-on-exec on exactly the descriptors
//!   that cross the exec, `exec` is the old image's `execve`, `takeover` the new image's first
//!   step (`main` runs it before anything opens a descriptor).
//! - `resources`: which errors mean the gateway itself ran out of descriptors or memory, and which
//!   limit it hit; such errors are never counted against vLLM.
//!
//! # Flow
//!
//! A connection is accepted by `proxy::conn` once a permit of the connection limit is free; its
//! request enters `proxy::router::Surface`, reaches `forward::forward_under`, waits (under `serve`)
//! until the status says the child accepts requests, is rewritten and sent over one of the
//! worker's pooled upstream connections (`proxy::upstream`); the answer streams back frame by
//! frame through `body::UpstreamBody`. A request never leaves the worker thread that accepted its
//! connection, and touches only that worker's memory: its state, pool and shutdown tokens (built on
//! its thread), its copy of the live configuration, its part of the request metrics.
//! `main` binds the listen address (so a taken port fails at once); under `serve`, `run` starts
//! the supervisor, waits for the first `Ready`, and only then listens and starts the proxy workers. On
//! SIGTERM readiness turns 503, the listener closes, in-flight requests drain, then the supervisor
//! stops the child's whole process group; it does so on every way out of `run_serve`, errors too.
//! On SIGHUP with a replaced binary, the workers drain while the listener stays open, the
//! supervisor hands over its description of vLLM, and the process execs the new binary, whose
//! `main` takes the socket and vLLM over (`upgrade::takeover`, `supervisor::Inherited`).
//!
//! # Invariants
//!
//! - The proxy never touches child processes; it only reads the status watch.
//! - Forwarding a request reads the live configuration once, so its keys, limits and timeouts
//!   come from one configuration; only the reload task replaces it, and a reload never touches vLLM.
//! - Only the supervisor task mutates the child state, and only through `lifecycle::state::transition`.
//! - Only the reaper calls `waitpid`; nothing else reaps, so no exit status is ever stolen.
//! - A hand-over never leads to signalling vLLM: a refused one adopts it by pid.
//! - Every signal to the child goes to its whole process group.
//! - Nothing of vLLM's outlives it: before each start and before exit, every descendant of the
//!   gateway but its guards is stopped (`supervisor::descendants`).
//! - Stream bodies are never collected: frames are forwarded as they arrive.
//! - `max_concurrent_requests` is one limit for the whole gateway: a request's turn is a permit
//!   of the one semaphore every worker shares, held by its response body until the body ends.
//! - No secret is ever formatted into a log line or an error (`config::Secret` has a redacting `Debug`).
//! - Nothing below `cli` depends on clap: the domain enums (`RestartPolicy`, `LogFormat`) are
//!   `config`'s.

#![warn(clippy::unwrap_used)]

pub mod cli;
pub mod commands;
pub mod config;
pub mod lifecycle;
pub mod notify;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod resources;
pub mod run;
pub mod signals;
pub mod status;
pub mod supervisor;
pub mod telemetry;
pub mod upgrade;
