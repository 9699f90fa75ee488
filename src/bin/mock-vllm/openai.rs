//! vLLM's wire formats (declared in vLLM's field order, which serde keeps and a JSON map would
//! sort), its error bodies, and the request checks both generation endpoints share.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::sleep;

use crate::state::AppState;

// The wire formats below declare their fields in vLLM's order, which serde keeps and a JSON map
// would sort.

/// Serializes as `null`, for the fields vLLM always sends empty.
pub(crate) type Null = Option<()>;

/// vLLM's `ErrorResponse`.
#[derive(Serialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorInfo,
}

#[derive(Serialize)]
pub(crate) struct ErrorInfo {
    pub(crate) message: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// The request field at fault, which vLLM names only for an unknown model.
    pub(crate) param: Option<&'static str>,
    pub(crate) code: u16,
}

#[derive(Serialize)]
pub(crate) struct ModelList<'a> {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<ModelCard<'a>>,
}

#[derive(Serialize)]
pub(crate) struct ModelCard<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) owned_by: &'static str,
    pub(crate) root: &'a str,
    pub(crate) parent: Null,
    pub(crate) max_model_len: u64,
    pub(crate) permission: Vec<()>,
}

#[derive(Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: usize,
    pub(crate) total_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) prompt_tokens_details: Null,
}

#[derive(Serialize)]
pub(crate) struct ChatCompletionBody<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: Vec<ChatChoice>,
    pub(crate) service_tier: Null,
    pub(crate) system_fingerprint: Null,
    pub(crate) usage: Usage,
    pub(crate) prompt_logprobs: Null,
    pub(crate) kv_transfer_params: Null,
}

#[derive(Serialize)]
pub(crate) struct ChatChoice {
    pub(crate) index: u32,
    pub(crate) message: ChatMessage,
    pub(crate) logprobs: Null,
    pub(crate) finish_reason: &'static str,
    pub(crate) stop_reason: Null,
}

#[derive(Serialize)]
pub(crate) struct ChatMessage {
    pub(crate) role: &'static str,
    pub(crate) content: String,
    pub(crate) refusal: Null,
    pub(crate) annotations: Null,
    pub(crate) audio: Null,
    pub(crate) function_call: Null,
    pub(crate) tool_calls: Vec<()>,
    pub(crate) reasoning_content: Null,
}

#[derive(Serialize)]
pub(crate) struct ChatChunk<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: Vec<ChunkChoice>,
    /// Only the extra last chunk that `stream_options.include_usage` asks for has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(crate) struct ChunkChoice {
    pub(crate) index: u32,
    pub(crate) delta: Delta,
    pub(crate) logprobs: Null,
    pub(crate) finish_reason: Option<&'static str>,
    /// vLLM sends `"stop_reason": null` on the finish chunk only, hence the double option.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stop_reason: Option<Null>,
}

#[derive(Serialize)]
pub(crate) struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<&'static str>,
}

impl ChunkChoice {
    pub(crate) fn delta(role: Option<&'static str>, content: Option<&'static str>) -> Self {
        ChunkChoice {
            index: 0,
            delta: Delta { role, content },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
        }
    }
}

/// Applies the headers delay and the forced failure, which both generation endpoints share.
pub(crate) async fn generation_preamble(state: &AppState) -> Option<Response> {
    if !state.knobs.headers_delay.is_zero() {
        sleep(state.knobs.headers_delay).await;
    }
    state
        .knobs
        .fail_status
        .map(|status| openai_error(status, "mock failure"))
}

pub(crate) fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(request)) => Ok(request),
        Ok(_) => Err("the request body must be a JSON object".to_owned()),
        Err(error) => Err(format!("JSON decode error: {error}")),
    }
}

pub(crate) fn wants_stream(request: &Map<String, Value>) -> bool {
    request.get("stream") == Some(&Value::Bool(true))
}

/// An error body in the shape vLLM's `ErrorResponse` has.
pub(crate) fn openai_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorInfo {
            message: message.into(),
            kind: error_type(status),
            param: None,
            code: status.as_u16(),
        },
    };
    (status, Json(body)).into_response()
}

/// The message of vLLM's `EngineDeadError` (vllm/v1/engine/exceptions.py).
pub(crate) const ENGINE_DEAD_MESSAGE: &str =
    "EngineCore encountered an issue. See stack trace (above) for the root cause.";

/// The last chunk but `[DONE]` of a chat stream whose engine died under it: vLLM's stream
/// generator catches `EngineDeadError` and sends its error as Python's `json.dumps` writes it
/// (with spaces, unlike its JSON responses).
pub(crate) fn engine_dead_chunk() -> Bytes {
    Bytes::from(format!(
        "data: {{\"error\": {{\"message\": \"{ENGINE_DEAD_MESSAGE}\", \"type\": \"InternalServerError\", \
         \"param\": null, \"code\": 500}}}}\n\n"
    ))
}

/// vLLM's answer to a generation request once its engine is dead: its engine checks
/// (`_preflight`) raise `EngineDeadError` after the model check, before anything is generated or
/// streamed, and its handler answers 500 with the error's message. The handler also tells uvicorn
/// to exit (`terminate_if_errored`), so the death linger ends here too.
pub(crate) fn engine_dead(state: &AppState) -> Option<Response> {
    if !state.stats.engine_dead.load(Ordering::SeqCst) {
        return None;
    }
    state.end_death_linger.cancel();
    Some(openai_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        ENGINE_DEAD_MESSAGE,
    ))
}

/// vLLM's answer to a request for a model it does not serve (a `model` it does not list); like
/// vLLM, it takes a missing or empty `model` for the served one.
pub(crate) fn unknown_model(state: &AppState, request: &Map<String, Value>) -> Option<Response> {
    let model = request.get("model")?.as_str()?;
    if model.is_empty() || state.served_model_names.iter().any(|name| name == model) {
        return None;
    }
    let body = ErrorBody {
        error: ErrorInfo {
            message: format!(
                "The model `{model}` does not exist. Valid aliases: {}.",
                state.served_model_names.join(", ")
            ),
            kind: "NotFoundError".to_owned(),
            param: Some("model"),
            code: StatusCode::NOT_FOUND.as_u16(),
        },
    };
    Some((StatusCode::NOT_FOUND, Json(body)).into_response())
}

/// Turns a status into the error type name vLLM would use, e.g. 503 into
/// `ServiceUnavailableError`.
pub(crate) fn error_type(status: StatusCode) -> String {
    let mut name: String = status
        .canonical_reason()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    if !name.ends_with("Error") {
        name.push_str("Error");
    }
    name
}

pub(crate) fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": "Unauthorized" })),
    )
        .into_response()
}

pub(crate) async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "detail": "Not Found" })),
    )
        .into_response()
}

pub(crate) async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "detail": "Method Not Allowed" })),
    )
        .into_response()
}

/// The request's output token limit, from the first of `names` it sets; vLLM's message for a
/// limit below 1 or one that is not a whole number, which it answers with 400.
pub(crate) fn token_limit(
    request: &Map<String, Value>,
    names: &[&str],
) -> Result<Option<usize>, String> {
    let Some(value) = names
        .iter()
        .find_map(|name| request.get(*name).filter(|value| !value.is_null()))
    else {
        return Ok(None);
    };
    match value.as_u64().map(usize::try_from) {
        Some(Ok(limit)) if limit >= 1 => Ok(Some(limit)),
        _ => Err(format!("max_tokens must be at least 1, got {value}.")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_follow_vllm_naming() {
        assert_eq!(error_type(StatusCode::BAD_REQUEST), "BadRequestError");
        assert_eq!(
            error_type(StatusCode::INTERNAL_SERVER_ERROR),
            "InternalServerError"
        );
        assert_eq!(
            error_type(StatusCode::SERVICE_UNAVAILABLE),
            "ServiceUnavailableError"
        );
    }
}
