//! Qwen3-VL as burn modules, generic over the backend: config -> `init` -> `forward`.
//!
//! * [`config`]: HF `config.json`, validated.
//! * [`vision`]: patch embedding, position interpolation, 2-D RoPE blocks, mergers, DeepStack.
//! * [`text`]: the Qwen3 decoder with M-RoPE and DeepStack injection.
//! * [`decode`]: the key/value cache and incremental decoding.
//! * [`position_ids`]: 3-axis positions (`get_rope_index`).
//! * [`rotary`], [`attention`], [`layers`]: the shared building blocks.
//! * [`qwen3_vl`]: the whole model and its inputs/outputs.
//! * [`params`]: parameter counts by component.
//!
//! Loading weights lives apart, in `crate::checkpoint`.

pub mod attention;
pub mod config;
pub mod decode;
pub mod layers;
pub mod params;
pub mod position_ids;
pub mod qwen3_vl;
pub mod rotary;
pub mod text;
pub mod vision;

pub use config::Qwen3VlConfig;
pub use decode::KvCache;
pub use qwen3_vl::{ImageFeatures, ModelInputs, ModelOutput, Qwen3VlModel};
