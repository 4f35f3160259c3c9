//! qwen3-vl-moelora: Qwen3-VL in burn, with LoRA / MoE-LoRA adapters on a frozen NF4 base.
//!
//! * [`model`]: the network (pure math, generic over the backend).
//! * [`checkpoint`]: HF safetensors loading and tensor files.
//! * [`cli`]: the subcommands behind the binary.

pub mod adapter;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod error;
pub mod model;

pub use error::{Error, Result};
