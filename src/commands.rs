//! The subcommands that do not run the gateway: `gateway healthcheck` and `gateway config check`.
//! (The hidden `gateway __guard` belongs to the supervisor: `supervisor::guard::run`.)

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, Flags, Mode};
use crate::lifecycle::outcome::EXIT_FAILURE;
use crate::probe;

/// `gateway healthcheck`: 0 when the URL answers 200, 1 otherwise.
pub fn healthcheck(url: &str, timeout: Duration) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return ExitCode::from(EXIT_FAILURE),
    };
    let ok = runtime.block_on(async {
        let client = probe::probe_client();
        matches!(client.get(url).timeout(timeout).send().await, Ok(response) if response.status().is_success())
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("gateway healthcheck: {url} is not ready");
        ExitCode::from(EXIT_FAILURE)
    }
}

/// `gateway config check FILE`: 0 and `FILE: ok` when the file is valid, else every mistake and 2.
pub fn check_config(file: &Path) -> ExitCode {
    match config::load(&Flags::file(file), Mode::Check, &|_| None) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}
