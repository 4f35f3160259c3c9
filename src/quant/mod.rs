//! The frozen 4-bit base: bitsandbytes-compatible NF4 quantization.
//!
//! * [`nf4`]: the NF4 code book, thresholds, blockwise quantize/dequantize (bit for bit as
//!   bitsandbytes' CUDA kernel).
//! * [`dynamic`]: double quantization of the block scales (dynamic 8-bit map).
//! * [`tensor`]: [`Nf4Tensor`], one quantized weight, and its bitsandbytes checkpoint keys.

pub mod dynamic;
pub mod nf4;
pub mod tensor;

pub use tensor::{Absmax, Nf4Tensor};
