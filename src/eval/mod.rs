//! Caption evaluation as the COCO caption code scores it.
//!
//! * [`tokenize`]: PTB-style tokenisation and punctuation removal.
//! * [`metrics`]: BLEU-1..4, ROUGE-L, CIDEr-D.

pub mod metrics;
pub mod tokenize;

pub use metrics::{caption_scores, CaptionScores, Scored};
pub use tokenize::ptb_tokenize;
