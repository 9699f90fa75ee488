//! `POST /v1/responses`: replays the recorded vLLM stream or JSON response.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::openai::{FieldError, admit_generation, validation_error, wants_stream};
use crate::ordered::Json;
use crate::state::AppState;
use crate::stream::{AbortTail, DeathEnding, event_stream};

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
    let generation =
        match admit_generation(&state, &body, check_input, &["max_output_tokens"]).await {
            Ok(generation) => generation,
            Err(response) => return response,
        };
    let limit = generation.limit;
    let recording = &state.recording;
    if wants_stream(&generation.request) {
        let events = match limit.filter(|limit| *limit < recording.stream_tokens()) {
            Some(limit) => recording.stream_cut_at(limit).into(),
            None => Arc::clone(&recording.events),
        };
        let recording = Arc::clone(recording);
        let abort: AbortTail =
            Arc::new(move |sent| vec![recording.ending(sent, Ending::Cancelled)]);
        event_stream(events, state.pacing(), Some(abort), DeathEnding::Cut)
    } else {
        let body = match limit.and_then(|limit| recording.json_cut_at(limit)) {
            Some(body) => Bytes::from(body),
            None => Bytes::from_static(RESPONSES_JSON),
        };
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

/// A Responses request needs its `input`. Before pydantic checks the fields, vLLM sets
/// `tool_choice` to `none` in a request that gives no tools, so the body its error counts may
/// have one field more than the request.
fn check_input(request: &Map<String, Value>) -> Option<Response> {
    if request.contains_key("input") {
        return None;
    }
    let has_tools = request
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|tools| !tools.is_empty());
    let added = usize::from(!has_tools && !request.contains_key("tool_choice"));
    Some(validation_error(&[FieldError {
        input: format!("<dict of {} items>", request.len() + added),
        ..FieldError::missing(request, "input")
    }]))
}

/// How a shortened answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The token limit was reached: `status: "incomplete"`, `incomplete_details.reason:
    /// "max_output_tokens"`.
    Incomplete { limit: usize },
    /// The server aborted the request as it stopped: `status: "cancelled"`, as vLLM reports an
    /// aborted request.
    Cancelled,
}

/// Whether a token is reasoning or answer text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Reasoning,
    Output,
}

/// The recorded traffic, understood well enough to cut an answer short the way vLLM does. Each
/// text delta of the stream is one token; the JSON answer's tokens are its recorded usage.
pub(crate) struct Recording {
    /// The recorded stream, split into events once so that each goes out as one body chunk.
    pub(crate) events: Arc<[Bytes]>,
    /// The index in `events` of each text delta, with its channel and text.
    tokens: Vec<(usize, Channel, String)>,
    /// The `response.completed` event's data, the template of every shortened ending.
    completed: Json,
    /// The recorded JSON answer.
    json: Json,
}

impl Recording {
    pub(crate) fn parse() -> Result<Recording, String> {
        let events = split_events(RESPONSES_STREAM);
        let mut tokens = Vec::new();
        let mut completed = None;
        for (index, event) in events.iter().enumerate() {
            let data = event_data(event).ok_or_else(|| format!("event {index} has no data"))?;
            let kind = data.get("type").and_then(Json::as_str).unwrap_or_default();
            let channel = match kind {
                "response.reasoning_text.delta" => Some(Channel::Reasoning),
                "response.output_text.delta" => Some(Channel::Output),
                _ => None,
            };
            if let Some(channel) = channel {
                let delta = data.get("delta").and_then(Json::as_str).unwrap_or_default();
                tokens.push((index, channel, delta.to_owned()));
            }
            if kind == "response.completed" {
                completed = Some(data);
            }
        }
        let completed = completed.ok_or("the recorded stream has no response.completed")?;
        let json = serde_json::from_slice(RESPONSES_JSON)
            .map_err(|error| format!("the recorded JSON answer does not parse: {error}"))?;
        Ok(Recording {
            events: events.into(),
            tokens,
            completed,
            json,
        })
    }

    /// How many tokens the recorded stream's answer has.
    pub(crate) fn stream_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The recorded stream cut after its `limit`th token (fewer than it has), then ended as
    /// incomplete, with the limit echoed where vLLM echoes it.
    pub(crate) fn stream_cut_at(&self, limit: usize) -> Vec<Bytes> {
        let Some(&(last, _, _)) = self
            .tokens
            .get(limit.saturating_sub(1))
            .filter(|_| limit < self.tokens.len())
        else {
            return self.events.to_vec();
        };
        let mut events: Vec<Bytes> = self.events[..=last]
            .iter()
            .map(|event| echo_limit(event, limit))
            .collect();
        events.push(self.ending(last + 1, Ending::Incomplete { limit }));
        events
    }

    /// The `response.completed` event that ends a stream after its first `sent` events, with
    /// the output and usage of the tokens among them.
    pub(crate) fn ending(&self, sent: usize, ending: Ending) -> Bytes {
        let tokens: Vec<_> = self
            .tokens
            .iter()
            .take_while(|(index, _, _)| *index < sent)
            .collect();
        let text = |channel: Channel| -> String {
            tokens
                .iter()
                .filter(|(_, token_channel, _)| *token_channel == channel)
                .map(|(_, _, text)| text.as_str())
                .collect()
        };
        let reasoning = text(Channel::Reasoning);
        let answer = text(Channel::Output);
        let reasoning_tokens = tokens
            .iter()
            .filter(|(_, channel, _)| *channel == Channel::Reasoning)
            .count();
        let mut data = self.completed.clone();
        if let Some(response) = data.get_mut("response") {
            let mut output = Vec::new();
            for item in response
                .get("output")
                .and_then(Json::as_array)
                .unwrap_or_default()
            {
                let mut item = item.clone();
                match item.get("type").and_then(Json::as_str) {
                    Some("reasoning") if !reasoning.is_empty() => {
                        set_first_text(&mut item, &reasoning);
                        output.push(item);
                    }
                    Some("message") if !answer.is_empty() => {
                        set_first_text(&mut item, &answer);
                        item.set("status", Json::string("incomplete"));
                        output.push(item);
                    }
                    _ => {}
                }
            }
            response.set("output", Json::Array(output));
            shorten(response, ending, tokens.len(), reasoning_tokens);
        }
        data.set("sequence_number", Json::number(sent as u64));
        Bytes::from(format!(
            "event: response.completed\ndata: {}\n\n",
            data.to_json_string()
        ))
    }

    /// The recorded JSON answer ended as incomplete at `limit` tokens, or `None` when the limit
    /// does not cut it. A function call goes out only whole, so a cut answer keeps only the first
    /// `limit` words of its reasoning.
    pub(crate) fn json_cut_at(&self, limit: usize) -> Option<String> {
        let recorded = self
            .json
            .get("usage")
            .and_then(|usage| usage.get("output_tokens"))
            .and_then(Json::as_u64)?;
        if limit as u64 >= recorded {
            return None;
        }
        let mut json = self.json.clone();
        let recorded_reasoning = json
            .pointer_mut(&["usage", "output_tokens_details", "reasoning_tokens"])
            .and_then(|value| value.as_u64())
            .unwrap_or(0);
        let mut output = Vec::new();
        if let Some(mut reasoning) = json
            .get("output")
            .and_then(Json::as_array)
            .and_then(|items| {
                items
                    .iter()
                    .find(|item| item.get("type").and_then(Json::as_str) == Some("reasoning"))
            })
            .cloned()
        {
            let text = reasoning
                .pointer_mut(&["content", "0", "text"])
                .and_then(|text| text.as_str().map(str::to_owned))
                .unwrap_or_default();
            let cut: String = text.split_inclusive(' ').take(limit).collect();
            set_first_text(&mut reasoning, cut.trim_end());
            output.push(reasoning);
        }
        json.set("output", Json::Array(output));
        let reasoning_tokens = usize::try_from(recorded_reasoning)
            .unwrap_or(usize::MAX)
            .min(limit);
        shorten(
            &mut json,
            Ending::Incomplete { limit },
            limit,
            reasoning_tokens,
        );
        Some(json.to_json_string())
    }
}

/// Sets the status, the incomplete details, the echoed limit and the output usage of a response
/// cut short after `tokens` tokens.
fn shorten(response: &mut Json, ending: Ending, tokens: usize, reasoning_tokens: usize) {
    match ending {
        Ending::Incomplete { limit } => {
            response.set("status", Json::string("incomplete"));
            response.set(
                "incomplete_details",
                Json::object(&[("reason", Json::string("max_output_tokens"))]),
            );
            response.set("max_output_tokens", Json::number(limit as u64));
        }
        Ending::Cancelled => response.set("status", Json::string("cancelled")),
    }
    let Some(usage) = response.get_mut("usage") else {
        return;
    };
    let input = usage
        .get("input_tokens")
        .and_then(Json::as_u64)
        .unwrap_or(0);
    usage.set("output_tokens", Json::number(tokens as u64));
    usage.set("total_tokens", Json::number(input + tokens as u64));
    if let Some(details) = usage.get_mut("output_tokens_details") {
        details.set("reasoning_tokens", Json::number(reasoning_tokens as u64));
        details.set(
            "output_tokens_per_turn",
            Json::Array(vec![Json::number(tokens as u64)]),
        );
    }
}

/// Replaces the text of an output item's first content part.
fn set_first_text(item: &mut Json, text: &str) {
    if let Some(slot) = item.pointer_mut(&["content", "0", "text"]) {
        *slot = Json::string(text);
    }
}

/// The JSON after `data: ` in one recorded event.
fn event_data(event: &[u8]) -> Option<Json> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.lines().find_map(|line| line.strip_prefix("data: "))?;
    serde_json::from_str(data).ok()
}

/// vLLM echoes the request's limit in the response objects of `response.created` and
/// `response.in_progress`; other events go out as recorded.
fn echo_limit(event: &Bytes, limit: usize) -> Bytes {
    let Some(mut data) = event_data(event) else {
        return event.clone();
    };
    let Some(response) = data.get_mut("response") else {
        return event.clone();
    };
    response.set("max_output_tokens", Json::number(limit as u64));
    let kind = data
        .get("type")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned();
    Bytes::from(format!(
        "event: {kind}\ndata: {}\n\n",
        data.to_json_string()
    ))
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

    fn data(event: &Bytes) -> serde_json::Value {
        let text = std::str::from_utf8(event).expect("UTF-8");
        let data = text
            .lines()
            .find_map(|line| line.strip_prefix("data: "))
            .expect("a data line");
        serde_json::from_str(data).expect("JSON data")
    }

    #[test]
    fn the_recorded_stream_has_one_token_per_text_delta() {
        let recording = Recording::parse().expect("the embedded recordings parse");
        assert_eq!(recording.stream_tokens(), 128);
    }

    #[test]
    fn a_cut_stream_keeps_its_sequence_and_ends_incomplete_with_the_limits_usage() {
        let recording = Recording::parse().expect("the embedded recordings parse");
        let events = recording.stream_cut_at(3);
        for (index, event) in events.iter().enumerate() {
            assert_eq!(data(event)["sequence_number"], index);
        }
        assert_eq!(data(&events[0])["response"]["max_output_tokens"], 3);
        let last = data(events.last().expect("an ending"));
        assert_eq!(last["type"], "response.completed");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(last["response"]["usage"]["output_tokens"], 3);
        assert_eq!(
            last["response"]["output"][0]["content"][0]["text"],
            "The user:"
        );
    }

    #[test]
    fn a_limit_the_answer_fits_in_changes_nothing() {
        let recording = Recording::parse().expect("the embedded recordings parse");
        assert_eq!(recording.json_cut_at(36), None);
        assert!(recording.stream_cut_at(128) == recording.events.to_vec());
    }

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
