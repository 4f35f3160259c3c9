//! qwen3-vl-moelora: Qwen3-VL in burn, with LoRA / MoE-LoRA adapters on a frozen NF4 base.
//!
//! * [`model`]: the network (pure math, generic over the backend).
//! * [`checkpoint`]: HF safetensors loading and tensor files.
//! * [`adapter`]: LoRA and MoE-LoRA layers, injection, PEFT format, merge.
//! * [`quant`]: the NF4 4-bit base (bitsandbytes format).
//! * [`data`]: dataset sources, image preprocessing, chat template, batching.
//! * [`experiment`]: `experiments/*.toml` run descriptions.
//! * [`train`]: training with burn-train (`train`, sweeps).
//! * [`eval`]: COCO caption metrics (BLEU, ROUGE-L, CIDEr-D).
//! * [`infer`]: captioning with a trained model.
//! * [`cli`]: the subcommands behind the binary.

pub mod adapter;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod infer;
pub mod model;
pub mod quant;
pub mod train;

pub use error::{Error, Result};
