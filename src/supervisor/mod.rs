//! `gateway serve`: the actor that owns the vLLM child from spawn to last breath.
//!
//! One task ([`Supervisor::run`]) owns the child and its state. It `select!`s on the child's exit,
//! one timer (next probe, startup deadline, kill deadline or end of backoff), the in-flight health
//! probe, the control queue and the watchdog tick, and publishes every state change on a `watch`
//! channel. Nothing else mutates the state. Others hold a [`SupervisorHandle`]: the control sender
//! ([`Control`]: forward a signal, shutdown begun, stop and answer when done) and the status
//! receiver.

pub mod child;
pub mod descendants;
pub mod guard;
pub mod output;
pub mod port;
pub mod reaper;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use metrics::{counter, gauge};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{HealthConfig, ServeConfig};
use crate::lifecycle::backoff::{self, Decision, End, EndCause, History};
use crate::lifecycle::outcome::Outcome;
use crate::lifecycle::schedule::{self, AfterProbe, Timers, after_probe};
use crate::lifecycle::state::{ChildState, ExitInfo, StopReason, transition};
use crate::probe::ProbeError;
use crate::resources::Exhausted;
use crate::status::{ChildStatus, UpstreamStatus};

/// Messages to the supervisor.
#[derive(Debug)]
pub enum Control {
    /// Deliver this signal to the child's process group.
    Forward(Signal),
    /// The gateway's shutdown has begun (it drains before it stops the child): a child that exits
    /// from now on is not restarted, and a pending restart does not happen.
    ShutdownBegun,
    /// Stop the child's group and end; the outcome is sent back once vLLM and whatever it left
    /// outside its group are gone.
    Stop(oneshot::Sender<Outcome>),
}

/// The way to the supervisor task: its control queue and its status. Cloned freely.
#[derive(Clone)]
pub struct SupervisorHandle {
    control: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<UpstreamStatus>,
}

impl SupervisorHandle {
    /// The child's status as the supervisor publishes it.
    pub fn status(&self) -> watch::Receiver<UpstreamStatus> {
        self.status.clone()
    }

    /// Delivers `signal` to the child's process group (logged and dropped with no child).
    pub fn forward(&self, signal: Signal) {
        let _ = self.control.send(Control::Forward(signal));
    }

    /// Tells the supervisor that the shutdown has begun: no restarts from now on.
    pub fn shutdown_begun(&self) {
        let _ = self.control.send(Control::ShutdownBegun);
    }

    /// Stops the child's group and returns once everything of vLLM's is gone, with how
    /// supervision ended; `None` when the supervisor had already ended on its own (its task
    /// returns the outcome then).
    pub async fn stop(&self) -> Option<Outcome> {
        let (done_tx, done_rx) = oneshot::channel();
        self.control.send(Control::Stop(done_tx)).ok()?;
        done_rx.await.ok()
    }
}

/// Starts the supervisor task, which starts vLLM at once and runs until it is stopped or the
/// restart policy ends it. The task returns how supervision ended.
pub fn start(
    serve: ServeConfig,
    upstream_base: String,
    health: HealthConfig,
) -> (SupervisorHandle, JoinHandle<Outcome>) {
    let initial = ChildStatus {
        state: ChildState::Idle,
        restarts: 0,
        last_exit: None,
    };
    let (status_tx, status_rx) = watch::channel(UpstreamStatus::Child(initial.clone()));
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let supervisor = Supervisor {
        serve,
        upstream_base,
        health,
        control: control_rx,
        stop_requested: Vec::new(),
        shutting_down: false,
        status_tx,
        status: initial,
        child: None,
        probe: None,
        next_probe: Instant::now(),
        kill_at: None,
        history: History::default(),
        probe_client: crate::probe::probe_client(),
    };
    let handle = SupervisorHandle {
        control: control_tx,
        status: status_rx,
    };
    (handle, tokio::spawn(supervisor.run()))
}

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), ProbeError>> + Send>>;

/// The running child, as far as the supervisor needs it.
struct Running {
    pid: u32,
    exit: oneshot::Receiver<ExitInfo>,
    ready_since: Option<Instant>,
    /// A stranger answered on vLLM's port during this start, and that was logged.
    stranger_logged: bool,
    /// Stops the group if the gateway dies; released once the group is gone.
    guard: Option<guard::Guard>,
}

struct Supervisor {
    serve: ServeConfig,
    upstream_base: String,
    health: HealthConfig,
    control: mpsc::UnboundedReceiver<Control>,
    /// Who asked for the stop, to be told the outcome; not empty once a stop was asked for.
    stop_requested: Vec<oneshot::Sender<Outcome>>,
    /// The gateway's shutdown has begun (it stops the child later): no restarts from then on.
    shutting_down: bool,
    status_tx: watch::Sender<UpstreamStatus>,
    /// The published value; changed only through [`Supervisor::set_state`].
    status: ChildStatus,
    child: Option<Running>,
    /// The health probe in flight, if any.
    probe: Option<ProbeFuture>,
    next_probe: Instant,
    /// When SIGKILL follows the SIGTERM of a stop.
    kill_at: Option<Instant>,
    history: History,
    /// Probes never reuse connections (see `probe`).
    probe_client: reqwest::Client,
}

/// The shortest wait before retrying a start that failed for lack of the gateway's own resources.
const LOCAL_RETRY_DELAY: Duration = Duration::from_secs(1);

/// A pending future for `select!` branches that have nothing to wait for.
async fn never<T>() -> T {
    std::future::pending().await
}

impl Supervisor {
    /// Supervises until the outcome is known, then stops whatever vLLM left outside its group
    /// before the gateway exits.
    async fn run(mut self) -> Outcome {
        let outcome = self.supervise().await;
        let keep: Vec<u32> = self
            .child
            .as_ref()
            .map(|child| child.pid)
            .into_iter()
            .collect();
        descendants::stop_all(&keep, self.serve.stop_timeout).await;
        for done in self.stop_requested.drain(..) {
            let _ = done.send(outcome.clone());
        }
        outcome
    }

    async fn supervise(&mut self) -> Outcome {
        let watchdog_every = crate::notify::watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        if let Some(outcome) = self.spawn_child().await {
            return outcome;
        }
        loop {
            let deadline = self.next_deadline();
            let Supervisor {
                child,
                probe,
                control,
                ..
            } = self;
            let exit = async {
                match child.as_mut() {
                    Some(child) => (&mut child.exit).await.ok(),
                    None => never().await,
                }
            };
            let probe = async {
                match probe.as_mut() {
                    Some(probe) => probe.await,
                    None => never().await,
                }
            };
            let event = tokio::select! {
                exit = exit => Event::Exited(exit),
                result = probe => Event::Probed(result),
                () = tokio::time::sleep_until(deadline) => Event::Timer,
                Some(control) = control.recv() => Event::Control(control),
                _ = watchdog.tick(), if watchdog_every.is_some() => Event::Watchdog,
            };
            let outcome = match event {
                Event::Exited(exit) => self.on_exit(exit).await,
                Event::Probed(result) => {
                    self.probe = None;
                    self.on_probe(result);
                    None
                }
                Event::Timer => self.on_timer().await,
                Event::Control(control) => self.on_control(control),
                Event::Watchdog => {
                    crate::notify::watchdog_ping();
                    None
                }
            };
            if let Some(outcome) = outcome {
                return outcome;
            }
        }
    }

    fn on_control(&mut self, control: Control) -> Option<Outcome> {
        match control {
            Control::Forward(signal) => {
                match &self.child {
                    Some(child) => child::signal_group_logged(child.pid, signal),
                    None => tracing::info!(
                        signal = signal.as_str(),
                        "no vLLM running; signal not forwarded"
                    ),
                }
                None
            }
            Control::ShutdownBegun => {
                self.shutting_down = true;
                None
            }
            Control::Stop(done) => {
                let first = self.stop_requested.is_empty();
                self.stop_requested.push(done);
                if first { self.on_stop() } else { None }
            }
        }
    }

    /// Takes the control messages already queued, so that a decision about the child (spawn it,
    /// restart it) sees a shutdown or stop that was asked for before it.
    fn take_queued_control(&mut self) -> Option<Outcome> {
        while let Ok(control) = self.control.try_recv() {
            if let Some(outcome) = self.on_control(control) {
                return Some(outcome);
            }
        }
        None
    }

    /// A stop was asked for, or the shutdown has begun.
    fn ending(&self) -> bool {
        !self.stop_requested.is_empty() || self.shutting_down
    }

    /// The one timer: whichever of the state's deadlines comes first.
    fn next_deadline(&self) -> Instant {
        let timers = Timers {
            next_probe: self.next_probe,
            probe_in_flight: self.probe.is_some(),
            kill_at: self.kill_at,
        };
        schedule::next_deadline(
            &self.status.state,
            self.serve.startup_timeout,
            timers,
            Instant::now(),
        )
    }

    fn set_state(&mut self, next: ChildState) {
        transition(&mut self.status.state, next);
        for name in ChildState::NAMES {
            gauge!("gateway_child_state", "state" => name).set(
                if name == self.status.state.name() {
                    1.0
                } else {
                    0.0
                },
            );
        }
        gauge!("gateway_child_up").set(if matches!(self.status.state, ChildState::Ready { .. }) {
            1.0
        } else {
            0.0
        });
        self.status_tx
            .send_replace(UpstreamStatus::Child(self.status.clone()));
    }

    async fn spawn_child(&mut self) -> Option<Outcome> {
        // What the last vLLM left outside its group (it may hold the port, or the GPU) goes first.
        descendants::stop_all(&[], self.serve.stop_timeout).await;
        if let Some(outcome) = self.take_queued_control() {
            return Some(outcome);
        }
        if self.ending() {
            let exit = self.status.last_exit;
            return Some(self.finish(exit, Outcome::Stopped));
        }
        let vllm_port = self.serve.vllm_port;
        match port::check_free(vllm_port) {
            port::PortCheck::Free => {}
            port::PortCheck::Taken(holder) => {
                let holder = holder.map_or_else(
                    || "a process the gateway cannot see".to_string(),
                    |holder| holder.to_string(),
                );
                tracing::error!(
                    vllm_port,
                    %holder,
                    "vLLM's port is in use by another process; not starting vLLM"
                );
                return self.after_end(End {
                    exit: ExitInfo::Code(1),
                    cause: EndCause::PortInUse,
                    ready_for: None,
                });
            }
            port::PortCheck::Local(exhausted) => return self.retry_local(exhausted),
            port::PortCheck::Unknown(error) => {
                tracing::warn!(vllm_port, %error, "cannot check that vLLM's port is free; starting vLLM anyway");
            }
        }
        let command = child::command(&self.serve);
        tracing::info!(vllm_port, command = %child::describe(&command), "starting vLLM");
        match child::spawn(command).await {
            Ok(spawned) => {
                let pid = spawned.pid;
                output::relay(pid, spawned.stdout, spawned.stderr);
                let now = Instant::now();
                self.child = Some(Running {
                    pid,
                    exit: spawned.exit,
                    ready_since: None,
                    stranger_logged: false,
                    guard: guard::Guard::start(pid, self.serve.stop_timeout),
                });
                self.next_probe = now + self.serve.startup_poll_interval;
                self.set_state(ChildState::Starting { pid, since: now });
                tracing::info!(pid, "vLLM started; waiting for /health");
                None
            }
            Err(error) if let Some(exhausted) = Exhausted::from_spawn(&error) => {
                self.retry_local(exhausted)
            }
            Err(error) => {
                tracing::error!(vllm_bin = %self.serve.vllm_bin, %error, "cannot start vLLM");
                // A start that could not even spawn counts as a failed start, with the shell's code.
                let code = if error.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                self.after_end(End {
                    exit: ExitInfo::Code(code),
                    cause: EndCause::Exited,
                    ready_for: None,
                })
            }
        }
    }

    /// A start failed for lack of the gateway's own resources: that is not vLLM's failure, so it
    /// is retried after a delay without counting toward `max_restarts`.
    fn retry_local(&mut self, exhausted: Exhausted) -> Option<Outcome> {
        let delay = self.serve.backoff.delay.max(LOCAL_RETRY_DELAY);
        tracing::error!(
            limit = %exhausted,
            retry_in = %humantime::format_duration(delay),
            "cannot start vLLM: the gateway's own problem, not vLLM's; retrying, not counted against max_restarts"
        );
        self.set_state(ChildState::Backoff {
            attempt: self.status.restarts,
            until: Instant::now() + delay,
        });
        None
    }

    async fn on_exit(&mut self, exit: Option<ExitInfo>) -> Option<Outcome> {
        let running = self.child.take()?;
        self.probe = None;
        self.kill_at = None;
        // The reaper drops the sender only if it is gone; treat that as an unknown failure.
        let exit = exit.unwrap_or(ExitInfo::Code(1));
        // Whatever vLLM left in its group (engine core, workers) goes too, before any restart.
        child::signal_group_logged(running.pid, Signal::SIGKILL);
        if let Some(guard) = running.guard {
            guard.release();
        }
        self.status.last_exit = Some(exit);
        gauge!("gateway_child_last_exit_code").set(f64::from(exit.exit_code()));
        let ready_for = running.ready_since.map(|since| since.elapsed());
        let cause = match self.status.state {
            ChildState::Stopping {
                reason: StopReason::Shutdown,
                ..
            } => {
                tracing::info!(pid = running.pid, %exit, exit_code = exit.exit_code(), "vLLM stopped");
                return Some(self.finish(Some(exit), Outcome::Stopped));
            }
            ChildState::Stopping {
                reason: StopReason::StartupTimeout,
                ..
            } => EndCause::StartupTimeout,
            ChildState::Stopping {
                reason: StopReason::Unhealthy,
                ..
            } => EndCause::Unhealthy,
            _ => EndCause::Exited,
        };
        match cause {
            EndCause::Exited => {
                tracing::warn!(pid = running.pid, %exit, exit_code = exit.exit_code(), "vLLM exited on its own")
            }
            _ => {
                tracing::info!(pid = running.pid, %exit, exit_code = exit.exit_code(), "vLLM stopped")
            }
        }
        // A shutdown or a stop asked for meanwhile comes before the restart policy.
        if let Some(outcome) = self.take_queued_control() {
            return Some(outcome);
        }
        if self.ending() {
            return Some(self.finish(Some(exit), Outcome::Stopped));
        }
        self.after_end(End {
            exit,
            cause,
            ready_for,
        })
    }

    /// Applies the restart policy after a run ended.
    fn after_end(&mut self, end: End) -> Option<Outcome> {
        let decision = backoff::decide(
            self.serve.restart,
            &self.serve.backoff,
            &self.serve.restart_prevent_exit_codes,
            &mut self.history,
            end,
            fastrand::f64(),
        );
        match decision {
            Decision::Restart { delay } => {
                let reason = match (end.cause, end.exit) {
                    (EndCause::StartupTimeout, _) => "startup_timeout",
                    (EndCause::Unhealthy, _) => "unhealthy",
                    (EndCause::PortInUse, _) => "port_in_use",
                    (EndCause::Exited, ExitInfo::Code(_)) => "exit_code",
                    (EndCause::Exited, ExitInfo::Signal(_)) => "signal",
                };
                counter!("gateway_child_restarts_total", "reason" => reason).increment(1);
                let attempt = self.status.restarts + 1;
                tracing::info!(attempt, delay = %humantime::format_duration(round_ms(delay)), reason, "restarting vLLM after a delay");
                self.set_state(ChildState::Backoff {
                    attempt,
                    until: Instant::now() + delay,
                });
                None
            }
            // vLLM never ran when its port was taken: there is no exit of its to report.
            Decision::Stop(outcome) => Some(match end.cause {
                EndCause::PortInUse => self.finish(self.status.last_exit, outcome),
                _ => self.finish(Some(end.exit), outcome),
            }),
        }
    }

    fn finish(&mut self, exit: Option<ExitInfo>, outcome: Outcome) -> Outcome {
        self.set_state(ChildState::Exited { status: exit });
        outcome
    }

    fn on_probe(&mut self, result: Result<(), ProbeError>) {
        let now = Instant::now();
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = child.pid;
        let result = match result {
            Err(ProbeError::Local(exhausted)) => {
                // Not vLLM's fault: neither a failure nor a success, the state stays as it is.
                tracing::warn!(
                    pid,
                    limit = %exhausted,
                    "the gateway could not send its /health probe: the gateway's own problem, not counted against vLLM"
                );
                self.next_probe = now
                    + match self.status.state {
                        ChildState::Starting { .. } => self.serve.startup_poll_interval,
                        _ => self.health.interval,
                    };
                return;
            }
            Err(ProbeError::Upstream(reason)) => Err(reason),
            Ok(()) => Ok(()),
        };
        match (&self.status.state, result) {
            (ChildState::Starting { .. }, Ok(()))
                if let Err(reason) = port::group_owns_listener(pid, self.serve.vllm_port) =>
            {
                // Whatever answered is not vLLM: never ready on it. vLLM, which cannot bind, exits
                // and the restart policy takes over; or startup_timeout ends the start.
                if !std::mem::replace(&mut child.stranger_logged, true) {
                    tracing::error!(
                        pid,
                        vllm_port = self.serve.vllm_port,
                        %reason,
                        "something other than vLLM answers on vLLM's port; not ready"
                    );
                }
                self.next_probe = now + self.serve.startup_poll_interval;
            }
            (ChildState::Starting { since, .. }, Ok(())) => {
                let took = now.saturating_duration_since(*since);
                child.ready_since = Some(now);
                gauge!("gateway_child_start_seconds").set(took.as_secs_f64());
                tracing::info!(pid, took = %humantime::format_duration(round_ms(took)), "vLLM is ready");
                self.next_probe = now + self.health.interval;
                self.set_state(ChildState::Ready { pid, since: now });
            }
            (ChildState::Starting { .. }, Err(reason)) => {
                tracing::debug!(pid, %reason, "vLLM not ready yet");
                self.next_probe = now + self.serve.startup_poll_interval;
            }
            (ChildState::Ready { .. } | ChildState::Unhealthy { .. }, Ok(())) => {
                self.next_probe = now + self.health.interval;
                if after_probe(&self.status.state, true, self.serve.health_failures)
                    == AfterProbe::Ready
                {
                    tracing::info!(pid, "vLLM /health answers again");
                    self.set_state(ChildState::Ready { pid, since: now });
                }
            }
            (ChildState::Ready { .. } | ChildState::Unhealthy { .. }, Err(reason)) => {
                self.next_probe = now + self.health.interval;
                match after_probe(&self.status.state, false, self.serve.health_failures) {
                    AfterProbe::Hung { failures } => {
                        tracing::error!(pid, failures, %reason, "vLLM is hung: /health failed too many times in a row; stopping it");
                        self.begin_stop(StopReason::Unhealthy);
                    }
                    AfterProbe::Unhealthy { failures } => {
                        tracing::warn!(pid, failures, threshold = self.serve.health_failures, %reason, "vLLM /health failed");
                        self.set_state(ChildState::Unhealthy {
                            pid,
                            failures,
                            since: now,
                        });
                    }
                    AfterProbe::Same | AfterProbe::Ready => {}
                }
            }
            _ => {}
        }
    }

    async fn on_timer(&mut self) -> Option<Outcome> {
        let now = Instant::now();
        match self.status.state.clone() {
            ChildState::Starting { pid, .. }
                if schedule::startup_expired(
                    &self.status.state,
                    self.serve.startup_timeout,
                    now,
                ) =>
            {
                tracing::error!(pid, startup_timeout = %humantime::format_duration(self.serve.startup_timeout), "vLLM did not become ready in time; stopping it");
                self.begin_stop(StopReason::StartupTimeout);
            }
            ChildState::Starting { .. }
            | ChildState::Ready { .. }
            | ChildState::Unhealthy { .. }
                if self.probe.is_none() && now >= self.next_probe =>
            {
                let client = self.probe_client.clone();
                let base = self.upstream_base.clone();
                let timeout = self.health.timeout;
                self.probe = Some(Box::pin(async move {
                    crate::probe::probe(&client, &base, timeout).await
                }));
            }
            ChildState::Stopping { pid, .. } if self.kill_at.is_some_and(|at| now >= at) => {
                tracing::warn!(
                    pid,
                    stop_timeout = %humantime::format_duration(self.serve.stop_timeout),
                    "vLLM did not stop in time; sending SIGKILL to its group"
                );
                child::signal_group_logged(pid, Signal::SIGKILL);
                self.kill_at = None;
            }
            ChildState::Backoff { .. } if self.shutting_down => {
                let exit = self.status.last_exit;
                return Some(self.finish(exit, Outcome::Stopped));
            }
            ChildState::Backoff { until, attempt } if now >= until => {
                self.status.restarts = attempt;
                return self.spawn_child().await;
            }
            _ => {}
        }
        None
    }

    fn on_stop(&mut self) -> Option<Outcome> {
        match self.status.state.clone() {
            ChildState::Idle | ChildState::Backoff { .. } | ChildState::Exited { .. } => {
                let exit = self.status.last_exit;
                Some(self.finish(exit, Outcome::Stopped))
            }
            _ => {
                self.begin_stop(StopReason::Shutdown);
                None
            }
        }
    }

    /// SIGTERM to the child's group now, SIGKILL at `stop_timeout`.
    fn begin_stop(&mut self, reason: StopReason) {
        let Some(child) = &self.child else { return };
        let pid = child.pid;
        tracing::info!(pid, ?reason, "sending SIGTERM to vLLM's process group");
        child::signal_group_logged(pid, Signal::SIGTERM);
        self.probe = None;
        // A shutdown during an earlier stop keeps the earlier kill deadline.
        if self.kill_at.is_none() || !matches!(self.status.state, ChildState::Stopping { .. }) {
            self.kill_at = Some(Instant::now() + self.serve.stop_timeout);
        }
        self.set_state(ChildState::Stopping { pid, reason });
    }
}

enum Event {
    Exited(Option<ExitInfo>),
    Probed(Result<(), ProbeError>),
    Timer,
    Control(Control),
    Watchdog,
}

fn round_ms(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}
