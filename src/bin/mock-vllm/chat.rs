//! `POST /v1/chat/completions`: a synthetic completion, whole or streamed as vLLM streams it.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::middleware::X_REQUEST_ID;
use crate::openai::{
    Answer, ChatChoice, ChatChunk, ChatCompletionBody, ChatMessage, ChunkChoice, Delta, FieldError,
    Usage, admit_generation, data_event, done_event, engine_dead_ending, fields_required,
    validation_error, wants_stream,
};
use crate::state::AppState;
use crate::stream::{AbortTail, event_stream};
use crate::tokens::{ANSWER_PIECES, count_words, finish_reason};

pub(crate) async fn create_chat_completion(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
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
    // vLLM names the completion after the request's id when the client sent one.
    let id = match headers.get(X_REQUEST_ID).and_then(|id| id.to_str().ok()) {
        Some(request_id) => format!("chatcmpl-{request_id}"),
        None => format!("chatcmpl-{:016x}", state.next_id()),
    };
    let completion = ChatCompletion {
        answer: Answer::new(&state, &generation, id, count_words(messages)),
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
    pub(crate) fn whole(&self) -> ChatCompletionBody<'_> {
        let message = ChatMessage {
            role: "assistant",
            content: ANSWER_PIECES[..self.answer.pieces].concat(),
            refusal: None,
            annotations: None,
            audio: None,
            function_call: None,
            reasoning: None,
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
                finish_reason: finish_reason(self.answer.pieces),
                stop_reason: None,
                token_ids: None,
                routed_experts: None,
            }],
            service_tier: None,
            system_fingerprint: &self.answer.system_fingerprint,
            usage: Usage::counts(self.answer.prompt_tokens, self.answer.pieces).with_null_details(),
            prompt_logprobs: None,
            prompt_token_ids: None,
            prompt_text: None,
            kv_transfer_params: None,
            ec_transfer_params: None,
            metrics: None,
        }
    }

    /// As vLLM streams them: the role chunk, then a chunk per token. A token limit that cuts the
    /// answer puts `length` on its last token's chunk; a whole answer ends with an empty chunk
    /// saying `stop`, as vLLM's does when the model ends its text. Then the usage chunk when
    /// asked for, and `[DONE]`.
    pub(crate) fn chunks(&self) -> Vec<Bytes> {
        let cut = self.answer.pieces < ANSWER_PIECES.len();
        let mut chunks = vec![self.role_chunk()];
        for (index, piece) in ANSWER_PIECES[..self.answer.pieces].iter().enumerate() {
            let last = index + 1 == self.answer.pieces;
            chunks.push(self.chunk(piece, (cut && last).then_some("length")));
        }
        if !cut {
            chunks.push(self.chunk("", Some("stop")));
        }
        chunks.extend(self.after_finish(self.answer.pieces));
        chunks
    }

    /// What a stream sends instead of its rest when the server stops after `sent` chunks: vLLM
    /// aborts the request, which ends the stream with an empty chunk saying `abort`.
    pub(crate) fn abort_tail(&self, sent: usize) -> Vec<Bytes> {
        // The role chunk comes first; each later chunk before the finishing one carries one
        // piece.
        let finishing = if self.answer.pieces < ANSWER_PIECES.len() {
            self.answer.pieces
        } else {
            self.answer.pieces + 1
        };
        if sent <= finishing {
            let mut tail = vec![self.chunk("", Some("abort"))];
            tail.extend(self.after_finish(sent.saturating_sub(1)));
            tail
        } else {
            // The finishing chunk has gone out: only the usage chunk and `[DONE]` are left.
            let mut chunks = self.chunks();
            chunks.split_off(sent.min(chunks.len()))
        }
    }

    /// The usage chunk when asked for (without the `null` details, which vLLM leaves out of
    /// it), and `[DONE]`.
    fn after_finish(&self, pieces: usize) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        if self.answer.include_usage {
            chunks.push(data_event(&ChatChunk {
                usage: Some(Usage::counts(self.answer.prompt_tokens, pieces)),
                system_fingerprint: Some(&self.answer.system_fingerprint),
                ..self.frame(Vec::new())
            }));
        }
        chunks.push(done_event());
        chunks
    }

    /// The first chunk, which names the role and alone carries the prompt's fields.
    fn role_chunk(&self) -> Bytes {
        let role = ChunkChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: "",
            },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
            token_ids: None,
        };
        data_event(&ChatChunk {
            prompt_token_ids: Some(None),
            prompt_text: Some(None),
            ..self.frame(vec![role])
        })
    }

    fn chunk(&self, content: &'static str, finish_reason: Option<&'static str>) -> Bytes {
        // vLLM stamps its fingerprint on the finishing chunk, unless a usage chunk follows to
        // carry it.
        let system_fingerprint = (finish_reason.is_some() && !self.answer.include_usage)
            .then_some(self.answer.system_fingerprint.as_str());
        data_event(&ChatChunk {
            system_fingerprint,
            ..self.frame(vec![ChunkChoice::content(content, finish_reason)])
        })
    }

    /// A chunk with these choices and none of the optional fields.
    fn frame(&self, choices: Vec<ChunkChoice>) -> ChatChunk<'_> {
        ChatChunk {
            id: &self.answer.id,
            object: "chat.completion.chunk",
            created: self.answer.created,
            model: &self.answer.model,
            choices,
            usage: None,
            system_fingerprint: None,
            prompt_token_ids: None,
            prompt_text: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{event_chunk, streamed_text};

    fn completion(pieces: usize, include_usage: bool) -> ChatCompletion {
        ChatCompletion {
            answer: Answer::sample("chatcmpl-0", pieces, include_usage),
        }
    }

    #[test]
    fn a_whole_stream_ends_with_an_empty_stop_chunk_then_usage_and_done() {
        let chunks = completion(ANSWER_PIECES.len(), true).chunks();
        assert_eq!(chunks.len(), ANSWER_PIECES.len() + 4);
        assert_eq!(
            event_chunk(&chunks[0])["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert_eq!(
            streamed_text(&chunks, "/choices/0/delta/content"),
            "Hello from mock-vllm."
        );
        let stop = event_chunk(&chunks[ANSWER_PIECES.len() + 1]);
        assert_eq!(stop["choices"][0]["delta"]["content"], "");
        assert_eq!(stop["choices"][0]["finish_reason"], "stop");
        let usage = event_chunk(&chunks[ANSWER_PIECES.len() + 2]);
        assert_eq!(usage["usage"]["completion_tokens"], ANSWER_PIECES.len());
        assert_eq!(chunks.last(), Some(&done_event()));
    }

    #[test]
    fn a_cut_stream_says_length_on_its_last_token() {
        let chunks = completion(2, false).chunks();
        assert_eq!(chunks.len(), 4);
        let last = event_chunk(&chunks[2]);
        assert_eq!(last["choices"][0]["delta"]["content"], " from");
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["system_fingerprint"], "vllm-0-0");
    }

    #[test]
    fn an_abort_ends_with_an_empty_abort_chunk_and_the_usage_of_what_was_sent() {
        // The role chunk and two pieces went out.
        let tail = completion(ANSWER_PIECES.len(), true).abort_tail(3);
        let abort = event_chunk(&tail[0]);
        assert_eq!(abort["choices"][0]["finish_reason"], "abort");
        assert_eq!(abort["choices"][0]["delta"]["content"], "");
        assert_eq!(event_chunk(&tail[1])["usage"]["completion_tokens"], 2);
        assert_eq!(tail.len(), 3);
        // Once the finishing chunk went out, only what follows it is left.
        let rest = completion(2, false).abort_tail(3);
        assert_eq!(rest, vec![done_event()]);
    }
}
