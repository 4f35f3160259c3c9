//! Inference: generation with the KV cache, token choice, and the caption / chat / eval
//! commands built on them.
//!
//! * [`sampling`]: greedy, temperature / top-k / top-p sampling, repetition penalty,
//!   `generation_config.json`.
//! * [`generate`]: prefill + decode loop over a batch, captioning prepared samples.
//! * [`bench`]: `bench generate`, prefill time and decode tokens/s.
//! * [`load`]: finding a trained adapter by path and loading it on its base.
//!
//! The `caption`, `chat` and `eval` commands live in `crate::cli`.

pub mod bench;
pub mod generate;
pub mod load;
pub mod sampling;
