//! [`Nf4Linear`]: a frozen linear layer whose weight stays NF4-packed on the device.
//!
//! This is the backend-generic reference path: the weight is dequantized on the device (unpack
//! nibbles, look up the code map, scale by the block absmax, all in f32 as bitsandbytes does,
//! then cast to the compute dtype) and multiplied with burn's matmul. The packed weight is a
//! constant, not a parameter: autodiff produces the input gradient only.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;

use super::kernels::{self, Nf4Parts};
use super::tensor::{Absmax, Nf4Tensor};
use crate::adapter::FrozenLinear;
use crate::error::{Error, Result};

/// The per-block scales of an [`Nf4Linear`] on the device.
#[derive(Module, Debug)]
pub enum BlockScales<B: Backend> {
    /// One f32 per block: [blocks].
    Plain(Tensor<B, 1>),
    /// Double-quantized, as bitsandbytes stores them (1 byte per block instead of 4).
    Nested(NestedScales<B>),
}

/// Double-quantized block scales on the device.
#[derive(Module, Debug)]
pub struct NestedScales<B: Backend> {
    /// 8-bit codes, 4 per little-endian i32 word: [ceil(blocks / 4)].
    pub words: Tensor<B, 1, Int>,
    /// f32 scale of each 256 codes: [ceil(blocks / 256)].
    pub nested_absmax: Tensor<B, 1>,
    /// The 256-value map the codes index.
    pub map: Tensor<B, 1>,
    /// Added back after dequantizing.
    pub offset: f32,
    /// Codes per nested block (256).
    pub nested_blocksize: usize,
    /// Number of blocks.
    pub blocks: usize,
}

impl<B: Backend> BlockScales<B> {
    fn new(absmax: &Absmax, device: &B::Device) -> Self {
        let f32s = |v: &[f32]| {
            Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), (device, DType::F32))
        };
        match absmax {
            Absmax::Plain(a) => BlockScales::Plain(f32s(a)),
            Absmax::Nested(n) => {
                let mut bytes = n.codes.clone();
                bytes.resize(n.codes.len().div_ceil(4) * 4, 0);
                let words: Vec<i32> = bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let len = words.len();
                BlockScales::Nested(NestedScales {
                    words: Tensor::from_data(TensorData::new(words, [len]), device),
                    nested_absmax: f32s(&n.nested_absmax),
                    map: f32s(&n.nested_map),
                    offset: n.offset,
                    nested_blocksize: n.nested_blocksize,
                    blocks: n.codes.len(),
                })
            }
        }
    }

    /// Bytes on the device.
    fn bytes(&self) -> usize {
        match self {
            BlockScales::Plain(a) => 4 * a.dims()[0],
            BlockScales::Nested(n) => 4 * (n.words.dims()[0] + n.nested_absmax.dims()[0] + 256 + 1),
        }
    }
}

/// A frozen `y = x · Wᵀ + b` with W stored as NF4 codes (8 per i32 word) and f32 block scales.
#[derive(Module, Debug)]
pub struct Nf4Linear<B: Backend> {
    /// Packed codes, bitsandbytes' bytes read as little-endian i32 words: [out·in / 8].
    pub words: Tensor<B, 1, Int>,
    /// The block scales, as stored: f32, or double-quantized.
    pub scales: BlockScales<B>,
    /// The 16 code values (f32).
    pub code: Tensor<B, 1>,
    /// Frozen bias in the compute dtype: [out].
    pub bias: Option<Tensor<B, 1>>,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Values per block.
    pub blocksize: usize,
    /// Dtype of the dequantized weight and of the product (f16, bf16 or f32).
    #[module(skip)]
    pub compute: DType,
}

impl<B: Backend> Nf4Linear<B> {
    /// Moves a quantized `[out, in]` weight (and optional bias values) to `device`.
    pub fn new(
        weight: &Nf4Tensor,
        bias: Option<&[f32]>,
        compute: DType,
        device: &B::Device,
    ) -> Result<Self> {
        let [d_out, d_in] = weight.shape[..] else {
            return Err(Error::Input(format!(
                "an NF4 linear weight must be 2-D [out, in], found shape {:?}",
                weight.shape
            )));
        };
        let n = d_out * d_in;
        if !n.is_multiple_of(8) || !n.is_multiple_of(weight.blocksize) {
            return Err(Error::Input(format!(
                "NF4 weight [{d_out}, {d_in}]: {n} values must be a multiple of 8 and of the \
                 block size {}",
                weight.blocksize
            )));
        }
        let words: Vec<i32> = weight
            .packed
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            words: Tensor::from_data(TensorData::new(words, [n / 8]), device),
            scales: BlockScales::new(&weight.absmax, device),
            code: Tensor::from_data(
                TensorData::new(weight.quant_map.to_vec(), [16]),
                (device, DType::F32),
            ),
            bias: bias.map(|b| {
                Tensor::<B, 1>::from_data(TensorData::new(b.to_vec(), [d_out]), device)
                    .cast(compute)
            }),
            d_in,
            d_out,
            blocksize: weight.blocksize,
            compute,
        })
    }

    /// The dequantized weight [out, in] in the compute dtype (reference path, any backend).
    pub fn weight(&self) -> Tensor<B, 2> {
        Nf4Parts::of(self).dequantize_reference()
    }

    /// Applies the layer to the last dimension of `x` ([..., in] -> [..., out]): the backend's
    /// NF4 kernels when it registered them, else dequantize-then-matmul.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = x.cast(self.compute);
        let Some(ops) = kernels::registered::<B>() else {
            return burn::tensor::module::linear(x, self.weight().transpose(), self.bias.clone());
        };
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let y = (ops.matmul)(x.reshape([rows, self.d_in]), &Nf4Parts::of(self)); // [rows, out]
        let mut out = dims;
        out[D - 1] = self.d_out;
        let y = y.reshape(out);
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze(),
            None => y,
        }
    }

    /// Bytes the layer holds on the device (packed codes, scales, code map, bias).
    pub fn device_bytes(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, |b| b.dims()[0] * 2);
        self.d_in * self.d_out / 2 + self.scales.bytes() + 64 + bias
    }
}

impl<B: Backend> FrozenLinear<B> for Nf4Linear<B> {
    fn forward_frozen<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward(x)
    }
    fn d_in(&self) -> usize {
        self.d_in
    }
    fn d_out(&self) -> usize {
        self.d_out
    }
    fn device(&self) -> B::Device {
        self.words.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::LoraLinear;
    use burn::backend::{Autodiff, Flex};

    type B = Flex;
    type A = Autodiff<Flex>;

    fn weight(d_out: usize, d_in: usize) -> (Vec<f32>, Nf4Tensor) {
        let w: Vec<f32> = (0..d_out * d_in)
            .map(|i| (((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5) * 0.1)
            .collect();
        let q = Nf4Tensor::quantize(&w, &[d_out, d_in], "float32", 64, true).unwrap();
        (w, q)
    }

    #[test]
    fn device_dequantization_is_bit_identical_to_the_host() {
        // 48 blocks (one nested block), 321 blocks (two nested, the codes not a multiple of 4),
        // and plain f32 scales.
        for (d_out, d_in, nested) in [(24, 128, true), (321, 64, true), (24, 128, false)] {
            let w: Vec<f32> = (0..d_out * d_in)
                .map(|i| (((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5) * (1.0 + (i % 5) as f32))
                .collect();
            let q = Nf4Tensor::quantize(&w, &[d_out, d_in], "float32", 64, nested).unwrap();
            let layer = Nf4Linear::<B>::new(&q, None, DType::F32, &Default::default()).unwrap();
            let scales: Vec<f32> = Nf4Parts::of(&layer)
                .block_scales()
                .into_data()
                .to_vec()
                .unwrap();
            assert_eq!(
                bits(&scales),
                bits(&q.absmax_f32()),
                "[{d_out}, {d_in}] scales"
            );
            let got: Vec<f32> = layer.weight().into_data().to_vec().unwrap();
            assert_eq!(
                bits(&got),
                bits(&q.dequantize()),
                "[{d_out}, {d_in}] weight"
            );
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn forward_is_x_times_the_dequantized_weight() {
        let dev = Default::default();
        let (_, q) = weight(24, 128);
        let bias: Vec<f32> = (0..24).map(|i| i as f32 * 0.01).collect();
        let layer = Nf4Linear::<B>::new(&q, Some(&bias), DType::F32, &dev).unwrap();
        let x: Vec<f32> = (0..3 * 128)
            .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
            .collect();
        let y: Vec<f32> = layer
            .forward(Tensor::<B, 2>::from_data(
                TensorData::new(x.clone(), [3, 128]),
                &dev,
            ))
            .into_data()
            .to_vec()
            .unwrap();
        let w = q.dequantize();
        for r in 0..3 {
            for o in 0..24 {
                let want: f32 = (0..128)
                    .map(|k| x[r * 128 + k] * w[o * 128 + k])
                    .sum::<f32>()
                    + bias[o];
                let got = y[r * 24 + o];
                assert!((got - want).abs() < 1e-4, "[{r},{o}] {got} vs {want}");
            }
        }
    }

    #[test]
    fn backward_gives_the_input_gradient_by_finite_differences() {
        let dev = Default::default();
        let (_, q) = weight(16, 64);
        let layer = Nf4Linear::<A>::new(&q, None, DType::F32, &dev).unwrap();
        let x0: Vec<f32> = (0..2 * 64).map(|i| ((i % 11) as f32 - 5.0) / 5.0).collect();
        let r: Vec<f32> = (0..2 * 16).map(|i| ((i % 7) as f32 - 3.0) / 3.0).collect();
        // loss(x) = Σ forward(x) ∘ r
        let loss = |x: &[f32]| -> f32 {
            let x = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [2, 64]), &dev);
            let inner = Nf4Linear::<B>::new(&q, None, DType::F32, &dev).unwrap();
            let rr = Tensor::<B, 2>::from_data(TensorData::new(r.clone(), [2, 16]), &dev);
            (inner.forward(x) * rr).sum().into_scalar()
        };
        let x =
            Tensor::<A, 2>::from_data(TensorData::new(x0.clone(), [2, 64]), &dev).require_grad();
        let rr = Tensor::<A, 2>::from_data(TensorData::new(r.clone(), [2, 16]), &dev);
        let grads = (layer.forward(x.clone()) * rr).sum().backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let eps = 1e-2;
        for i in [0, 5, 63, 64, 100, 127] {
            let (mut p, mut m) = (x0.clone(), x0.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (loss(&p) - loss(&m)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 2e-3 * (1.0 + g[i].abs()),
                "{i}: {fd} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn lora_on_an_nf4_base_trains_only_the_adapter() {
        let dev = Default::default();
        let (_, q) = weight(16, 64);
        let base = Nf4Linear::<A>::new(&q, None, DType::F32, &dev).unwrap();
        let lora = LoraLinear::new(base, 4, 8.0, 0.0);
        // The packed base holds no parameters at all: only A and B are trainable.
        assert_eq!(crate::model::params::count_params(&lora.base), 0);
        assert_eq!(crate::model::params::count_params(&lora), 4 * 64 + 16 * 4);
        let x = Tensor::<A, 2>::ones([3, 64], &dev);
        let grads = lora
            .forward(x, &crate::adapter::AdapterStats::new())
            .sum()
            .backward();
        // B starts at zero, so A's gradient is zero and B's is not.
        let ga: Vec<f32> = lora
            .lora_a
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        let gb: Vec<f32> = lora
            .lora_b
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        assert!(ga.iter().all(|v| *v == 0.0));
        assert!(gb.iter().any(|v| v.abs() > 0.0));
    }
}
