//! `POST /v1/chat/completions`: a synthetic completion, whole or streamed as vLLM streams it.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::openai::{
    ChatChoice, ChatChunk, ChatCompletionBody, ChatMessage, ChunkChoice, Usage, engine_dead,
    engine_dead_chunk, generation_preamble, openai_error, parse_json_object, token_limit,
    unknown_model, wants_stream,
};
use crate::state::{AppState, unix_now};
use crate::stream::{AbortTail, DeathEnding, event_stream};

/// The pieces the synthetic chat completion streams; joined they make its whole content.
pub(crate) const CHAT_PIECES: &[&str] = &["Hello", " from", " mock", "-vllm", "."];

pub(crate) async fn create_chat_completion(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Response {
    if let Some(response) = generation_preamble(&state).await {
        return response;
    }
    let request = match parse_json_object(&body) {
        Ok(request) => request,
        Err(message) => return openai_error(StatusCode::BAD_REQUEST, message),
    };
    if let Some(response) = unknown_model(&state, &request) {
        return response;
    }
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return openai_error(StatusCode::BAD_REQUEST, "Field required: messages");
    };
    if let Some(response) = engine_dead(&state) {
        return response;
    }
    let limit = match token_limit(&request, &["max_tokens", "max_completion_tokens"]) {
        Ok(limit) => limit,
        Err(message) => return openai_error(StatusCode::BAD_REQUEST, message),
    };
    let pieces = limit.map_or(CHAT_PIECES.len(), |limit| limit.min(CHAT_PIECES.len()));
    let include_usage = request
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        == Some(&Value::Bool(true));
    let completion = ChatCompletion {
        id: format!("chatcmpl-{:016x}", state.next_id()),
        created: unix_now(),
        // vLLM reports its first served name, whichever one the request used.
        model: state.served_model().to_owned(),
        prompt_tokens: count_words(messages),
        pieces,
        include_usage,
    };
    if wants_stream(&request) {
        let chunks: Arc<[Bytes]> = completion.chunks().into();
        let abort: AbortTail = Arc::new(move |sent| completion.abort_tail(sent));
        let death = DeathEnding::Tail(Arc::from([
            engine_dead_chunk(),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ]));
        event_stream(chunks, state.pacing(), Some(abort), death)
    } else {
        Json(completion.whole()).into_response()
    }
}

/// The parts of a synthetic chat completion that its whole and streamed forms share.
pub(crate) struct ChatCompletion {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) prompt_tokens: usize,
    /// How many of `CHAT_PIECES` (one token each) the answer holds: fewer than all of them when
    /// the request's token limit cuts it short.
    pub(crate) pieces: usize,
    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    pub(crate) include_usage: bool,
}

impl ChatCompletion {
    pub(crate) fn usage(&self, pieces: usize) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            total_tokens: self.prompt_tokens + pieces,
            completion_tokens: pieces,
            prompt_tokens_details: None,
        }
    }

    /// `length` when the token limit cut the answer short, as vLLM reports it.
    fn finish_reason(&self) -> &'static str {
        if self.pieces < CHAT_PIECES.len() {
            "length"
        } else {
            "stop"
        }
    }

    pub(crate) fn whole(&self) -> ChatCompletionBody<'_> {
        let message = ChatMessage {
            role: "assistant",
            content: CHAT_PIECES[..self.pieces].concat(),
            refusal: None,
            annotations: None,
            audio: None,
            function_call: None,
            tool_calls: Vec::new(),
            reasoning_content: None,
        };
        ChatCompletionBody {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: vec![ChatChoice {
                index: 0,
                message,
                logprobs: None,
                finish_reason: self.finish_reason(),
                stop_reason: None,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage: self.usage(self.pieces),
            prompt_logprobs: None,
            kv_transfer_params: None,
        }
    }

    /// The role chunk, one chunk per content piece, the finish chunk, the usage chunk when asked
    /// for, and `[DONE]`, as vLLM streams them.
    pub(crate) fn chunks(&self) -> Vec<Bytes> {
        let role = ChunkChoice::delta(Some("assistant"), Some(""));
        let mut chunks = vec![self.chunk(vec![role], None)];
        for piece in &CHAT_PIECES[..self.pieces] {
            chunks.push(self.chunk(vec![ChunkChoice::delta(None, Some(piece))], None));
        }
        chunks.extend(self.ending(self.pieces, self.finish_reason()));
        chunks
    }

    /// What a stream sends instead of its rest when the server stops after `sent` chunks: vLLM
    /// aborts the request, which ends the stream with `finish_reason: "abort"`.
    pub(crate) fn abort_tail(&self, sent: usize) -> Vec<Bytes> {
        // The role chunk comes first; each later chunk up to the finish carries one piece.
        let pieces_sent = sent.saturating_sub(1);
        if pieces_sent <= self.pieces {
            self.ending(pieces_sent, "abort")
        } else {
            // The finish chunk has gone out: only the usage chunk and `[DONE]` are left.
            self.chunks().split_off(sent.min(self.pieces + 2))
        }
    }

    /// The finish chunk, the usage chunk when asked for, and `[DONE]`.
    fn ending(&self, pieces: usize, finish_reason: &'static str) -> Vec<Bytes> {
        let finish = ChunkChoice {
            finish_reason: Some(finish_reason),
            stop_reason: Some(None),
            ..ChunkChoice::delta(None, None)
        };
        let mut chunks = vec![self.chunk(vec![finish], None)];
        if self.include_usage {
            chunks.push(self.chunk(Vec::new(), Some(self.usage(pieces))));
        }
        chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
        chunks
    }

    pub(crate) fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> Bytes {
        let chunk = ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        let json = serde_json::to_string(&chunk)
            .expect("a chunk has only string keys and plain values, so it always serializes");
        Bytes::from(format!("data: {json}\n\n"))
    }
}

/// A rough prompt size for the usage block: the words in the messages' text.
pub(crate) fn count_words(messages: &[Value]) -> usize {
    messages
        .iter()
        .map(|message| match message.get("content") {
            Some(Value::String(text)) => text.split_whitespace().count(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .map(|text| text.split_whitespace().count())
                .sum(),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_stream_ends_with_done_and_carries_the_whole_content() {
        let completion = ChatCompletion {
            id: "chatcmpl-0".to_owned(),
            created: 0,
            model: "m".to_owned(),
            prompt_tokens: 1,
            pieces: CHAT_PIECES.len(),
            include_usage: true,
        };
        let chunks = completion.chunks();
        assert_eq!(
            chunks.last().map(|chunk| &chunk[..]),
            Some(&b"data: [DONE]\n\n"[..])
        );
        let content: String = chunks[..chunks.len() - 1]
            .iter()
            .map(|chunk| {
                let json: Value = serde_json::from_slice(&chunk[6..]).expect("chunks are JSON");
                json["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        assert_eq!(content, "Hello from mock-vllm.");
    }
}
