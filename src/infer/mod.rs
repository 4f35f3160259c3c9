//! Inference: generation with the KV cache, token choice, and the caption / chat / eval
//! commands built on them.
//!
//! * [`sampling`]: greedy, temperature / top-k / top-p sampling, repetition penalty,
//!   `generation_config.json`.
//! * [`generate`]: prefill + decode loop over a batch, captioning prepared samples.

pub mod generate;
pub mod sampling;
