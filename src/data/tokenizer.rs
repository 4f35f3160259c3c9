//! Tokenizers: loading a Hugging Face `tokenizer.json`, Qwen's special tokens, and building a
//! small byte-level BPE tokenizer with Qwen's pre-tokenizer and special tokens (for the
//! synthetic demo and for tests, since the real Qwen tokenizer cannot be downloaded here).

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer, TokenizerBuilder,
};

use crate::error::{Error, Result};

/// Qwen2/Qwen3 special tokens in id order, starting at [`QWEN_FIRST_SPECIAL_ID`].
pub const QWEN_SPECIAL_TOKENS: [&str; 26] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
];

/// Id of `<|endoftext|>` in the real Qwen vocabulary.
pub const QWEN_FIRST_SPECIAL_ID: u32 = 151_643;

/// Tokens that Qwen's tokenizer treats as special (skipped when decoding); the others
/// (`<tool_call>`, `<think>`...) are added but not special.
fn is_special(token: &str) -> bool {
    token.starts_with("<|")
}

/// Qwen2's pre-tokenizer split pattern.
const QWEN_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Where the special tokens go in a built tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialIds {
    /// Qwen's real ids (151643...): needs an embedding of at least 151,669 rows.
    Qwen,
    /// Right after the learned vocabulary: a small embedding suffices.
    Compact,
}

/// Ids of the tokens the chat template and the model need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatTokens {
    /// `<|im_start|>`
    pub im_start: u32,
    /// `<|im_end|>` (end of turn; generation stops here)
    pub im_end: u32,
    /// `<|endoftext|>` (padding)
    pub endoftext: u32,
    /// `<|vision_start|>`
    pub vision_start: u32,
    /// `<|vision_end|>`
    pub vision_end: u32,
    /// `<|image_pad|>`
    pub image_pad: u32,
    /// `<|video_pad|>`
    pub video_pad: u32,
}

impl ChatTokens {
    /// Looks the special tokens up in `tok`; `what` names the tokenizer in errors.
    pub fn from_tokenizer(tok: &Tokenizer, what: &str) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                Error::Input(format!(
                    "{what}: the tokenizer has no {t} token (not a Qwen tokenizer?)"
                ))
            })
        };
        Ok(Self {
            im_start: id("<|im_start|>")?,
            im_end: id("<|im_end|>")?,
            endoftext: id("<|endoftext|>")?,
            vision_start: id("<|vision_start|>")?,
            vision_end: id("<|vision_end|>")?,
            image_pad: id("<|image_pad|>")?,
            video_pad: id("<|video_pad|>")?,
        })
    }
}

/// Loads `tokenizer.json` from a file or a model folder.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !file.exists() {
        return Err(Error::MissingFile {
            path: file,
            hint: "The model folder needs the tokenizer.json of its Hugging Face repository \
                   (for Qwen3-VL-4B-Instruct: download Qwen/Qwen3-VL-4B-Instruct into \
                   model/Qwen3-VL-4B-Instruct/)."
                .into(),
        });
    }
    Tokenizer::from_file(&file)
        .map_err(|e| Error::Input(format!("{}: invalid tokenizer: {e}", file.display())))
}

/// Trains a byte-level BPE tokenizer of about `vocab_size` tokens on `corpus`, with Qwen's
/// normaliser (NFC), pre-tokenizer and decoder, plus Qwen's 26 special tokens at `ids`.
/// Deterministic for a given corpus. Returns the `tokenizer.json` text.
pub fn build_tokenizer_json(
    corpus: &[String],
    vocab_size: usize,
    ids: SpecialIds,
) -> Result<String> {
    let err = |e: tokenizers::Error| Error::Input(format!("building the tokenizer: {e}"));
    let split = Split::new(
        SplitPattern::Regex(QWEN_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?;
    let byte_level = ByteLevel::new(false, false, false);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ]);
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(Some(NormalizerWrapper::NFC(NFC)))
    .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)))
    .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
    .build()
    .map_err(err)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tok.train(&mut trainer, corpus.iter()).map_err(err)?;
    let text = tok.to_string(false).map_err(err)?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Input(e.to_string()))?;
    let vocab = json["model"]["vocab"]
        .as_object_mut()
        .ok_or_else(|| Error::Input("trained tokenizer has no vocab".into()))?;
    let first = match ids {
        SpecialIds::Qwen => QWEN_FIRST_SPECIAL_ID,
        SpecialIds::Compact => vocab.len() as u32,
    };
    let mut added = Vec::new();
    for (i, t) in QWEN_SPECIAL_TOKENS.iter().enumerate() {
        let id = first + i as u32;
        vocab.insert(t.to_string(), id.into());
        added.push(serde_json::json!({
            "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": is_special(t),
        }));
    }
    json["added_tokens"] = added.into();
    // Special tokens stay in the model vocabulary too: the tokenizers crate renumbers added
    // tokens that the model does not know. (Re-serialising through the crate would warn about
    // the id gap below 151643, so the JSON is written here and only checked by loading it.)
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Input(e.to_string()))?;
    Tokenizer::from_bytes(text.as_bytes()).map_err(err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        [
            "a red circle to the left of a blue square",
            "two green triangles",
            "COCO Yes:",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn built_tokenizer_has_qwen_specials_at_real_ids() {
        let json = build_tokenizer_json(&corpus(), 300, SpecialIds::Qwen).unwrap();
        let tok = Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let t = ChatTokens::from_tokenizer(&tok, "test").unwrap();
        assert_eq!(
            (t.endoftext, t.im_start, t.im_end),
            (151_643, 151_644, 151_645)
        );
        assert_eq!(
            (t.vision_start, t.vision_end, t.image_pad, t.video_pad),
            (151_652, 151_653, 151_655, 151_656)
        );
        assert_eq!(tok.token_to_id("</think>"), Some(151_668));
        let enc = tok
            .encode("<|im_start|>user\na red circle<|im_end|>", false)
            .unwrap();
        assert_eq!(enc.get_ids()[0], 151_644);
        assert_eq!(*enc.get_ids().last().unwrap(), 151_645);
        let back = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(back, "<|im_start|>user\na red circle<|im_end|>");
        // Deterministic.
        assert_eq!(
            json,
            build_tokenizer_json(&corpus(), 300, SpecialIds::Qwen).unwrap()
        );
    }

    #[test]
    fn compact_ids_follow_the_vocabulary() {
        let json = build_tokenizer_json(&corpus(), 300, SpecialIds::Compact).unwrap();
        let tok = Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let t = ChatTokens::from_tokenizer(&tok, "test").unwrap();
        assert!(t.endoftext < 400, "{t:?}");
        assert_eq!(t.im_start, t.endoftext + 1);
        assert_eq!(tok.get_vocab_size(true), t.endoftext as usize + 26);
    }
}
