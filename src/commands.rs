//! The subcommands that do not run the gateway: `gateway healthcheck` and `gateway config check`.
//! (The hidden `gateway __guard` belongs to the supervisor: `supervisor::guard::run`.)

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, Flags, Mode, Origin};
use crate::lifecycle::outcome::EXIT_FAILURE;
use crate::probe;

/// `gateway healthcheck`: 0 when the URL answers 2xx, 1 otherwise.
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

/// `gateway config check [--serve] FILE`: every mistake and 2, or 0 and which run the file is
/// fit for. Without `--serve` the file is judged for the run it names (see [`Mode::Check`]), and
/// the answer says which that is: `serve` refuses `llm_api_base`, and a file without `model` is
/// fit for `serve` only with the model on the command line (the systemd unit passes none). With
/// `--serve` it is judged as `gateway serve --config FILE` takes it.
pub fn check_config(file: &Path, serve: bool) -> ExitCode {
    let load = |mode| config::load(&Flags::file(file), mode, &|_| None);
    if let Err(mut errors) = load(if serve { Mode::Serve } else { Mode::Check }) {
        // The file is all there is to blame here, a key it leaves out included.
        for error in &mut errors.0 {
            if error.origin == Origin::Default {
                error.origin = Origin::File(file.to_path_buf());
            }
        }
        eprintln!("{errors}");
        return ExitCode::from(2);
    }
    let shown = file.display();
    if serve || load(Mode::Serve).is_ok() {
        println!("{shown}: ok for `gateway serve --config {shown}`");
    } else if load(Mode::Standalone).is_ok() {
        println!(
            "{shown}: ok for the standalone proxy, `gateway --config {shown}` (`gateway serve` refuses its `llm_api_base`)"
        );
    } else {
        println!(
            "{shown}: ok for `gateway serve <MODEL> --config {shown}`; it names no `model`, so `gateway serve --config {shown}` alone refuses it"
        );
    }
    ExitCode::SUCCESS
}
