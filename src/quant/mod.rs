//! The frozen 4-bit base: bitsandbytes-compatible NF4 quantization.
//!
//! * [`nf4`]: the NF4 code book, thresholds, blockwise quantize/dequantize (bit for bit as
//!   bitsandbytes' CUDA kernel).
//! * [`dynamic`]: double quantization of the block scales (dynamic 8-bit map).
//! * [`tensor`]: [`Nf4Tensor`], one quantized weight, and its bitsandbytes checkpoint keys.
//! * [`convert`]: `quantize`, an HF checkpoint rewritten as a bitsandbytes 4-bit one.
//! * [`load`]: the model with an NF4 base, from a dense or a 4-bit checkpoint.
//! * [`bench`], [`bench_checks`]: `bench nf4`, the kernels' GPU checks and timings.
//! * [`linear`]: [`Nf4Linear`], the frozen NF4 layer adapters wrap (dequantize-then-matmul
//!   reference path, any backend).

pub mod bench;
pub mod bench_checks;
pub mod convert;
pub mod dynamic;
pub mod kernels;
pub mod linear;
pub mod load;
pub mod nf4;
pub mod tensor;

pub use linear::Nf4Linear;
pub use tensor::{Absmax, Nf4Tensor};
