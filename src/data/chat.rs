//! Conversations to tokens and a loss mask, without `{% generation %}` markers (few templates
//! have them, and trainers that rely on them get all-zero masks from the rest). The conversation
//! is rendered whole, as transformers' `apply_chat_template` renders it (those are the tokens),
//! and each assistant turn is found in that text by rendering the conversation before it with
//! the generation prompt: the turn begins where that prefix ends (its header excluded) and ends
//! with the template's end-of-turn text (included). Both the end-of-turn text and any block the
//! template inserts before an answer (Qwen3's empty `<think>\n\n</think>\n\n`) are learnt once
//! from a probe conversation; an inserted empty block is not trained.
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;
use serde_json::{json, Value};

/// Which tokens of a conversation are trained (`data prepare --train-on`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainOn {
    /// Every assistant turn: its answer and end-of-turn token, not its header.
    #[default]
    Assistant,
    /// The last assistant turn only (earlier turns are context).
    LastAssistant,
    /// Every token (no mask is recorded).
    All,
}

/// A conversation's tokens and, unless every token is trained, its loss mask (1 = trained).
#[derive(Clone, Debug, PartialEq)]
pub struct ChatSample {
    pub tokens: Vec<i32>,
    pub mask: Option<Vec<u8>>,
}

/// A template and its tokenizer, with what the probe conversation showed about the template.
pub struct ChatRenderer<'a> {
    template: &'a ChatTemplate,
    tokenizer: &'a TextTokenizer,
    /// Text the template puts between an assistant header and the answer when the message has
    /// none of its own (Qwen3's empty think block); empty for most templates.
    inserted: String,
    /// Text that ends an assistant turn (`<|im_end|>`, `<|eot_id|>`); empty: the template ends
    /// a turn with nothing of its own.
    turn_end: String,
}

const PROBE_QUESTION: &str = "ulysses probe question";
const PROBE_ANSWER: &str = "ulysses probe answer";

impl<'a> ChatRenderer<'a> {
    /// Probes `template` with one user and one assistant message.
    pub fn new(template: &'a ChatTemplate, tokenizer: &'a TextTokenizer) -> Result<ChatRenderer<'a>, String> {
        let probe =
            json!([{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_ANSWER}]);
        let fail = |e: String| format!("cannot probe the chat template with a user and an assistant message ({e})");
        let prompt = template.render(&json!([probe[0]]), true).map_err(fail)?;
        let whole = template.render(&probe, false).map_err(fail)?;
        let turn = whole.strip_prefix(&prompt).ok_or_else(|| {
            fail("the conversation does not begin with its first message rendered with the generation prompt".into())
        })?;
        let at = turn.find(PROBE_ANSWER).ok_or_else(|| fail("the assistant's answer does not appear in it".into()))?;
        let inserted = turn[..at].to_string();
        let after = &turn[at + PROBE_ANSWER.len()..];
        // The end of a turn is its first token when the tokenizer has it as one added token
        // (`<|im_end|>`, `<|eot_id|>`, `</s>`), else the text up to the line's end.
        let (ids, offsets) = tokenizer.encode_with_offsets(after).map_err(|e| fail(e.to_string()))?;
        let turn_end = match (ids.first(), offsets.first()) {
            (Some(&id), Some(&(s, e))) if tokenizer.is_added_token(id) => after[s..e].to_string(),
            _ => after.trim_end().to_string(),
        };
        Ok(ChatRenderer { template, tokenizer, inserted, turn_end })
    }

    /// Tokens and mask of `messages` (a list of {role, content, ...}); an error is a message
    /// naming the message at fault where there is one.
    pub fn sample(&self, messages: &Value, train_on: TrainOn) -> Result<ChatSample, String> {
        let list = check_messages(messages)?;
        let text = self.template.render(messages, false).map_err(|e| format!("the chat template failed: {e}"))?;
        let (tokens, offsets) = self.tokenizer.encode_with_offsets(&text).map_err(|e| e.to_string())?;
        if train_on == TrainOn::All {
            return Ok(ChatSample { tokens, mask: None });
        }
        let assistant: Vec<usize> = (0..list.len()).filter(|&k| list[k]["role"] == "assistant").collect();
        let turns = match train_on {
            TrainOn::LastAssistant => &assistant[assistant.len().saturating_sub(1)..],
            _ => &assistant[..],
        };
        if turns.is_empty() {
            return Err(
                "has no message with role \"assistant\" to train on (use --train-on all to train on every token)"
                    .into(),
            );
        }
        let mut mask = vec![0u8; tokens.len()];
        for &k in turns {
            let (start, end) = self.turn_span(list, k, &text)?;
            for (m, &(s, _)) in mask.iter_mut().zip(&offsets) {
                if (start..end).contains(&s) {
                    *m = 1;
                }
            }
        }
        Ok(ChatSample { tokens, mask: Some(mask) })
    }

    /// Byte range of assistant message `k`'s turn in the rendered conversation `text`: from the
    /// end of the conversation before it rendered with the generation prompt (an inserted empty
    /// block skipped) to the end of its end-of-turn text.
    fn turn_span(&self, messages: &[Value], k: usize, text: &str) -> Result<(usize, usize), String> {
        let render = |n: usize, prompt: bool| {
            let part = Value::Array(messages[..n].to_vec());
            self.template.render(&part, prompt).map_err(|e| format!("the chat template failed on messages 0..{n}: {e}"))
        };
        let before = render(k, true)?;
        if !text.starts_with(&before) {
            return Err(format!(
                "messages[{k}] (assistant): the chat template renders the messages before it (with the generation prompt) differently from the same messages inside the whole conversation, so its turn cannot be located; use --train-on all or a template whose earlier turns do not change"
            ));
        }
        let mut start = before.len();
        if !self.inserted.is_empty() && text[start..].starts_with(&self.inserted) {
            start += self.inserted.len();
        }
        let end = if self.turn_end.is_empty() {
            let through = render(k + 1, false)?;
            start + common_prefix(&text[start..], through.get(start..).unwrap_or(""))
        } else {
            let found = text[start..].find(&self.turn_end).ok_or_else(|| {
                format!("messages[{k}] (assistant): the template put no end of turn `{}` after it", self.turn_end)
            })?;
            start + found + self.turn_end.len()
        };
        Ok((start, end))
    }
}

/// `messages` must be a list of objects with a string `role`; returns the list.
fn check_messages(messages: &Value) -> Result<&[Value], String> {
    let list = messages.as_array().ok_or_else(|| format!("is {}, not a list of {{role, content}}", kind(messages)))?;
    if list.is_empty() {
        return Err("is an empty list; a conversation needs at least one message".into());
    }
    for (k, m) in list.iter().enumerate() {
        if !m.get("role").is_some_and(Value::is_string) {
            return Err(format!("messages[{k}] has no string `role` (expected {{\"role\": ..., \"content\": ...}})"));
        }
    }
    Ok(list)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Length in bytes of the common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn marked(train_on: TrainOn, messages: Value) -> String {
        let template = ChatTemplate::new(CHATML.into(), BTreeMap::new()).unwrap();
        let renderer = ChatRenderer::new(&template, &TextTokenizer::Byte).unwrap();
        let s = renderer.sample(&messages, train_on).unwrap();
        let mask = s.mask.unwrap_or_else(|| vec![1; s.tokens.len()]);
        // Trained bytes in brackets.
        let mut out = String::new();
        for (i, (&t, &m)) in s.tokens.iter().zip(&mask).enumerate() {
            let before = if i == 0 { 0 } else { mask[i - 1] };
            if m == 1 && before == 0 {
                out.push('[');
            }
            if m == 0 && before == 1 {
                out.push(']');
            }
            out.push(t as u8 as char);
        }
        if mask.last() == Some(&1) {
            out.push(']');
        }
        out
    }

    #[test]
    fn assistant_turns_are_marked_without_headers_or_inserted_think_blocks() {
        let messages = json!([
            {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]);
        let head = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n";
        let mid = "\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
        assert_eq!(marked(TrainOn::Assistant, messages.clone()), format!("{head}[A1<|im_end|>]{mid}[A2<|im_end|>]\n"));
        assert_eq!(
            marked(TrainOn::LastAssistant, messages.clone()),
            format!("{head}A1<|im_end|>{mid}[A2<|im_end|>]\n")
        );
        assert_eq!(marked(TrainOn::All, messages), format!("[{head}A1<|im_end|>{mid}A2<|im_end|>\n]"));
    }

    #[test]
    fn bad_conversations_are_named() {
        let template = ChatTemplate::new(CHATML.into(), BTreeMap::new()).unwrap();
        let renderer = ChatRenderer::new(&template, &TextTokenizer::Byte).unwrap();
        let err = |m: Value| renderer.sample(&m, TrainOn::Assistant).unwrap_err();
        assert!(err(json!("hi")).contains("is a string, not a list"));
        assert!(err(json!([{"content": "x"}])).contains("messages[0] has no string `role`"));
        assert!(err(json!([{"role": "user", "content": "x"}])).contains("no message with role \"assistant\""));
        assert_eq!(common_prefix("abé", "abéx"), 4);
        assert_eq!(common_prefix("aé", "aè"), 1);
    }
}
