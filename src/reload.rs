//! SIGHUP: the configuration is read again and what may change while vLLM runs is applied.
//!
//! The file is read again; the flags stay as given at start, and the environment (`GATEWAY_*`,
//! `OPENAI_API_KEY`, ...) is the process's own, which does not change. A file `load` refuses changes nothing,
//! and its mistakes are logged in the words of `gateway config check`. Otherwise `config::KEYS`
//! decides key by key: a `Live` key takes its new value, a `Restart` key keeps the running one and
//! is logged as needing a restart. The [`Reloader`] owns the configuration as last loaded and as in
//! force; it is the only writer of the live configuration the proxy workers read.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{self, Config, Source};
use crate::notify;
use crate::proxy::{Live, LiveConfig, live_config};
use crate::telemetry;

pub struct Reloader {
    /// The command line and mode, to load the configuration the same way again.
    source: Source,
    /// The configuration as last loaded, before `resolve_vllm_port`: what a new file is compared
    /// against, so that `vllm_port = 0` read again is no change.
    loaded: Config,
    /// The configuration in force.
    running: Config,
    live: LiveConfig,
}

impl Reloader {
    /// `loaded` is the configuration as `source` loaded it at start; `running` the same once
    /// resolved, as the gateway runs with it.
    pub fn new(source: Source, loaded: Config, running: &Config) -> Self {
        Reloader {
            source,
            loaded,
            running: running.clone(),
            live: live_config(running.clone()),
        }
    }

    /// The live configuration, for the proxy workers.
    pub fn live(&self) -> LiveConfig {
        Arc::clone(&self.live)
    }

    /// Loads the configuration again and applies what may change, telling systemd.
    pub fn reload(&mut self) {
        let reloading = notify::reloading();
        let env = |name: &str| std::env::var(name).ok();
        match self.source.load(&env) {
            Ok(new) => self.apply(new),
            Err(errors) => {
                // One event per mistake, each line as `gateway config check` prints it.
                for line in errors.to_string().lines() {
                    tracing::error!("configuration not reloaded: {line}");
                }
                tracing::warn!("the configuration in force stays as it was");
            }
        }
        reloading.done();
    }

    fn apply(&mut self, new: Config) {
        let reconciled = config::reconcile(&self.loaded, &self.running, new);
        for key in &reconciled.needs_restart {
            tracing::warn!(
                key,
                "configuration key `{key}` changed but needs a restart; the running value stays"
            );
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
            "configuration reloaded"
        );
        self.loaded = reconciled.loaded;
        self.running = reconciled.running;
    }
}

/// Reloads once per request until the senders are gone.
pub async fn run(mut reloader: Reloader, mut requests: mpsc::Receiver<()>) {
    while requests.recv().await.is_some() {
        reloader.reload();
    }
}
