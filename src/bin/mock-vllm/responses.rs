//! `POST /v1/responses`: replays the recorded vLLM stream or JSON response.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::openai::{
    generation_preamble, openai_error, parse_json_object, unknown_model, wants_stream,
};
use crate::state::AppState;
use crate::stream::event_stream;

/// The stream recorded from vLLM answering `/v1/responses` with `"stream": true`.
pub(crate) static RESPONSES_STREAM: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vllm-responses-stream-gpt-oss-20b.sse"
));

/// The response recorded from vLLM answering `/v1/responses` with a tool call.
pub(crate) static RESPONSES_JSON: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vllm-responses-toolcall-gpt-oss-20b.json"
));

pub(crate) async fn create_response(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    if let Some(response) = generation_preamble(&state).await {
        return response;
    }
    let request = match parse_json_object(&body) {
        Ok(request) => request,
        Err(message) => return openai_error(StatusCode::BAD_REQUEST, message),
    };
    if !request.contains_key("input") {
        return openai_error(StatusCode::BAD_REQUEST, "Field required: input");
    }
    if let Some(response) = unknown_model(&state, &request) {
        return response;
    }
    if wants_stream(&request) {
        event_stream(Arc::clone(&state.responses_events), state.pacing())
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Bytes::from_static(RESPONSES_JSON),
        )
            .into_response()
    }
}

/// Splits a recorded stream into its events, each keeping its blank-line terminator, so that the
/// events concatenated are the recording byte for byte.
pub(crate) fn split_events(recording: &'static [u8]) -> Vec<Bytes> {
    let recording = Bytes::from_static(recording);
    let mut events = Vec::new();
    let mut start = 0;
    while start < recording.len() {
        let end = recording[start..]
            .windows(2)
            .position(|pair| pair == b"\n\n")
            .map_or(recording.len(), |offset| start + offset + 2);
        events.push(recording.slice(start..end));
        start = end;
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_stream_splits_into_events_that_concatenate_to_it() {
        let events = split_events(RESPONSES_STREAM);
        assert_eq!(events.concat(), RESPONSES_STREAM);
        assert!(events.len() > 100);
        assert!(
            events
                .iter()
                .all(|event| event.starts_with(b"event: ") && event.ends_with(b"\n\n"))
        );
    }
}
