//! Inference: captioning with a (possibly adapted) model.
//!
//! * [`generate`]: greedy decoding of a caption for one prepared sample.

pub mod generate;
