//! The gateway as OpenAI SDK users meet it: the official Python SDK (installed by `make test`)
//! calls `responses.create` with and without `stream=True` through the gateway.

mod common;

use common::*;

#[test]
fn the_openai_python_sdk_parses_responses_through_the_gateway() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let result = run_sdk_client("responses_client.py", &gateway.url("/v1"));
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
