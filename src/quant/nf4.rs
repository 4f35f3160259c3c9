//! NF4 blockwise 4-bit quantization, bit for bit as bitsandbytes' CUDA kernel does it
//! (spec: ../shared/spec/nf4-moelora.md §A.1–A.3).
//!
//! A tensor is flattened row-major and cut into blocks of `blocksize` values (the last block may
//! be partial). Each block stores its largest magnitude (`absmax`, f32); each value is scaled by
//! the block's reciprocal `1 / absmax` (computed once, in f32) and coded as the number of NF4
//! thresholds it lies strictly above. Two codes share a byte, the even element in the high nibble.

use crate::error::{Error, Result};

/// The 16 NF4 values (quantiles of N(0, 1) scaled to [-1, 1]; code 7 is an exact 0).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The decision thresholds between adjacent codes, as the f32 literals of bitsandbytes' CUDA
/// kernel (decimal midpoints rounded to f32). Four of them (0|1, 8|9, 12|13, 14|15) are one
/// ulp away from the midpoints computed in f32 that bitsandbytes' pure-torch CPU path uses, so
/// the two bitsandbytes back ends disagree on values exactly on those thresholds; we follow CUDA,
/// where checkpoints are quantized.
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// Block sizes bitsandbytes accepts.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Checks `blocksize` against [`BLOCK_SIZES`].
pub fn check_blocksize(blocksize: usize, what: &str) -> Result<()> {
    if BLOCK_SIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::Input(format!(
            "{what}: block size {blocksize} is not one of {BLOCK_SIZES:?}"
        )))
    }
}

/// The NF4 code of a scaled value: how many thresholds lie strictly below it. NaN (an
/// all-zero block scaled by 1/0) compares false everywhere and gets code 0, as on CUDA.
pub fn nf4_code(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8
}

/// Largest magnitude of each `blocksize` run of `values` (the last run may be shorter).
pub fn block_absmax(values: &[f32], blocksize: usize) -> Vec<f32> {
    values
        .chunks(blocksize)
        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// Quantizes `values` (the flattened tensor): (packed codes `[(n + 1) / 2]`, absmax per block).
/// An odd count is padded with one 0.0 (code 7) in the last low nibble.
pub fn quantize_nf4(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let absmax = block_absmax(values, blocksize);
    let mut codes = Vec::with_capacity(values.len() + 1);
    for (block, &m) in values.chunks(blocksize).zip(&absmax) {
        let inv = 1.0f32 / m;
        codes.extend(block.iter().map(|&v| nf4_code(v * inv)));
    }
    if codes.len() % 2 == 1 {
        codes.push(nf4_code(0.0));
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// The `n` values of a packed NF4 tensor: `code_map[code] · absmax[block]` in f32.
pub fn dequantize_nf4(
    packed: &[u8],
    absmax: &[f32],
    code_map: &[f32; 16],
    blocksize: usize,
    n: usize,
) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let byte = packed[i / 2];
            let code = if i.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0F
            };
            code_map[code as usize] * absmax[i / blocksize]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_count_thresholds_strictly_below() {
        for (c, &v) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_code(v) as usize, c, "code value {v}");
        }
        // On a threshold: the lower code.
        assert_eq!(nf4_code(NF4_THRESHOLDS[7]), 7);
        assert_eq!(nf4_code(f32::NAN), 0);
        assert_eq!(nf4_code(0.0), 7);
    }

    #[test]
    fn round_trip_stays_within_half_a_code_step() {
        let values: Vec<f32> = (0..301)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (packed, absmax) = quantize_nf4(&values, 64);
        assert_eq!(packed.len(), 151);
        assert_eq!(absmax.len(), 5);
        let back = dequantize_nf4(&packed, &absmax, &NF4_CODE, 64, values.len());
        for (i, (a, b)) in values.iter().zip(&back).enumerate() {
            // The widest NF4 gap is 0.3038 (between -1 and -0.696) of the block's absmax.
            assert!((a - b).abs() <= 0.16 * absmax[i / 64], "{i}: {a} vs {b}");
        }
    }
}
