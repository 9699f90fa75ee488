//! The mock's stand-in for a tokenizer, which it does not have: a prompt's tokens are its
//! whitespace-separated words, every synthetic answer is [`ANSWER_PIECES`], one token each, and
//! token ids come from a vocabulary of the words seen so far (`/tokenize`), so that `/detokenize`
//! gives back the words it was given ids for. The usage blocks, `/tokenize` and `/detokenize`
//! all count this way, so a prompt's `/tokenize` count is the `prompt_tokens` its completion
//! reports, as with vLLM.

use std::collections::HashMap;

use serde_json::Value;

/// The pieces of the synthetic answer of `/v1/chat/completions` and `/v1/completions`, one token
/// each; joined they make its whole text.
pub(crate) const ANSWER_PIECES: &[&str] = &["Hello", " from", " mock", "-vllm", "."];

/// How many words the vocabulary holds at most, so that a stream of new words cannot grow it
/// without bound; once full, new words get [`UNKNOWN_TOKEN`].
pub(crate) const VOCABULARY_SIZE: usize = 65_536;

/// The id of every word that came after the vocabulary was full. It is no word's id, so it
/// detokenizes to nothing, as vLLM detokenizes an id outside its vocabulary.
pub(crate) const UNKNOWN_TOKEN: u32 = VOCABULARY_SIZE as u32;

/// Words and the ids handed out for them, in the order they were first seen.
#[derive(Default)]
pub(crate) struct Vocabulary {
    ids: HashMap<String, u32>,
    words: Vec<String>,
}

impl Vocabulary {
    /// The word's id, handing out the next one to a word not seen before.
    pub(crate) fn id(&mut self, word: &str) -> u32 {
        if let Some(id) = self.ids.get(word) {
            return *id;
        }
        if self.words.len() >= VOCABULARY_SIZE {
            return UNKNOWN_TOKEN;
        }
        let id = u32::try_from(self.words.len()).expect("the vocabulary is smaller than u32");
        self.words.push(word.to_owned());
        self.ids.insert(word.to_owned(), id);
        id
    }

    /// The word an id was handed out for, if any.
    pub(crate) fn word(&self, id: u64) -> Option<&str> {
        let index = usize::try_from(id).ok()?;
        self.words.get(index).map(String::as_str)
    }
}

/// How a synthetic answer of `pieces` tokens finished: `length` when the token limit cut it
/// short, as vLLM reports it.
pub(crate) fn finish_reason(pieces: usize) -> &'static str {
    if pieces < ANSWER_PIECES.len() {
        "length"
    } else {
        "stop"
    }
}

/// The words of chat messages' text, string contents and text parts alike.
pub(crate) fn message_words(messages: &[Value]) -> Vec<&str> {
    let mut words = Vec::new();
    for message in messages {
        match message.get("content") {
            Some(Value::String(text)) => words.extend(text.split_whitespace()),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        words.extend(text.split_whitespace());
                    }
                }
            }
            _ => {}
        }
    }
    words
}

/// How many tokens chat messages hold.
pub(crate) fn count_words(messages: &[Value]) -> usize {
    message_words(messages).len()
}

/// How many tokens a completion's `prompt` holds, in each of the forms vLLM takes: a text, token
/// ids, or a list of either (counted together).
pub(crate) fn prompt_tokens(prompt: &Value) -> usize {
    match prompt {
        Value::String(text) => text.split_whitespace().count(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Array(ids) => ids.len(),
                Value::Number(_) => 1,
                other => prompt_tokens(other),
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_word_keeps_its_id_and_ids_give_back_their_words() {
        let mut vocabulary = Vocabulary::default();
        let hello = vocabulary.id("Hello");
        let world = vocabulary.id("world");
        assert_ne!(hello, world);
        assert_eq!(vocabulary.id("Hello"), hello);
        assert_eq!(vocabulary.word(u64::from(world)), Some("world"));
        assert_eq!(vocabulary.word(u64::from(world) + 1), None);
    }

    #[test]
    fn a_full_vocabulary_gives_new_words_the_unknown_id() {
        let mut vocabulary = Vocabulary::default();
        for index in 0..VOCABULARY_SIZE {
            vocabulary.id(&index.to_string());
        }
        assert_eq!(vocabulary.id("0"), 0, "known words keep their ids");
        assert_eq!(vocabulary.id("new"), UNKNOWN_TOKEN);
        assert_eq!(vocabulary.word(u64::from(UNKNOWN_TOKEN)), None);
    }

    #[test]
    fn prompts_are_counted_in_every_form_vllm_takes() {
        assert_eq!(prompt_tokens(&json!("Hello  big world")), 3);
        assert_eq!(prompt_tokens(&json!(["a b", "c"])), 3);
        assert_eq!(prompt_tokens(&json!([5, 6, 7])), 3);
        assert_eq!(prompt_tokens(&json!([[5, 6], [7]])), 3);
    }

    #[test]
    fn message_words_read_string_contents_and_text_parts() {
        let messages = [
            json!({"role": "system", "content": "Be brief"}),
            json!({"role": "user", "content": [{"type": "text", "text": "Hello there"}]}),
        ];
        assert_eq!(message_words(&messages), ["Be", "brief", "Hello", "there"]);
        assert_eq!(count_words(&messages), 4);
    }
}
