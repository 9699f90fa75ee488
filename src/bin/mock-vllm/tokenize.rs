//! `POST /tokenize` and `POST /detokenize`, as vLLM answers them, with the mock's stand-in
//! tokenizer (`tokens`): a token is a word, and its id is the vocabulary's. Like vLLM's, they sit
//! outside `/v1`, so no API key guards them, and they need no engine, so they answer while it is
//! dead.

use std::sync::{Arc, PoisonError};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::openai::{
    DetokenizeBody, FieldError, TokenizeBody, fields_required, openai_error, parse_json_object,
    python_input, unknown_model, validation_error,
};
use crate::state::AppState;
use crate::tokens::message_words;

/// Tokenizes a `prompt`, or chat `messages` (their text only: the mock has no chat template).
pub(crate) async fn tokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse_json_object(&body) {
        Ok(request) => request,
        Err(message) => return openai_error(StatusCode::BAD_REQUEST, message),
    };
    let words: Vec<&str> = match (request.get("prompt"), request.get("messages")) {
        (Some(Value::String(prompt)), _) => prompt.split_whitespace().collect(),
        (_, Some(Value::Array(messages))) => message_words(messages),
        // vLLM takes either form, so pydantic reports what is wrong with both.
        (prompt, messages) => {
            let prompt_error = match prompt {
                None => FieldError::missing(&request, "prompt"),
                Some(value) => FieldError::not_a_string("body.prompt".to_owned(), value),
            };
            let messages_error = match messages {
                None => FieldError::missing(&request, "messages"),
                Some(value) => FieldError::not_a_list("body.messages".to_owned(), value),
            };
            return validation_error(&[prompt_error, messages_error]);
        }
    };
    if let Some(response) = unknown_model(&state, &request) {
        return response;
    }
    let tokens: Vec<u32> = {
        let mut vocabulary = state
            .vocabulary
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        words.iter().map(|word| vocabulary.id(word)).collect()
    };
    let token_strs =
        (request.get("return_token_strs") == Some(&Value::Bool(true))).then(|| words.clone());
    Json(TokenizeBody {
        count: tokens.len(),
        max_model_len: state.max_model_len,
        tokens,
        token_strs,
    })
    .into_response()
}

/// The words of the ids `/tokenize` handed out, joined by spaces; an id it never handed out
/// gives nothing, as an id outside vLLM's vocabulary does.
pub(crate) async fn detokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse_json_object(&body) {
        Ok(request) => request,
        Err(message) => return openai_error(StatusCode::BAD_REQUEST, message),
    };
    let tokens = match request.get("tokens") {
        None => return fields_required(&request, &["tokens"]),
        Some(Value::Array(tokens)) => tokens,
        Some(other) => {
            return validation_error(&[FieldError::not_a_list("body.tokens".to_owned(), other)]);
        }
    };
    let mut ids = Vec::with_capacity(tokens.len());
    let mut errors = Vec::new();
    for (index, token) in tokens.iter().enumerate() {
        match token_id(token) {
            Ok(id) => ids.push(id),
            Err((kind, msg, ctx)) => errors.push(FieldError {
                kind,
                loc: format!("body.tokens.{index}"),
                msg,
                input: python_input(token),
                ctx,
            }),
        }
    }
    if !errors.is_empty() {
        return validation_error(&errors);
    }
    if let Some(response) = unknown_model(&state, &request) {
        return response;
    }
    let prompt = {
        let vocabulary = state
            .vocabulary
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ids.iter()
            .filter_map(|id| vocabulary.word(*id))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Json(DetokenizeBody { prompt }).into_response()
}

/// The largest id vLLM takes (`le=2**63 - 1`).
const MAX_TOKEN_ID: u64 = i64::MAX as u64;

/// pydantic's error type, message and constraint for a token id it refuses.
type TokenIdError = (&'static str, &'static str, Option<&'static str>);

/// A token id as pydantic reads it for vLLM, leniently (`2.0`, `"5"` and `true` are ids too), or
/// pydantic's error.
fn token_id(token: &Value) -> Result<u64, TokenIdError> {
    const NEGATIVE: TokenIdError = (
        "greater_than_equal",
        "Input should be greater than or equal to 0",
        Some("{'ge': 0}"),
    );
    const TOO_LARGE: TokenIdError = (
        "less_than_equal",
        "Input should be less than or equal to 9223372036854775807",
        Some("{'le': 9223372036854775807}"),
    );
    let id = match token {
        Value::Bool(flag) => i128::from(*flag),
        Value::String(text) => text.trim().parse::<i128>().map_err(|_| {
            (
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
                None,
            )
        })?,
        Value::Number(number) => match (number.as_u64(), number.as_i64(), number.as_f64()) {
            (Some(id), _, _) => i128::from(id),
            (None, Some(id), _) => i128::from(id),
            (None, None, Some(value)) if value.fract() != 0.0 => {
                return Err((
                    "int_from_float",
                    "Input should be a valid integer, got a number with a fractional part",
                    None,
                ));
            }
            (None, None, Some(value)) if value.abs() < 9.2e18 => value as i128,
            _ => {
                return Err((
                    "int_parsing_size",
                    "Unable to parse input string as an integer, exceeded maximum size",
                    None,
                ));
            }
        },
        _ => return Err(("int_type", "Input should be a valid integer", None)),
    };
    match u64::try_from(id) {
        Err(_) => Err(NEGATIVE),
        Ok(id) if id > MAX_TOKEN_ID => Err(TOO_LARGE),
        Ok(id) => Ok(id),
    }
}
