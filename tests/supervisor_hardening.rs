//! `gateway serve` when vLLM is not the one at fault: exits it did not ask for, the gateway's own
//! resource errors, a stranger on vLLM's port, processes that left vLLM's group, and secrets on
//! vLLM's command line. Real processes, real sockets, mock-vllm as the child.

mod common;

use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

fn wait_ready(gateway: &Proc) {
    wait_until("the gateway to be ready", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
}

/// The gateway's own JSON log lines (not vLLM's relayed output).
fn gateway_lines(gateway: &Proc) -> Vec<serde_json::Value> {
    gateway
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] != "vllm")
        .collect()
}

fn lines_with_message(gateway: &Proc, message: &str) -> Vec<serde_json::Value> {
    gateway_lines(gateway)
        .into_iter()
        .filter(|line| line["message"] == message)
        .collect()
}

/// Regression: vLLM's `--api-key` takes a list, and `-- --api-key sk-a sk-b` was logged as
/// `--api-key *** sk-b`.
#[test]
fn every_key_of_vllms_api_key_list_is_hidden_in_the_log() {
    let (gateway, _) = gateway_serve(
        &[
            "--",
            "--api-key",
            "sk-first-secret",
            "sk-second-secret",
            "--hf-token=hf_third_secret",
            "--enforce-eager",
        ],
        &[],
    );
    wait_ready(&gateway);
    let starting = lines_with_message(&gateway, "starting vLLM");
    let command = starting[0]["command"].as_str().expect("command field");
    assert!(
        command.ends_with("--api-key *** *** --hf-token=*** --enforce-eager"),
        "{command}"
    );
    for line in gateway_lines(&gateway) {
        let text = line.to_string();
        assert!(!text.contains("secret"), "a secret in the log: {text}");
    }
}
