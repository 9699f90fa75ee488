//! SIGHUP: the configuration is read again and what may change while vLLM runs is applied; or,
//! when the gateway's executable has been replaced on disk, the new binary takes over in place.
//!
//! An upgrade begins here: a trial run of the new binary with the same arguments
//! (`upgrade::exec::CHECK_VAR` set) must load the configuration, then `run` is asked to drain and
//! exec it. Only a refused upgrade comes back; the configuration is then reloaded as usual, and the
//! reason logged. systemd hears RELOADING=1 at the start, and READY=1 from whichever image serves
//! at the end.
//!
//! The file is read again; the flags stay as given at start, and the environment (`GATEWAY_*`,
//! `OPENAI_API_KEY`, ...) is the process's own, which does not change. The file is read on a
//! blocking thread, for at most 10 s. A file `load` refuses changes nothing, and its mistakes are
//! logged in the words of `gateway config check`; so does a file that sets no keys where the one
//! in force set some (a truncated write, a pipe read once). Otherwise `config::KEYS`
//! decides key by key: a `Live` key takes its new value, a `Restart` key keeps the running one and
//! is logged as needing a restart. The [`Reloader`] owns the configuration as last loaded and as in
//! force; it is the only writer of the live configuration the proxy workers read.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::{self, Config, ConfigErrors, Origin, Source};
use crate::notify;
use crate::proxy::{Live, LiveConfig, live_config};
use crate::supervisor::child;
use crate::telemetry;
use crate::upgrade::exec::CHECK_VAR;
use crate::upgrade::handover;
use crate::upgrade::identity::{ExeIdentity, OnDisk};

/// A request to re-execute the binary at `path` in place. It is answered only if refused: when
/// the upgrade happens, the process runs the new image.
pub struct UpgradeRequest {
    pub path: PathBuf,
    refused: oneshot::Sender<String>,
}

impl UpgradeRequest {
    pub fn refuse(self, reason: String) {
        let _ = self.refused.send(reason);
    }
}

/// How long the trial run of a new binary may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reload waits for the configuration to be read (a hung mount, a FIFO nobody writes).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the trial run's complaint is kept for the log.
const CHECK_OUTPUT_MAX: u64 = 16 * 1024;

pub struct Reloader {
    /// The command line and mode, to load the configuration the same way again.
    source: Source,
    /// The configuration as last loaded, before `resolve_vllm_port`: what a new file is compared
    /// against, so that `vllm_port = 0` read again is no change.
    loaded: Config,
    /// The configuration in force.
    running: Config,
    live: LiveConfig,
    /// The executable as it was at start; `None` if it could not be read (no upgrades then).
    exe: Option<ExeIdentity>,
    upgrades: mpsc::Sender<UpgradeRequest>,
    /// A read of the configuration that outlived [`READ_TIMEOUT`] and has not returned since.
    stuck: Option<JoinHandle<Result<Config, ConfigErrors>>>,
}

impl Reloader {
    /// `loaded` is the configuration as `source` loaded it at start; `running` the same once
    /// resolved, as the gateway runs with it. Upgrade requests go to `upgrades`.
    pub fn new(
        source: Source,
        loaded: Config,
        running: &Config,
        upgrades: mpsc::Sender<UpgradeRequest>,
    ) -> Self {
        let exe = match ExeIdentity::current() {
            Ok(exe) => Some(exe),
            Err(error) => {
                tracing::warn!(%error, "cannot tell which file the gateway runs from; a replaced binary will not be taken up in place");
                None
            }
        };
        Reloader {
            source,
            loaded,
            running: running.clone(),
            live: live_config(running.clone()),
            exe,
            upgrades,
            stuck: None,
        }
    }

    /// The live configuration, for the proxy workers.
    pub fn live(&self) -> LiveConfig {
        Arc::clone(&self.live)
    }

    /// Takes up a replaced binary in place, or else loads the configuration again and applies
    /// what may change, telling systemd.
    pub async fn reload(&mut self) {
        let reloading = notify::reloading();
        // Read first: an upgrade may have to be refused for what the file says.
        let read = self.read().await;
        if let Some(path) = self.replaced_binary() {
            // A file that does not load would fail the new binary's trial run too (after as
            // long again, should its read block).
            let reason = match &read {
                Err(_) => "the configuration does not load (the errors follow)".into(),
                Ok(new) => match self.upstream_key_changed(new) {
                    Some(reason) => reason,
                    None => self.upgrade(&path).await,
                },
            };
            tracing::warn!(
                new_binary = %path.display(),
                %reason,
                "not upgrading in place; this binary keeps serving, and the configuration is reloaded"
            );
        }
        match read.and_then(|new| self.refuse_emptied(new)) {
            Ok(new) => {
                self.apply(new);
                count_reload(true);
            }
            Err(error) => {
                // One event per line, each as `gateway config check` prints it.
                for line in error.lines() {
                    tracing::error!("configuration not reloaded: {line}");
                }
                tracing::warn!("the configuration in force stays as it was");
                count_reload(false);
            }
        }
        reloading.done();
    }

    /// `new`, unless its file sets no keys where the one in force set some: a write caught
    /// halfway, or a pipe that was read once.
    fn refuse_emptied(&self, new: Config) -> Result<Config, String> {
        if new.file_keys > 0 || self.loaded.file_keys == 0 {
            return Ok(new);
        }
        let file = new.file.as_deref().unwrap_or(Path::new("")).display();
        Err(format!(
            "{file} sets no keys now (emptied, being written, or a pipe read once?)"
        ))
    }

    /// Loads the configuration again, off the runtime: a file that blocks (a hung mount, a FIFO)
    /// must not hold up the supervisor, the signals or the health port. A read that outlives
    /// [`READ_TIMEOUT`] is left to finish on its own, and reloads are refused until it has.
    async fn read(&mut self) -> Result<Config, String> {
        let file = || {
            let file = self.source.flags.config.as_deref();
            file.unwrap_or(Path::new("")).display().to_string()
        };
        if self.stuck.as_ref().is_some_and(|read| !read.is_finished()) {
            return Err(format!(
                "the last reload's read of {} has not returned yet",
                file()
            ));
        }
        let source = self.source.clone();
        let mut read = tokio::task::spawn_blocking(move || {
            source.load(&|name: &str| std::env::var(name).ok())
        });
        match tokio::time::timeout(READ_TIMEOUT, &mut read).await {
            Ok(Ok(loaded)) => loaded.map_err(|errors| errors.to_string()),
            Ok(Err(error)) => Err(format!("reading the configuration failed: {error}")),
            Err(_) => {
                self.stuck = Some(read);
                Err(format!(
                    "reading {} took longer than {} (a hung mount, a FIFO nobody writes?)",
                    file(),
                    humantime::format_duration(READ_TIMEOUT)
                ))
            }
        }
    }

    /// Why an upgrade must wait for a restart: the upstream key was changed in the file since
    /// vLLM started. It goes with vLLM's own key (`--api-key`, `VLLM_API_KEY`), which the
    /// running vLLM keeps until its next start; the new image would send the new key to it, and
    /// every request would get 401.
    fn upstream_key_changed(&self, new: &Config) -> Option<String> {
        (self.running.serve.is_some() && new.upstream.api_key != self.running.upstream.api_key)
            .then(|| {
                "`upstream_api_key` has changed since vLLM started, and a new image would send \
                 the new key to the vLLM that runs with the old one: restart the gateway to apply \
                 it (the model reloads), or put the running key back to upgrade in place"
                    .into()
            })
    }

    /// The path of the executable, if another file is there now than at start.
    fn replaced_binary(&self) -> Option<PathBuf> {
        let exe = self.exe.as_ref()?;
        match exe.on_disk() {
            OnDisk::Replaced => Some(exe.path.clone()),
            OnDisk::Unchanged => None,
            OnDisk::Missing => {
                tracing::warn!(path = %exe.path.display(), "the gateway's executable is gone from its path; reloading the configuration only");
                None
            }
        }
    }

    /// Checks the new binary, then asks `run` to drain and exec it. Returns only when the
    /// upgrade did not happen, with why.
    async fn upgrade(&self, path: &Path) -> String {
        tracing::info!(new_binary = %path.display(), "the gateway's binary was replaced; trying the new one before upgrading in place");
        if let Err(reason) = check_new_binary(path).await {
            return reason;
        }
        let (refused_tx, refused_rx) = oneshot::channel();
        let request = UpgradeRequest {
            path: path.to_path_buf(),
            refused: refused_tx,
        };
        if self.upgrades.send(request).await.is_err() {
            return "the gateway is stopping".into();
        }
        refused_rx
            .await
            .unwrap_or_else(|_| "the gateway is stopping".into())
    }

    fn apply(&mut self, new: Config) {
        let reconciled = config::reconcile(&self.loaded, &self.running, new);
        for key in &reconciled.needs_restart {
            tracing::warn!(
                key,
                "configuration key `{key}` changed but needs a restart; the running value stays"
            );
        }
        if !self.running.proxy.api_keys.is_empty() && reconciled.running.proxy.api_keys.is_empty() {
            tracing::warn!("`api_keys` is empty now: clients are no longer asked for a key");
        }
        if reconciled.applied.contains(&"log_level") {
            match telemetry::set_log_level(&reconciled.running.log.level) {
                Ok(true) => {}
                Ok(false) => tracing::info!("log_level changed, but RUST_LOG is set and wins"),
                Err(error) => tracing::warn!(%error, "cannot change the log level"),
            }
        }
        self.live
            .store(Arc::new(Live::new(reconciled.running.clone())));
        tracing::info!(
            applied = ?reconciled.applied,
            needs_restart = ?reconciled.needs_restart,
            overridden = ?overridden(&reconciled.running),
            "configuration reloaded"
        );
        self.loaded = reconciled.loaded;
        self.running = reconciled.running;
    }
}

/// The keys the file sets that a flag or a variable overrides, each with what overrides it
/// (`stream_idle_timeout (--stream-idle-timeout)`): an edit of them in the file changes nothing.
fn overridden(config: &Config) -> Vec<String> {
    config
        .overridden
        .iter()
        .map(|(key, origin)| match origin {
            Origin::Flag(flag) => format!("{key} ({flag})"),
            Origin::Env(name) => format!("{key} (${name})"),
            Origin::File(_) | Origin::Default => (*key).to_string(),
        })
        .collect()
}

/// Counts a reload, applied or refused, for `/metrics`.
fn count_reload(applied: bool) {
    let result = if applied { "applied" } else { "refused" };
    counter!("gateway_config_reloads_total", "result" => result).increment(1);
    gauge!("gateway_config_last_reload_successful").set(if applied { 1.0 } else { 0.0 });
}

/// Reloads once per request until the senders are gone.
pub async fn run(mut reloader: Reloader, mut requests: mpsc::Receiver<()>) {
    // Present from the start, so that an alert on them needs no reload first.
    for result in ["applied", "refused"] {
        counter!("gateway_config_reloads_total", "result" => result).absolute(0);
    }
    gauge!("gateway_config_last_reload_successful").set(1.0);
    while requests.recv().await.is_some() {
        reloader.reload().await;
    }
}

/// Runs the new binary with this gateway's arguments and [`CHECK_VAR`] set: it loads the
/// configuration as it would at start, and exits 0, or non-zero saying what it refuses. A binary
/// that cannot run here (another architecture, a missing library) fails this too.
async fn check_new_binary(path: &Path) -> Result<(), String> {
    let mut command = Command::new(path);
    command
        .args(std::env::args_os().skip(1))
        .env(CHECK_VAR, "1")
        .env_remove(handover::ENV_VAR)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    child::unblock_signals_in_child(&mut command);
    let spawned = child::spawn(command)
        .await
        .map_err(|error| format!("cannot run the new binary: {error}"))?;
    let pid = spawned.pid;
    let mut complaint = Vec::new();
    let checked = tokio::time::timeout(CHECK_TIMEOUT, async {
        if let Some(stderr) = spawned.stderr
            && let Ok(receiver) = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)
        {
            let _ = receiver
                .take(CHECK_OUTPUT_MAX)
                .read_to_end(&mut complaint)
                .await;
        }
        spawned.exit.await
    })
    .await;
    let exit = match checked {
        Ok(Ok(exit)) => exit,
        Ok(Err(_)) => return Err("the trial run of the new binary was not reaped".into()),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(format!(
                "the trial run of the new binary did not end within {}",
                humantime::format_duration(CHECK_TIMEOUT)
            ));
        }
    };
    if exit.exit_code() == 0 {
        return Ok(());
    }
    let complaint = String::from_utf8_lossy(&complaint);
    let complaint = complaint.trim();
    Err(if complaint.is_empty() {
        format!("the new binary refuses to start ({exit})")
    } else {
        format!("the new binary refuses to start ({exit}): {complaint}")
    })
}
