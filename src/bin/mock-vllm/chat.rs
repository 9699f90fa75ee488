//! `POST /v1/chat/completions`: a synthetic completion, whole or streamed as vLLM streams it.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::openai::{
    Answer, ChatChoice, ChatChunk, ChatCompletionBody, ChatMessage, ChunkChoice, FieldError, Usage,
    admit_generation, data_event, done_event, engine_dead_ending, fields_required,
    validation_error, wants_stream,
};
use crate::state::AppState;
use crate::stream::{AbortTail, event_stream};
use crate::tokens::{ANSWER_PIECES, count_words, finish_reason};

pub(crate) async fn create_chat_completion(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Response {
    let generation = match admit_generation(
        &state,
        &body,
        check_messages,
        &["max_tokens", "max_completion_tokens"],
    )
    .await
    {
        Ok(generation) => generation,
        Err(response) => return response,
    };
    let request = &generation.request;
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let completion = ChatCompletion {
        answer: Answer::new(
            &state,
            &generation,
            format!("chatcmpl-{:016x}", state.next_id()),
            count_words(messages),
        ),
    };
    if wants_stream(request) {
        let chunks: Arc<[Bytes]> = completion.chunks().into();
        let abort: AbortTail = Arc::new(move |sent| completion.abort_tail(sent));
        event_stream(chunks, state.pacing(), Some(abort), engine_dead_ending())
    } else {
        Json(completion.whole()).into_response()
    }
}

/// A chat request needs its `messages`, a list.
fn check_messages(request: &Map<String, Value>) -> Option<Response> {
    match request.get("messages") {
        None => Some(fields_required(request, &["messages"])),
        Some(Value::Array(_)) => None,
        Some(other) => Some(validation_error(&[FieldError::not_a_list(
            "body.messages".to_owned(),
            other,
        )])),
    }
}

/// A synthetic chat completion, whole or as the chunks of its stream.
pub(crate) struct ChatCompletion {
    pub(crate) answer: Answer,
}

impl ChatCompletion {
    pub(crate) fn usage(&self, pieces: usize) -> Usage {
        Usage {
            prompt_tokens_details: Some(None),
            ..Usage::counts(self.answer.prompt_tokens, pieces)
        }
    }

    fn finish_reason(&self) -> &'static str {
        finish_reason(self.answer.pieces)
    }

    pub(crate) fn whole(&self) -> ChatCompletionBody<'_> {
        let message = ChatMessage {
            role: "assistant",
            content: ANSWER_PIECES[..self.answer.pieces].concat(),
            refusal: None,
            annotations: None,
            audio: None,
            function_call: None,
            tool_calls: Vec::new(),
            reasoning_content: None,
        };
        ChatCompletionBody {
            id: &self.answer.id,
            object: "chat.completion",
            created: self.answer.created,
            model: &self.answer.model,
            choices: vec![ChatChoice {
                index: 0,
                message,
                logprobs: None,
                finish_reason: self.finish_reason(),
                stop_reason: None,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage: self.usage(self.answer.pieces),
            prompt_logprobs: None,
            kv_transfer_params: None,
        }
    }

    /// The role chunk, one chunk per content piece, the finish chunk, the usage chunk when asked
    /// for, and `[DONE]`, as vLLM streams them.
    pub(crate) fn chunks(&self) -> Vec<Bytes> {
        let role = ChunkChoice::delta(Some("assistant"), Some(""));
        let mut chunks = vec![self.chunk(vec![role], None)];
        for piece in &ANSWER_PIECES[..self.answer.pieces] {
            chunks.push(self.chunk(vec![ChunkChoice::delta(None, Some(piece))], None));
        }
        chunks.extend(self.ending(self.answer.pieces, self.finish_reason()));
        chunks
    }

    /// What a stream sends instead of its rest when the server stops after `sent` chunks: vLLM
    /// aborts the request, which ends the stream with `finish_reason: "abort"`.
    pub(crate) fn abort_tail(&self, sent: usize) -> Vec<Bytes> {
        // The role chunk comes first; each later chunk up to the finish carries one piece.
        let pieces_sent = sent.saturating_sub(1);
        if pieces_sent <= self.answer.pieces {
            self.ending(pieces_sent, "abort")
        } else {
            // The finish chunk has gone out: only the usage chunk and `[DONE]` are left.
            self.chunks().split_off(sent.min(self.answer.pieces + 2))
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
        if self.answer.include_usage {
            chunks.push(self.chunk(Vec::new(), Some(self.usage(pieces))));
        }
        chunks.push(done_event());
        chunks
    }

    pub(crate) fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> Bytes {
        data_event(&ChatChunk {
            id: &self.answer.id,
            object: "chat.completion.chunk",
            created: self.answer.created,
            model: &self.answer.model,
            choices,
            usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_stream_ends_with_done_and_carries_the_whole_content() {
        let completion = ChatCompletion {
            answer: Answer {
                id: "chatcmpl-0".to_owned(),
                created: 0,
                model: "m".to_owned(),
                prompt_tokens: 1,
                pieces: ANSWER_PIECES.len(),
                include_usage: true,
            },
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
