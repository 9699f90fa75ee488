//! `gateway serve`: the actor that owns the vLLM child from spawn to last breath.
//!
//! One task (`Supervisor::run`) owns the child and its state. It `select!`s on the child's exit,
//! one timer (next probe, startup deadline, kill deadline or end of backoff), the in-flight health
//! probe, the control queue and the watchdog tick, and publishes every state change on a `watch`
//! channel. Nothing else mutates the state. Others hold a [`SupervisorHandle`]: the control sender
//! ([`Control`]: forward a signal, shutdown begun, stop and answer when done, hand over for an
//! upgrade) and the status receiver.
//!
//! After an in-place upgrade the supervisor starts from what the old image handed over
//! ([`Inherited`]): it adopts the running vLLM by pid instead of starting one.

pub mod child;
pub mod descendants;
pub mod guard;
pub mod output;
pub mod port;
pub mod reaper;

use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
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
use crate::status::{ChildStatus, UpstreamStatus, VllmReads};
use crate::upgrade::handover::HandedState;

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
    /// Describe the child for a new image and hold still (no probes, no restarts, no stop on a
    /// timer) until [`Control::Resume`]: the exec that follows ends this task.
    HandOver(oneshot::Sender<Result<Snapshot, String>>),
    /// The hand-over did not happen: supervise again.
    Resume,
}

/// The supervisor's state as a new image takes it over. The descriptors stay owned by the
/// supervisor (and open) until the exec.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub child: Option<SnapshotChild>,
    pub restarts: u32,
    pub history: History,
}

#[derive(Debug, Clone, Copy)]
pub struct SnapshotChild {
    pub pid: u32,
    pub state: HandedState,
    pub guard_fd: Option<RawFd>,
    pub stdout_fd: Option<RawFd>,
    pub stderr_fd: Option<RawFd>,
}

/// What a supervisor starts from after an in-place upgrade, instead of from nothing.
pub struct Inherited {
    pub restarts: u32,
    pub history: History,
    pub child: Option<AdoptedChild>,
}

impl Inherited {
    /// What a new image took over, as the supervisor starts from it. Registers vLLM's pid with the
    /// reaper: call it before `reaper::start`, so that an exit during the exec is not reaped as an
    /// orphan's.
    pub fn adopt(
        restarts: u32,
        history: History,
        child: Option<crate::upgrade::takeover::TakenChild>,
    ) -> Inherited {
        let child = child.map(|child| AdoptedChild {
            pid: child.pid,
            exit: reaper::register(&mut reaper::lock(), child.pid as i32),
            state: child.state,
            guard: child.guard.map(guard::Guard::from_fd),
            stdout: child.stdout,
            stderr: child.stderr,
        });
        Inherited {
            restarts,
            history,
            child,
        }
    }
}

/// A running vLLM the new image takes over: still this process's child, already registered with
/// the reaper.
pub struct AdoptedChild {
    pub pid: u32,
    pub exit: oneshot::Receiver<ExitInfo>,
    pub state: HandedState,
    pub guard: Option<guard::Guard>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
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

    /// Asks the supervisor to describe vLLM for a new image and hold still; an error says why it
    /// cannot now (vLLM is being stopped, or supervision is over).
    pub async fn hand_over(&self) -> Result<Snapshot, String> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.control
            .send(Control::HandOver(reply_tx))
            .map_err(|_| "supervision is over".to_string())?;
        reply_rx
            .await
            .map_err(|_| "supervision is over".to_string())?
    }

    /// The hand-over did not happen: the supervisor goes on.
    pub fn resume(&self) {
        let _ = self.control.send(Control::Resume);
    }
}

/// Starts the supervisor task, which starts vLLM at once (or adopts the one `inherited` names)
/// and runs until it is stopped or the restart policy ends it. The task returns how supervision
/// ended. `reads` are the proxy's reads from vLLM: a probe that times out while they move on is
/// not counted.
pub fn start(
    serve: ServeConfig,
    upstream_base: String,
    health: HealthConfig,
    inherited: Option<Inherited>,
    reads: VllmReads,
) -> (SupervisorHandle, JoinHandle<Outcome>) {
    let now = Instant::now();
    let (restarts, history, adopted) = match inherited {
        Some(inherited) => (inherited.restarts, inherited.history, inherited.child),
        None => (0, History::default(), None),
    };
    let state = match &adopted {
        None => ChildState::Idle,
        Some(child) => match child.state {
            HandedState::Starting => ChildState::Starting {
                pid: child.pid,
                since: now,
            },
            HandedState::Ready => ChildState::Ready {
                pid: child.pid,
                since: now,
            },
            HandedState::Unhealthy { failures } => ChildState::Unhealthy {
                pid: child.pid,
                failures,
                since: now,
            },
        },
    };
    let initial = ChildStatus {
        state,
        restarts,
        last_exit: None,
    };
    let (status_tx, status_rx) = watch::channel(UpstreamStatus::Child(initial.clone()));
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let next_probe = match &adopted {
        Some(child) if child.state == HandedState::Starting => now + serve.startup_poll_interval,
        // Probed at once: the new image learns vLLM's health first-hand before the next interval.
        _ => now,
    };
    let child = adopted.map(|child| {
        let kept = output::relay(child.pid, child.stdout, child.stderr);
        Running {
            pid: child.pid,
            exit: child.exit,
            ready_since: (child.state != HandedState::Starting).then_some(now),
            stranger_logged: false,
            guard: child.guard,
            output: kept,
            forwarded: Vec::new(),
        }
    });
    let supervisor = Supervisor {
        serve,
        upstream_base,
        health,
        control: control_rx,
        stop_requested: Vec::new(),
        shutting_down: false,
        status_tx,
        status: initial,
        child,
        probe: None,
        next_probe,
        kill_at: None,
        history,
        probe_client: crate::probe::probe_client(),
        reads,
        reads_at_probe: 0,
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
    /// Copies of the read ends of vLLM's stdout and stderr, which a new image takes over.
    output: output::Kept,
    /// The signals forwarded to its group (SIGUSR1, SIGUSR2), so that a death by one of them is
    /// told apart from a crash.
    forwarded: Vec<Signal>,
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
    /// The proxy's reads from vLLM, and their total when the last probe ended.
    reads: VllmReads,
    reads_at_probe: u64,
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
        if self.child.is_none() {
            if let Some(outcome) = self.spawn_child().await {
                return outcome;
            }
        } else {
            self.publish_adopted();
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
                Event::Control(Control::HandOver(reply)) => self.hand_over(reply).await,
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
                match &mut self.child {
                    Some(child) => {
                        if !child.forwarded.contains(&signal) {
                            child.forwarded.push(signal);
                        }
                        tracing::warn!(
                            pid = child.pid,
                            signal = signal.as_str(),
                            "forwarding signal to vLLM's process group; vLLM installs no handler for it and dies of it, unless a build of it handles it"
                        );
                        child::signal_group_logged(child.pid, signal);
                    }
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
            Control::HandOver(reply) => {
                // Only reached from `take_queued_control`, in the middle of a decision: not now.
                let _ = reply.send(Err("vLLM is being started or stopped".into()));
                None
            }
            Control::Resume => None,
        }
    }

    /// Logs and publishes the adopted child's state, as a spawn would have.
    fn publish_adopted(&mut self) {
        let state = self.status.state.clone();
        tracing::info!(
            pid = state.pid(),
            state = state.name(),
            restarts = self.status.restarts,
            "took over the running vLLM from the previous gateway image"
        );
        self.publish();
    }

    /// Describes the child for a new image, then holds still until told to resume (the exec
    /// failed) or to stop. Signals to forward are still forwarded.
    async fn hand_over(
        &mut self,
        reply: oneshot::Sender<Result<Snapshot, String>>,
    ) -> Option<Outcome> {
        let child = match (&self.status.state, &self.child) {
            (ChildState::Stopping { .. }, _) => {
                let _ = reply.send(Err("vLLM is being stopped".into()));
                return None;
            }
            (_, _) if self.ending() => {
                let _ = reply.send(Err("the gateway is shutting down".into()));
                return None;
            }
            (ChildState::Starting { pid, .. }, Some(child)) => {
                Some((*pid, HandedState::Starting, child))
            }
            (ChildState::Ready { pid, .. }, Some(child)) => Some((*pid, HandedState::Ready, child)),
            (ChildState::Unhealthy { pid, failures, .. }, Some(child)) => Some((
                *pid,
                HandedState::Unhealthy {
                    failures: *failures,
                },
                child,
            )),
            _ => None,
        };
        let snapshot = Snapshot {
            child: child.map(|(pid, state, running)| SnapshotChild {
                pid,
                state,
                guard_fd: running.guard.as_ref().map(guard::Guard::fd),
                stdout_fd: running.output.stdout.as_ref().map(AsRawFd::as_raw_fd),
                stderr_fd: running.output.stderr.as_ref().map(AsRawFd::as_raw_fd),
            }),
            restarts: self.status.restarts,
            history: self.history,
        };
        if reply.send(Ok(snapshot)).is_err() {
            return None;
        }
        tracing::info!("vLLM handed over to the new gateway image; supervision paused");
        loop {
            match self.control.recv().await {
                Some(Control::Resume) | None => break,
                Some(Control::HandOver(reply)) => {
                    let _ = reply.send(Err("a hand-over is already under way".into()));
                }
                Some(control) => {
                    if let Some(outcome) = self.on_control(control) {
                        return Some(outcome);
                    }
                    if self.ending() {
                        break;
                    }
                }
            }
        }
        tracing::info!("the hand-over did not happen; supervision resumes");
        None
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
        self.publish();
    }

    /// Publishes the state as it is: the gauges and the status channel.
    fn publish(&mut self) {
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
        let mut command = child::command(&self.serve);
        tracing::info!(vllm_port, command = %child::describe(&command), "starting vLLM");
        // The guard first, so that vLLM is never unguarded should the gateway die.
        let mut guard = guard::Guard::start(self.serve.stop_timeout);
        if let Some(guard) = &guard {
            guard.watch(&mut command);
        }
        let spawned = child::spawn(command).await;
        if spawned.is_err()
            && let Some(guard) = guard.take()
        {
            // No vLLM runs (one that failed its exec is gone): the guard leaves its pid alone.
            guard.release();
        }
        match spawned {
            Ok(spawned) => {
                let pid = spawned.pid;
                let output = output::relay(pid, spawned.stdout, spawned.stderr);
                let now = Instant::now();
                self.child = Some(Running {
                    pid,
                    exit: spawned.exit,
                    ready_since: None,
                    stranger_logged: false,
                    guard,
                    output,
                    forwarded: Vec::new(),
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
            EndCause::Exited => match exit {
                ExitInfo::Signal(number)
                    if running
                        .forwarded
                        .iter()
                        .any(|signal| *signal as i32 == number) =>
                {
                    tracing::warn!(pid = running.pid, %exit, exit_code = exit.exit_code(), "vLLM died of a signal the gateway forwarded to it")
                }
                _ => {
                    tracing::warn!(pid = running.pid, %exit, exit_code = exit.exit_code(), "vLLM exited on its own")
                }
            },
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
            Err(ProbeError::Upstream(reason)) => Err((reason, false)),
            Err(ProbeError::Slow(reason)) => Err((reason, true)),
            Ok(()) => Ok(()),
        };
        // Responses kept coming from vLLM since the last probe: a /health that timed out then is
        // slow (an event loop busy with a flood of requests), not hung, and a restart would
        // throw away a model that serves. (Any other failure, vLLM's own 503 included, counts.)
        let answering = self.reads.moved_since(&mut self.reads_at_probe);
        // The failure, and whether it is excused.
        let result = result.map_err(|(reason, slow)| (reason, slow && answering));
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
            (ChildState::Starting { .. }, Err((reason, _))) => {
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
            (ChildState::Ready { .. } | ChildState::Unhealthy { .. }, Err((reason, true))) => {
                self.next_probe = now + self.health.interval;
                tracing::warn!(
                    pid,
                    %reason,
                    "vLLM /health is slow, but vLLM is answering requests: not counted"
                );
            }
            (ChildState::Ready { .. } | ChildState::Unhealthy { .. }, Err((reason, _))) => {
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
        // A stopped process (SIGSTOP, a debugger let go of) takes its SIGTERM only once it runs
        // again; without this it waits out stop_timeout for its SIGKILL. (systemd does the same.)
        child::signal_group_logged(pid, Signal::SIGCONT);
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
