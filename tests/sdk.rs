//! The gateway as OpenAI SDK users meet it: the official Python SDK (installed by `make test`)
//! calls `responses.create` with and without `stream=True` through the gateway.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_openai_python_sdk_parses_responses_through_the_gateway() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/responses_client.py");
    let output = Command::new(python())
        .arg(script)
        .arg(gateway.url("/v1"))
        .output()
        .expect("python runs (`make test` installs the test clients)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK script failed (is `openai` installed?): {stderr}"
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON summary");
    assert_eq!(result["plain"]["status"], "completed");
    assert_eq!(
        result["plain"]["output_types"],
        serde_json::json!(["reasoning", "function_call"])
    );
    assert_eq!(result["plain"]["function_name"], "get_job_status");
    assert_eq!(result["streamed"]["first"], "response.created");
    assert_eq!(result["streamed"]["last"], "response.completed");
    assert_eq!(result["streamed"]["count"], 141);
    assert_eq!(result["streamed"]["text"], "HELLO");
}
