//! Caption evaluation as the COCO caption code scores it.
//!
//! * [`tokenize`]: PTB-style tokenisation and punctuation removal.
//! * [`metrics`]: BLEU-1..4, ROUGE-L, CIDEr-D.
//! * [`report`]: `report.html`, images with their reference and generated captions.

pub mod metrics;
pub mod report;
pub mod tokenize;

pub use metrics::{caption_scores, CaptionScores, Scored};
pub use tokenize::ptb_tokenize;

/// Tokenises raw (prediction, references) pairs and scores them; None for no pairs.
pub fn score_captions<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a [String])>,
) -> Option<CaptionScores> {
    let tokens: Vec<(String, Vec<String>)> = pairs
        .map(|(p, refs)| {
            (
                ptb_tokenize(p),
                refs.iter().map(|r| ptb_tokenize(r)).collect(),
            )
        })
        .collect();
    let images: Vec<Scored<'_>> = tokens
        .iter()
        .map(|(c, refs)| Scored {
            candidate: c,
            references: refs.iter().map(String::as_str).collect(),
        })
        .collect();
    (!images.is_empty()).then(|| caption_scores(&images))
}
