//! Qwen3-VL's Instruct chat template (no default system prompt, images inlined as
//! `<|vision_start|><|image_pad|><|vision_end|>`), image-pad expansion and training labels.
//!
//! Labels: -100 on the prompt (user turn and `<|im_start|>assistant\n`); the caption tokens
//! and the closing `<|im_end|>` are targets, so the model learns to end its turn the way
//! generation stops. (The reference workflow appended `<|endoftext|>`, the pad token, instead.)

use tokenizers::Tokenizer;

use super::tokenizer::ChatTokens;
use crate::error::{Error, Result};

/// The reference workflow's captioning prompt.
pub const DEFAULT_PROMPT: &str = "COCO Yes:";
/// Label value ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `system`
    System,
    /// `user`
    User,
    /// `assistant`
    Assistant,
}

/// One item of a turn's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// An image placeholder.
    Image,
    /// Verbatim text.
    Text(String),
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Speaker.
    pub role: Role,
    /// Content items, rendered in order with no separators.
    pub parts: Vec<Part>,
}

/// Renders `turns` as the Qwen3-VL Instruct template does.
pub fn render_chat(turns: &[Turn], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for t in turns {
        let role = match t.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        s.push_str("<|im_start|>");
        s.push_str(role);
        s.push('\n');
        for p in &t.parts {
            match p {
                Part::Image => s.push_str("<|vision_start|><|image_pad|><|vision_end|>"),
                Part::Text(text) => s.push_str(text),
            }
        }
        s.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

/// A tokenised training sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSample {
    /// Token ids, images expanded.
    pub input_ids: Vec<u32>,
    /// Same length; [`IGNORE_INDEX`] where no loss is taken.
    pub labels: Vec<i64>,
    /// Whether the caption was cut to fit `max_length`.
    pub truncated: bool,
}

/// Tokenises conversations and caption samples with a Qwen tokenizer.
#[derive(Debug, Clone)]
pub struct ChatEncoder {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Its special token ids.
    pub tokens: ChatTokens,
}

impl ChatEncoder {
    /// Wraps `tokenizer`, which must carry Qwen's special tokens.
    pub fn new(tokenizer: Tokenizer, what: &str) -> Result<Self> {
        let tokens = ChatTokens::from_tokenizer(&tokenizer, what)?;
        Ok(Self { tokenizer, tokens })
    }

    /// Token ids of `text` (special tokens recognised, nothing added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Input(format!("tokenizing {text:?}: {e}")))
    }

    /// Renders and tokenises `turns`, expanding the k-th image's single `<|image_pad|>` into
    /// `image_tokens[k]` copies (t·h·w / merge²), as HF's processor does.
    pub fn encode_chat(
        &self,
        turns: &[Turn],
        add_generation_prompt: bool,
        image_tokens: &[usize],
    ) -> Result<Vec<u32>> {
        let ids = self.tokenize(&render_chat(turns, add_generation_prompt))?;
        self.expand_images(ids, image_tokens)
    }

    fn expand_images(&self, ids: Vec<u32>, image_tokens: &[usize]) -> Result<Vec<u32>> {
        let pad = self.tokens.image_pad;
        let found = ids.iter().filter(|&&i| i == pad).count();
        if found != image_tokens.len() {
            return Err(Error::Input(format!(
                "the text holds {found} image placeholders but {} images were given",
                image_tokens.len()
            )));
        }
        let extra: usize = image_tokens.iter().sum::<usize>();
        let mut out = Vec::with_capacity(ids.len() + extra);
        let mut next = image_tokens.iter();
        for id in ids {
            if id == pad {
                let n = *next.next().expect("counted above");
                out.extend(std::iter::repeat_n(pad, n));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The generation prompt for captioning one image: user turn (image, then `prompt`) and
    /// `<|im_start|>assistant\n`.
    pub fn caption_prompt(&self, prompt: &str, image_tokens: usize) -> Result<Vec<u32>> {
        let user = Turn {
            role: Role::User,
            parts: vec![Part::Image, Part::Text(prompt.to_string())],
        };
        self.encode_chat(&[user], true, &[image_tokens])
    }

    /// A training sample: the caption prompt, then `caption` and `<|im_end|>` as targets.
    /// Over `max_length` the caption is cut (and `truncated` set); a prompt that alone does
    /// not fit is an error.
    pub fn caption_sample(
        &self,
        prompt: &str,
        image_tokens: usize,
        caption: &str,
        max_length: usize,
    ) -> Result<EncodedSample> {
        let mut input_ids = self.caption_prompt(prompt, image_tokens)?;
        let n_prompt = input_ids.len();
        let mut target = self.tokenize(caption)?;
        target.push(self.tokens.im_end);
        if n_prompt >= max_length {
            return Err(Error::Input(format!(
                "the prompt alone takes {n_prompt} tokens ({image_tokens} for the image) but \
                 max_length is {max_length}"
            )));
        }
        let truncated = n_prompt + target.len() > max_length;
        target.truncate(max_length - n_prompt);
        let mut labels = vec![IGNORE_INDEX; n_prompt];
        labels.extend(target.iter().map(|&t| t as i64));
        input_ids.extend(target);
        Ok(EncodedSample {
            input_ids,
            labels,
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_spec_example() {
        let user = Turn {
            role: Role::User,
            parts: vec![Part::Image, Part::Text("Describe this image.".into())],
        };
        assert_eq!(
            render_chat(&[user], true),
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
