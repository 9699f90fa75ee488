//! vLLM's wire formats (declared in vLLM's field order, which serde keeps and a JSON map would
//! sort), its error bodies, and the request checks the generation endpoints share.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::sleep;

use crate::state::{AppState, unix_now};
use crate::stream::DeathEnding;
use crate::tokens::ANSWER_PIECES;

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
    /// The request field at fault, which vLLM names for an unknown model and for a request it
    /// finds invalid.
    pub(crate) param: Option<String>,
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

/// vLLM's `UsageInfo`. Its details are `null` in JSON answers and left out of a stream's usage
/// chunk, which vLLM writes without its null fields; hence the double options.
#[derive(Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: usize,
    pub(crate) total_tokens: usize,
    pub(crate) completion_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prompt_tokens_details: Option<Null>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) completion_tokens_details: Option<Null>,
}

/// vLLM's `ChatCompletionResponse`, the JSON answer of `/v1/chat/completions`.
#[derive(Serialize)]
pub(crate) struct ChatCompletionBody<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: Vec<ChatChoice>,
    pub(crate) service_tier: Null,
    pub(crate) system_fingerprint: &'a str,
    pub(crate) usage: Usage,
    pub(crate) prompt_logprobs: Null,
    pub(crate) prompt_token_ids: Null,
    pub(crate) prompt_text: Null,
    pub(crate) kv_transfer_params: Null,
    pub(crate) ec_transfer_params: Null,
    pub(crate) metrics: Null,
}

#[derive(Serialize)]
pub(crate) struct ChatChoice {
    pub(crate) index: u32,
    pub(crate) message: ChatMessage,
    pub(crate) logprobs: Null,
    pub(crate) finish_reason: &'static str,
    pub(crate) stop_reason: Null,
    pub(crate) token_ids: Null,
    pub(crate) routed_experts: Null,
}

/// vLLM's `ChatMessage`, which leaves out `tool_calls` when there are none.
#[derive(Serialize)]
pub(crate) struct ChatMessage {
    pub(crate) role: &'static str,
    pub(crate) content: String,
    pub(crate) refusal: Null,
    pub(crate) annotations: Null,
    pub(crate) audio: Null,
    pub(crate) function_call: Null,
    pub(crate) reasoning: Null,
}

/// vLLM's `ChatCompletionStreamResponse`, one chunk of a `/v1/chat/completions` stream, which
/// vLLM writes with only the fields it set; hence the options left out when `None`.
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
    /// Only the last chunk has it: the finishing chunk, or the usage chunk when one follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) system_fingerprint: Option<&'a str>,
    /// Only the role chunk has it, `null`, hence the double option.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prompt_token_ids: Option<Null>,
    /// Only the role chunk has it, `null`, hence the double option.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prompt_text: Option<Null>,
}

/// One choice of a chat chunk. vLLM sends `"stop_reason": null` on the finishing chunk only, and
/// `"token_ids": null` on every chunk but the role chunk; hence the double options.
#[derive(Serialize)]
pub(crate) struct ChunkChoice {
    pub(crate) index: u32,
    pub(crate) delta: Delta,
    pub(crate) logprobs: Null,
    pub(crate) finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stop_reason: Option<Null>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) token_ids: Option<Null>,
}

#[derive(Serialize)]
pub(crate) struct Delta {
    /// Only the role chunk has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    pub(crate) content: &'static str,
}

/// vLLM's `CompletionResponse`, the JSON answer of `/v1/completions`.
#[derive(Serialize)]
pub(crate) struct CompletionBody<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: Vec<CompletionChoice>,
    pub(crate) service_tier: Null,
    pub(crate) system_fingerprint: &'a str,
    pub(crate) usage: Usage,
    pub(crate) kv_transfer_params: Null,
    pub(crate) ec_transfer_params: Null,
    pub(crate) metrics: Null,
}

#[derive(Serialize)]
pub(crate) struct CompletionChoice {
    pub(crate) index: u32,
    pub(crate) text: String,
    pub(crate) logprobs: Null,
    pub(crate) finish_reason: &'static str,
    pub(crate) stop_reason: Null,
    pub(crate) token_ids: Null,
    pub(crate) prompt_logprobs: Null,
    pub(crate) prompt_token_ids: Null,
    pub(crate) routed_experts: Null,
}

/// vLLM's `CompletionStreamResponse`, one chunk of a `/v1/completions` stream.
#[derive(Serialize)]
pub(crate) struct CompletionChunk<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: Vec<CompletionChunkChoice<'a>>,
    /// Only the usage chunk that `stream_options.include_usage` asks for has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Usage>,
    /// Only the last chunk has it: the finishing chunk, or the usage chunk when one follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) system_fingerprint: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct CompletionChunkChoice<'a> {
    pub(crate) index: u32,
    pub(crate) text: &'a str,
    pub(crate) logprobs: Null,
    pub(crate) finish_reason: Option<&'static str>,
    pub(crate) stop_reason: Null,
    pub(crate) prompt_token_ids: Null,
    pub(crate) token_ids: Null,
}

/// vLLM's `TokenizeResponse`.
#[derive(Serialize)]
pub(crate) struct TokenizeBody<'a> {
    pub(crate) count: usize,
    pub(crate) max_model_len: u64,
    pub(crate) tokens: Vec<u32>,
    /// The tokens' text, when the request sets `return_token_strs`.
    pub(crate) token_strs: Option<Vec<&'a str>>,
}

/// vLLM's `DetokenizeResponse`.
#[derive(Serialize)]
pub(crate) struct DetokenizeBody {
    pub(crate) prompt: String,
}

/// A generation request that passed vLLM's checks.
pub(crate) struct Generation {
    pub(crate) request: Map<String, Value>,
    /// The request's output token limit, when it sets one.
    pub(crate) limit: Option<usize>,
}

/// The synthetic answer to a chat or text completion request, whichever body it goes out in.
pub(crate) struct Answer {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) prompt_tokens: usize,
    /// How many of `ANSWER_PIECES` (one token each) the answer holds: fewer than all of them
    /// when the request's token limit cuts it short.
    pub(crate) pieces: usize,
    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    pub(crate) include_usage: bool,
    /// vLLM's fingerprint of its configuration, on the body and on a stream's last chunk.
    pub(crate) system_fingerprint: String,
}

impl Answer {
    /// The answer to `generation`, named `id`, its prompt counted as `prompt_tokens`.
    pub(crate) fn new(
        state: &AppState,
        generation: &Generation,
        id: String,
        prompt_tokens: usize,
    ) -> Answer {
        Answer {
            id,
            created: unix_now(),
            // vLLM reports its first served name, whichever one the request used.
            model: state.served_model().to_owned(),
            prompt_tokens,
            pieces: generation
                .limit
                .map_or(ANSWER_PIECES.len(), |limit| limit.min(ANSWER_PIECES.len())),
            include_usage: include_usage(&generation.request),
            system_fingerprint: state.system_fingerprint.clone(),
        }
    }

    /// An answer of `pieces` for the unit tests of its forms.
    #[cfg(test)]
    pub(crate) fn sample(id: &str, pieces: usize, include_usage: bool) -> Answer {
        Answer {
            id: id.to_owned(),
            created: 0,
            model: "m".to_owned(),
            prompt_tokens: 1,
            pieces,
            include_usage,
            system_fingerprint: "vllm-0-0".to_owned(),
        }
    }
}

/// One error of pydantic's validation of a request body.
pub(crate) struct FieldError {
    pub(crate) kind: &'static str,
    /// Where in the request: `body.<field>`, and an index into a list.
    pub(crate) loc: String,
    pub(crate) msg: &'static str,
    /// The input at fault as vLLM quotes it: the value, or `<dict of N items>` for a missing field.
    pub(crate) input: String,
    /// The constraint broken, in Python's repr (`{'ge': 0}`), when there is one.
    pub(crate) ctx: Option<&'static str>,
}

impl Usage {
    /// The counts alone, as a stream's usage chunk carries them.
    pub(crate) fn counts(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        }
    }

    /// With the `null` details a JSON answer carries.
    pub(crate) fn with_null_details(self) -> Self {
        Usage {
            prompt_tokens_details: Some(None),
            completion_tokens_details: Some(None),
            ..self
        }
    }
}

impl ChunkChoice {
    /// A choice carrying `content`, as every chunk after the role chunk has it.
    pub(crate) fn content(content: &'static str, finish_reason: Option<&'static str>) -> Self {
        ChunkChoice {
            index: 0,
            delta: Delta {
                role: None,
                content,
            },
            logprobs: None,
            finish_reason,
            stop_reason: finish_reason.map(|_| None),
            token_ids: Some(None),
        }
    }
}

impl FieldError {
    /// pydantic's error for a required field the body lacks.
    pub(crate) fn missing(request: &Map<String, Value>, field: &str) -> Self {
        FieldError {
            kind: "missing",
            loc: format!("body.{field}"),
            msg: "Field required",
            input: format!("<dict of {} items>", request.len()),
            ctx: None,
        }
    }

    /// pydantic's error for a field that is not a list.
    pub(crate) fn not_a_list(loc: String, value: &Value) -> Self {
        FieldError {
            kind: "list_type",
            loc,
            msg: "Input should be a valid list",
            input: python_input(value),
            ctx: None,
        }
    }

    /// pydantic's error for a field that is not a string.
    pub(crate) fn not_a_string(loc: String, value: &Value) -> Self {
        FieldError {
            kind: "string_type",
            loc,
            msg: "Input should be a valid string",
            input: python_input(value),
            ctx: None,
        }
    }
}

/// The checks of a generation request, which every generation endpoint makes in vLLM's order:
/// the knobs' headers delay and forced failure; the body, a JSON object whose fields the
/// endpoint's `validate` checks (vLLM checks them as it parses the body); the model; the engine;
/// then the output token limit, the first of `limit_names` the request sets.
pub(crate) async fn admit_generation(
    state: &AppState,
    body: &[u8],
    validate: fn(&Map<String, Value>) -> Option<Response>,
    limit_names: &[&str],
) -> Result<Generation, Response> {
    if !state.knobs.headers_delay.is_zero() {
        sleep(state.knobs.headers_delay).await;
    }
    if let Some(status) = state.knobs.fail_status {
        return Err(openai_error(status, "mock failure"));
    }
    let request = parse_json_object(body)
        .map_err(|message| openai_error(StatusCode::BAD_REQUEST, message))?;
    if let Some(response) = validate(&request) {
        return Err(response);
    }
    if let Some(response) = unknown_model(state, &request) {
        return Err(response);
    }
    if let Some(response) = engine_dead(state) {
        return Err(response);
    }
    match token_limit(&request, limit_names) {
        Ok(limit) => Ok(Generation { request, limit }),
        Err(value) => Err(bad_token_limit(value)),
    }
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

/// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
pub(crate) fn include_usage(request: &Map<String, Value>) -> bool {
    request
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        == Some(&Value::Bool(true))
}

/// An error body in the shape vLLM's `ErrorResponse` has.
pub(crate) fn openai_error(status: StatusCode, message: impl Into<String>) -> Response {
    error_response(status, error_type(status), message.into(), None)
}

/// vLLM's answer to a `VLLMValidationError`: 400 naming the parameter at fault, which the
/// message repeats with the value refused, as Python's `str` of the error writes them.
pub(crate) fn invalid_parameter(message: &str, param: &str, value: Option<&Value>) -> Response {
    let extras = match value {
        Some(value) => format!("parameter={param}, value={value}"),
        None => format!("parameter={param}"),
    };
    error_response(
        StatusCode::BAD_REQUEST,
        error_type(StatusCode::BAD_REQUEST),
        format!("{message} ({extras})"),
        Some(param.to_owned()),
    )
}

/// vLLM's 400 for a body that does not validate ([`bad_request`]): pydantic's errors in Python's
/// repr, and the first error's location as the parameter.
pub(crate) fn validation_error(errors: &[FieldError]) -> Response {
    let plural = if errors.len() == 1 { "" } else { "s" };
    let mut message = format!("{} validation error{plural}:", errors.len());
    for error in errors {
        message.push_str(&format!(
            "\n  {{'type': '{}', 'loc': '{}', 'msg': '{}', 'input': '{}'",
            error.kind, error.loc, error.msg, error.input
        ));
        if let Some(ctx) = error.ctx {
            message.push_str(&format!(", 'ctx': {ctx}"));
        }
        message.push('}');
    }
    bad_request(message, errors.first().map(|error| error.loc.clone()))
}

/// What vLLM's check of a JSON endpoint's content type (`validate_json_request`) raises, which its
/// validation handler reports as it reports pydantic's errors, here with no field to name.
const UNSUPPORTED_MEDIA_TYPE: &str =
    "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed";

/// vLLM's 400 for a body labelled as anything but `application/json`.
pub(crate) fn unsupported_media_type() -> Response {
    bad_request(UNSUPPORTED_MEDIA_TYPE.to_owned(), None)
}

/// vLLM's 400 for a request its validation refused, the type named by the status's phrase (`Bad
/// Request`, not an error class).
fn bad_request(message: String, param: Option<String>) -> Response {
    let status = StatusCode::BAD_REQUEST;
    error_response(
        status,
        status.canonical_reason().unwrap_or("").to_owned(),
        message,
        param,
    )
}

/// pydantic's error for required `fields` that the body lacks, as vLLM answers it.
pub(crate) fn fields_required(request: &Map<String, Value>, fields: &[&str]) -> Response {
    let errors: Vec<FieldError> = fields
        .iter()
        .map(|field| FieldError::missing(request, field))
        .collect();
    validation_error(&errors)
}

/// A value as vLLM quotes it in a validation error: Python's `str` of a plain value, and only
/// the size of a list or an object.
pub(crate) fn python_input(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(number) => number.to_string(),
        Value::String(text) => text.clone(),
        Value::Array(items) => format!("<list of {} items>", items.len()),
        Value::Object(fields) => format!("<dict of {} items>", fields.len()),
    }
}

fn error_response(
    status: StatusCode,
    kind: String,
    message: String,
    param: Option<String>,
) -> Response {
    let body = ErrorBody {
        error: ErrorInfo {
            message,
            kind,
            param,
            code: status.as_u16(),
        },
    };
    (status, Json(body)).into_response()
}

/// The message of vLLM's `EngineDeadError` (vllm/v1/engine/exceptions.py).
pub(crate) const ENGINE_DEAD_MESSAGE: &str =
    "EngineCore encountered an issue. See stack trace (above) for the root cause.";

/// The last chunk but `[DONE]` of a chat or completions stream whose engine died under it:
/// vLLM's stream generators catch `EngineDeadError` and send its error as Python's `json.dumps`
/// writes it (with spaces, unlike its JSON responses).
pub(crate) fn engine_dead_chunk() -> Bytes {
    Bytes::from(format!(
        "data: {{\"error\": {{\"message\": \"{ENGINE_DEAD_MESSAGE}\", \"type\": \"InternalServerError\", \
         \"param\": null, \"code\": 500}}}}\n\n"
    ))
}

/// How a chat or completions stream ends when the engine dies under it: vLLM's error chunk, then
/// `[DONE]`.
pub(crate) fn engine_dead_ending() -> DeathEnding {
    DeathEnding::Tail(Arc::from([engine_dead_chunk(), done_event()]))
}

/// The event that ends a chat or completions stream.
pub(crate) fn done_event() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// One `data:` event of a chat or completions stream.
pub(crate) fn data_event(chunk: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(chunk)
        .expect("a chunk has only string keys and plain values, so it always serializes");
    Bytes::from(format!("data: {json}\n\n"))
}

/// The chunk a [`data_event`] carries, for the unit tests of the streams.
#[cfg(test)]
pub(crate) fn event_chunk(event: &Bytes) -> Value {
    serde_json::from_slice(&event[b"data: ".len()..]).expect("chunks are JSON")
}

/// The strings at `pointer` in the chunks of a stream's events, joined: the text a stream carries.
#[cfg(test)]
pub(crate) fn streamed_text(events: &[Bytes], pointer: &str) -> String {
    events
        .iter()
        .filter(|event| event[..] != done_event()[..])
        .filter_map(|event| {
            event_chunk(event)
                .pointer(pointer)?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
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
    Some(error_response(
        StatusCode::NOT_FOUND,
        "NotFoundError".to_owned(),
        format!(
            "The model `{model}` does not exist. Valid aliases: {}.",
            state.served_model_names.join(", ")
        ),
        Some("model".to_owned()),
    ))
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

/// FastAPI's 405 for a route that serves only GET, which lists GET alone in `allow` (where axum
/// would add HEAD).
pub(crate) async fn only_get_allowed() -> Response {
    let mut response = method_not_allowed().await;
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    response
}

/// The request's output token limit, from the first of `names` it sets, or the value refused: a
/// limit below 1 or one that is not a whole number.
pub(crate) fn token_limit<'a>(
    request: &'a Map<String, Value>,
    names: &[&str],
) -> Result<Option<usize>, &'a Value> {
    let Some(value) = names
        .iter()
        .find_map(|name| request.get(*name).filter(|value| !value.is_null()))
    else {
        return Ok(None);
    };
    match value.as_u64().map(usize::try_from) {
        Some(Ok(limit)) if limit >= 1 => Ok(Some(limit)),
        _ => Err(value),
    }
}

/// vLLM's 400 for a refused token limit, which names it `max_tokens` whatever the endpoint calls
/// it, as vLLM's sampling parameters do.
pub(crate) fn bad_token_limit(value: &Value) -> Response {
    invalid_parameter(
        &format!("max_tokens must be at least 1, got {value}."),
        "max_tokens",
        Some(value),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(response: Response) -> String {
        let bytes = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
            response.into_body(),
            usize::MAX,
        ))
        .expect("a JSON body is ready at once")
        .expect("a JSON body reads");
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    /// As vLLM 0.32 answered `{"model":"tiny"}` on `/tokenize` and `/v1/chat/completions`.
    #[test]
    fn missing_fields_are_reported_as_vllm_reports_pydantics_errors() {
        let request = Map::from_iter([("model".to_owned(), Value::from("tiny"))]);
        let response = fields_required(&request, &["prompt", "messages"]);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body(response),
            r#"{"error":{"message":"2 validation errors:\n  {'type': 'missing', 'loc': 'body.prompt', 'msg': 'Field required', 'input': '<dict of 1 items>'}\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}","type":"Bad Request","param":"body.prompt","code":400}}"#
        );
        assert_eq!(
            body(fields_required(&request, &["messages"])),
            r#"{"error":{"message":"1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}","type":"Bad Request","param":"body.messages","code":400}}"#
        );
    }

    /// As vLLM 0.32 answered `"max_tokens": 0` on `/v1/completions`.
    #[test]
    fn a_token_limit_below_one_is_vllms_validation_error() {
        let request = Map::from_iter([("max_tokens".to_owned(), Value::from(0))]);
        let refused = token_limit(&request, &["max_tokens"]).expect_err("refused");
        assert_eq!(
            body(bad_token_limit(refused)),
            r#"{"error":{"message":"max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)","type":"BadRequestError","param":"max_tokens","code":400}}"#
        );
    }

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
