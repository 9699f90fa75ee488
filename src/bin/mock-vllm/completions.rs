//! `POST /v1/completions`, the legacy completions API: the synthetic answer as a text
//! completion, whole or streamed as vLLM streams it.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::middleware::X_REQUEST_ID;
use crate::openai::{
    Answer, CompletionBody, CompletionChoice, CompletionChunk, CompletionChunkChoice, Usage,
    admit_generation, data_event, done_event, engine_dead_ending, invalid_parameter, wants_stream,
};
use crate::state::AppState;
use crate::stream::{AbortTail, event_stream};
use crate::tokens::{ANSWER_PIECES, finish_reason, prompt_tokens};

pub(crate) async fn create_completion(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let generation = match admit_generation(&state, &body, check_prompt, &["max_tokens"]).await {
        Ok(generation) => generation,
        Err(response) => return response,
    };
    let request = &generation.request;
    // vLLM names the completion after the request's id when the client sent one.
    let id = match headers.get(X_REQUEST_ID).and_then(|id| id.to_str().ok()) {
        Some(request_id) => format!("cmpl-{request_id}"),
        None => format!("cmpl-{:016x}", state.next_id()),
    };
    let completion = TextCompletion {
        answer: Answer::new(
            &state,
            &generation,
            id,
            request.get("prompt").map_or(0, prompt_tokens),
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

/// vLLM's check, made as it parses the body: a prompt that is missing, `null` or empty is refused.
fn check_prompt(request: &Map<String, Value>) -> Option<Response> {
    match request.get("prompt") {
        None | Some(Value::Null) => {}
        Some(Value::String(prompt)) if prompt.is_empty() => {}
        Some(_) => return None,
    }
    Some(invalid_parameter(
        "Either prompt or prompt_embeds must be provided and non-empty.",
        "prompt",
        None,
    ))
}

/// A synthetic text completion, whole or as the chunks of its stream.
pub(crate) struct TextCompletion {
    pub(crate) answer: Answer,
}

impl TextCompletion {
    pub(crate) fn whole(&self) -> CompletionBody<'_> {
        CompletionBody {
            id: &self.answer.id,
            object: "text_completion",
            created: self.answer.created,
            model: &self.answer.model,
            choices: vec![CompletionChoice {
                index: 0,
                text: ANSWER_PIECES[..self.answer.pieces].concat(),
                logprobs: None,
                finish_reason: finish_reason(self.answer.pieces),
                stop_reason: None,
                token_ids: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                routed_experts: None,
            }],
            service_tier: None,
            system_fingerprint: &self.answer.system_fingerprint,
            usage: Usage::counts(self.answer.prompt_tokens, self.answer.pieces).with_null_details(),
            kv_transfer_params: None,
            ec_transfer_params: None,
            metrics: None,
        }
    }

    /// As vLLM streams them: a chunk per token, with no role chunk first. A token limit that
    /// cuts the answer puts `length` on its last token's chunk; a whole answer ends with an
    /// empty chunk saying `stop`, as vLLM's does when the model ends its text. Then the usage
    /// chunk when asked for, and `[DONE]`.
    pub(crate) fn chunks(&self) -> Vec<Bytes> {
        let cut = self.answer.pieces < ANSWER_PIECES.len();
        let mut chunks: Vec<Bytes> = ANSWER_PIECES[..self.answer.pieces]
            .iter()
            .enumerate()
            .map(|(index, piece)| {
                let last = index + 1 == self.answer.pieces;
                self.chunk(piece, (cut && last).then_some("length"))
            })
            .collect();
        if !cut {
            chunks.push(self.chunk("", Some("stop")));
        }
        chunks.extend(self.after_finish(self.answer.pieces));
        chunks
    }

    /// What a stream sends instead of its rest when the server stops after `sent` chunks: vLLM
    /// aborts the request, which ends the stream with an empty chunk saying `abort`.
    pub(crate) fn abort_tail(&self, sent: usize) -> Vec<Bytes> {
        // Each chunk before the finishing one carries one piece.
        let finishing = if self.answer.pieces < ANSWER_PIECES.len() {
            self.answer.pieces - 1
        } else {
            self.answer.pieces
        };
        if sent <= finishing {
            let mut tail = vec![self.chunk("", Some("abort"))];
            tail.extend(self.after_finish(sent));
            tail
        } else {
            // The finishing chunk has gone out: only the usage chunk and `[DONE]` are left.
            let mut chunks = self.chunks();
            chunks.split_off(sent.min(chunks.len()))
        }
    }

    /// The usage chunk when asked for, and `[DONE]`.
    fn after_finish(&self, pieces: usize) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        if self.answer.include_usage {
            chunks.push(data_event(&CompletionChunk {
                id: &self.answer.id,
                object: "text_completion",
                created: self.answer.created,
                model: &self.answer.model,
                choices: Vec::new(),
                usage: Some(Usage::counts(self.answer.prompt_tokens, pieces)),
                system_fingerprint: Some(&self.answer.system_fingerprint),
            }));
        }
        chunks.push(done_event());
        chunks
    }

    fn chunk(&self, text: &str, finish_reason: Option<&'static str>) -> Bytes {
        // vLLM stamps its fingerprint on the finishing chunk, unless a usage chunk follows to
        // carry it.
        let system_fingerprint = (finish_reason.is_some() && !self.answer.include_usage)
            .then_some(self.answer.system_fingerprint.as_str());
        data_event(&CompletionChunk {
            id: &self.answer.id,
            object: "text_completion",
            created: self.answer.created,
            model: &self.answer.model,
            choices: vec![CompletionChunkChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason,
                stop_reason: None,
                prompt_token_ids: None,
                token_ids: None,
            }],
            usage: None,
            system_fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{event_chunk, streamed_text};

    fn completion(pieces: usize, include_usage: bool) -> TextCompletion {
        TextCompletion {
            answer: Answer::sample("cmpl-0", pieces, include_usage),
        }
    }

    #[test]
    fn a_whole_stream_ends_with_an_empty_stop_chunk_then_usage_and_done() {
        let chunks = completion(ANSWER_PIECES.len(), true).chunks();
        assert_eq!(chunks.len(), ANSWER_PIECES.len() + 3);
        assert_eq!(
            streamed_text(&chunks, "/choices/0/text"),
            "Hello from mock-vllm."
        );
        let stop = event_chunk(&chunks[ANSWER_PIECES.len()]);
        assert_eq!(stop["choices"][0]["text"], "");
        assert_eq!(stop["choices"][0]["finish_reason"], "stop");
        let usage = event_chunk(&chunks[ANSWER_PIECES.len() + 1]);
        assert_eq!(usage["usage"]["completion_tokens"], ANSWER_PIECES.len());
        assert_eq!(chunks.last(), Some(&done_event()));
    }

    #[test]
    fn a_cut_stream_says_length_on_its_last_token() {
        let chunks = completion(2, false).chunks();
        assert_eq!(chunks.len(), 3);
        let last = event_chunk(&chunks[1]);
        assert_eq!(last["choices"][0]["text"], " from");
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["system_fingerprint"], "vllm-0-0");
    }

    #[test]
    fn an_abort_ends_with_an_empty_abort_chunk_and_the_usage_of_what_was_sent() {
        let tail = completion(ANSWER_PIECES.len(), true).abort_tail(2);
        let abort = event_chunk(&tail[0]);
        assert_eq!(abort["choices"][0]["finish_reason"], "abort");
        assert_eq!(abort["choices"][0]["text"], "");
        assert_eq!(event_chunk(&tail[1])["usage"]["completion_tokens"], 2);
        assert_eq!(tail.len(), 3);
        // Once the finishing chunk went out, only what follows it is left.
        let rest = completion(2, false).abort_tail(2);
        assert_eq!(rest, vec![done_event()]);
    }
}
