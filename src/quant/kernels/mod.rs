//! NF4 kernels as a backend extension: [`Nf4Backend`].
//!
//! * The trait's default methods are the portable reference (burn tensor ops: unpack, look up,
//!   scale, then burn's matmul); CPU backends use them.
//! * [`cube`]: custom CubeCL kernels for burn-cuda — a dequantizing GEMV that reads the packed
//!   weight once (decoding, 1..8 rows) and a one-pass dequantization into the compute dtype
//!   that feeds burn's tensor-core matmul (prefill, training).
//! * [`gemv`]: the GEMV for one row of x (whole rows of W per warp, x staged in shared memory)
//!   and for 2..8 rows (two rows of W per warp); [`cube`]'s one-warp-per-row GEMV takes the
//!   shapes they do not fit.
//! * [`gemv_mma`]: the GEMV on tensor cores, a CUDA C++ kernel launched through CubeCL's
//!   runtime ([`raw_cuda`]); the default for 2..8 rows where it applies (double-quantized
//!   blocks of 64, `in` a multiple of 64, `out` of 16, a card with the m16n8k16 `mma`).
//! * [`gemv_row`]: the one-row GEMV on tensor cores (CUDA C++ too), one tile of 16 W rows per
//!   cube; the default for one row where it applies (`d_in` a multiple of 256, `d_out` of
//!   16), 2–21 % faster than the sliced kernel ([`gemv_sliced`]) on the 4B shapes, which takes
//!   the one-row shapes it does not fit.
//! * [`fusion`]: the same kernels registered as custom operations of burn's fusion backend.
//! * [`autodiff`]: a backward that keeps only the packed weight and dequantizes it again for
//!   dX = dY·W (no dense weight is held between the forward and the backward pass).
//! * [`layer_ops`]: fused RMSNorm, q/k norm + rotary, softmax and SwiGLU kernels for the
//!   decoder, found through the same registry; [`layer_steps`] runs them under autodiff with
//!   the closed-form backwards of [`layer_grads`].
//! * [`routing`]: MoE-LoRA routing as one autodiff step with a closed-form backward.
//! * [`expert_step`]: MoE-LoRA's router and expert products as one autodiff step each.
//! * [`adamw`]: the optimizer's update of one parameter as one kernel.
//! * [`grad_norm`]: the gradients' Σ‖g‖² with one launch per gradient.
//!
//! The model is generic over `B: Backend`, so it cannot name this trait in its bounds; instead
//! the binary [`register`]s the backends it runs on, and [`Nf4Linear`] looks its backend up at
//! run time (a type-id map; the reference path when nothing is registered).

pub mod adamw;
pub mod autodiff;
pub mod cube;
pub mod expert_step;
pub mod fusion;
pub mod gemm_tiled;
pub mod gemv;
pub mod gemv_mma;
pub mod gemv_row;
pub mod gemv_sliced;
pub mod grad_norm;
pub mod layer_grads;
pub mod layer_ops;
pub mod layer_steps;
mod overrides;
pub mod raw_cuda;
pub mod routing;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;

use super::linear::{BlockScales, Nf4Linear};

/// Right shifts that bring element `k` of a little-endian i32 word of packed bytes to the low
/// nibble (byte `k / 2`; the even element is the byte's high nibble).
const NIBBLE_SHIFTS: [i32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];

/// Most input rows the GEMV kernel takes; more rows go to the tiled GEMM (where it runs) or
/// dequantize and use the library matmul.
pub const GEMV_MAX_ROWS: usize = 8;

/// Everything about an NF4 weight a kernel needs besides its tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nf4Meta {
    /// Output width (rows of W).
    pub d_out: usize,
    /// Input width (columns of W).
    pub d_in: usize,
    /// Values per absmax block.
    pub blocksize: usize,
    /// Whether the block scales are double-quantized.
    pub nested: bool,
    /// 8-bit scale codes per nested f32 scale.
    pub nested_blocksize: usize,
    /// Added to every double-quantized scale.
    pub offset: f32,
    /// Dtype of the dequantized weight and of the product.
    pub compute: DType,
}

#[cfg(test)]
impl Nf4Meta {
    /// A block-64, double-quantized `d_in` → `d_out` weight computed in `compute` (for the
    /// kernel-plan tests).
    pub(crate) fn for_plan_test(d_in: usize, d_out: usize, compute: DType) -> Self {
        Self {
            d_out,
            d_in,
            blocksize: 64,
            nested: true,
            nested_blocksize: 256,
            offset: 0.0,
            compute,
        }
    }
}

/// The device tensors of an NF4 weight in the form the kernels read.
#[derive(Clone, Debug)]
pub struct Nf4Parts<B: Backend> {
    /// Packed codes, 8 per i32 word: [out·in / 8].
    pub words: Tensor<B, 1, Int>,
    /// f32 block scales, or the nested f32 scales when double-quantized.
    pub absmax: Tensor<B, 1>,
    /// 8-bit scale codes, 4 per word (double quant; otherwise `words`, unread).
    pub scale_words: Tensor<B, 1, Int>,
    /// The 256-value map of the scale codes (double quant; otherwise `code`, unread).
    pub scale_map: Tensor<B, 1>,
    /// The 16 NF4 code values.
    pub code: Tensor<B, 1>,
    /// Shapes and options.
    pub meta: Nf4Meta,
}

impl<B: Backend> Nf4Parts<B> {
    /// The parts of `layer` (its bias is not part of the product).
    pub fn of(layer: &Nf4Linear<B>) -> Self {
        let mut meta = Nf4Meta {
            d_out: layer.d_out,
            d_in: layer.d_in,
            blocksize: layer.blocksize,
            nested: false,
            nested_blocksize: 1,
            offset: 0.0,
            compute: layer.compute,
        };
        let (absmax, scale_words, scale_map) = match &layer.scales {
            BlockScales::Plain(a) => (a.clone(), layer.words.clone(), layer.code.clone()),
            BlockScales::Nested(n) => {
                meta.nested = true;
                meta.nested_blocksize = n.nested_blocksize;
                meta.offset = n.offset;
                (n.nested_absmax.clone(), n.words.clone(), n.map.clone())
            }
        };
        Self {
            words: layer.words.clone(),
            absmax,
            scale_words,
            scale_map,
            code: layer.code.clone(),
            meta,
        }
    }

    /// The f32 scale of every block: [blocks]. Double-quantized scales are expanded as
    /// bitsandbytes does it, `map[code] · nested_absmax[block / 256] + offset` in f32.
    pub fn block_scales(&self) -> Tensor<B, 1> {
        let m = self.meta;
        let blocks = m.d_out * m.d_in / m.blocksize;
        if !m.nested {
            return self.absmax.clone();
        }
        let words = self.scale_words.dims()[0];
        let device = self.words.device();
        let shifts = Tensor::<B, 1, Int>::from_data(TensorData::from([0, 8, 16, 24]), &device)
            .reshape([1, 4])
            .expand([words, 4]);
        let codes = self
            .scale_words
            .clone()
            .reshape([words, 1])
            .expand([words, 4])
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar(255.elem())
            .reshape([words * 4])
            .slice(0..blocks); // [blocks]
        let nested = self.absmax.dims()[0];
        let per_block = self
            .absmax
            .clone()
            .reshape([nested, 1])
            .expand([nested, m.nested_blocksize])
            .reshape([nested * m.nested_blocksize])
            .slice(0..blocks); // nested scale of each block
        (self.scale_map.clone().select(0, codes) * per_block).add_scalar(m.offset)
    }

    /// The weight [out, in] in the compute dtype with burn tensor ops (reference path): codes
    /// unpacked, looked up, scaled by the block absmax in f32 as bitsandbytes, then cast.
    pub fn dequantize_reference(&self) -> Tensor<B, 2> {
        let m = self.meta;
        let n = m.d_in * m.d_out;
        let device = self.words.device();
        let shifts = Tensor::<B, 1, Int>::from_data(TensorData::from(NIBBLE_SHIFTS), &device)
            .reshape([1, 8])
            .expand([n / 8, 8]);
        let codes = self
            .words
            .clone()
            .reshape([n / 8, 1])
            .expand([n / 8, 8])
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar(15.elem())
            .reshape([n]); // [n] codes in element order
        let blocks = n / m.blocksize;
        let values = self
            .code
            .clone()
            .select(0, codes)
            .reshape([blocks, m.blocksize]);
        let scaled = values * self.block_scales().reshape([blocks, 1]); // f32, as bitsandbytes
        scaled.reshape([m.d_out, m.d_in]).cast(m.compute)
    }
}

impl<B: AutodiffBackend> Nf4Parts<B> {
    /// The same tensors on the inner (non-autodiff) backend.
    pub fn inner(&self) -> Nf4Parts<B::InnerBackend> {
        Nf4Parts {
            words: self.words.clone().inner(),
            absmax: self.absmax.clone().inner(),
            scale_words: self.scale_words.clone().inner(),
            scale_map: self.scale_map.clone().inner(),
            code: self.code.clone().inner(),
            meta: self.meta,
        }
    }
}

/// NF4 operations a backend provides; the defaults are the portable reference.
pub trait Nf4Backend: Backend {
    /// The weight [out, in] in the compute dtype.
    fn nf4_dequantize(w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        w.dequantize_reference()
    }

    /// `x · Wᵀ` for a few rows, x [M, in] with M <= [`GEMV_MAX_ROWS`] -> [M, out].
    fn nf4_gemv(x: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        x.matmul(Self::nf4_dequantize(w).transpose())
    }

    /// `x · Wᵀ`, x [M, in] in the compute dtype -> [M, out]: the GEMV for a few rows, else
    /// dequantize and multiply.
    fn nf4_matmul(x: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        gemv_or_dequantized_matmul(x, w)
    }

    /// `dY · W`, dY [M, out] in the compute dtype -> [M, in] (the input gradient of
    /// [`Nf4Backend::nf4_matmul`]): dequantize and multiply.
    fn nf4_matmul_transposed(dy: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        dy.matmul(Self::nf4_dequantize(w))
    }
}

/// [`Nf4Backend::nf4_matmul`]'s default: the GEMV for a few rows, else dequantize and multiply.
pub fn gemv_or_dequantized_matmul<B: Nf4Backend>(x: Tensor<B, 2>, w: &Nf4Parts<B>) -> Tensor<B, 2> {
    if x.dims()[0] <= GEMV_MAX_ROWS && w.meta.d_in.is_multiple_of(8) {
        B::nf4_gemv(x, w)
    } else {
        x.matmul(B::nf4_dequantize(w).transpose())
    }
}

impl Nf4Backend for burn::backend::Flex {}

/// A backend's [`Nf4Backend`] operations as plain functions (what the registry holds).
pub struct Nf4Ops<B: Backend> {
    /// `x · Wᵀ` ([`Nf4Backend::nf4_matmul`]).
    pub matmul: fn(Tensor<B, 2>, &Nf4Parts<B>) -> Tensor<B, 2>,
    /// W in the compute dtype ([`Nf4Backend::nf4_dequantize`]).
    pub dequantize: fn(&Nf4Parts<B>) -> Tensor<B, 2>,
}

impl<B: Backend> Clone for Nf4Ops<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Nf4Ops<B> {}

/// Registered kernel tables by their type (`Nf4Ops<B>`, `LayerOps<B>`: one per backend).
fn registry() -> &'static RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>> {
    static REGISTRY: OnceLock<RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>> =
        OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Registers the kernel table `ops` (replacing one of the same type).
fn store<T: Any + Send + Sync>(ops: T) {
    registry()
        .write()
        .expect("kernel registry poisoned")
        .insert(TypeId::of::<T>(), Box::new(ops));
}

/// The registered kernel table of type `T`, if any.
fn fetch<T: Any + Copy>() -> Option<T> {
    let map = registry().read().expect("kernel registry poisoned");
    map.get(&TypeId::of::<T>())
        .and_then(|f| f.downcast_ref::<T>())
        .copied()
}

/// Makes [`Nf4Linear`] on backend `B` use `B`'s [`Nf4Backend`] operations.
pub fn register<B: Nf4Backend>() {
    store(Nf4Ops::<B> {
        matmul: B::nf4_matmul,
        dequantize: B::nf4_dequantize,
    });
}

/// Forgets the kernel table of type `T` (the reference path for its backend again).
fn remove<T: Any>() {
    registry()
        .write()
        .expect("kernel registry poisoned")
        .remove(&TypeId::of::<T>());
}

/// Forgets backend `B`'s NF4 operations (the reference path for it again).
pub fn unregister<B: Backend>() {
    remove::<Nf4Ops<B>>();
}

/// The registered NF4 operations of backend `B`, if any.
pub fn registered<B: Backend>() -> Option<Nf4Ops<B>> {
    fetch::<Nf4Ops<B>>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Nf4Tensor;
    use burn::backend::{Autodiff, Flex};

    type A = Autodiff<Flex>;

    /// The custom autodiff backward (dX from the packed weight) gives the same values and input
    /// gradients as autodiff through the reference ops.
    #[test]
    fn registered_backward_matches_the_reference() {
        let dev = Default::default();
        let w: Vec<f32> = (0..40 * 128)
            .map(|i| (((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5) * 0.1)
            .collect();
        let q = Nf4Tensor::quantize(&w, &[40, 128], "float32", 64, true).unwrap();
        let layer = Nf4Linear::<A>::new(&q, None, DType::F32, &dev).unwrap();
        let run = |rows: usize| {
            let x: Vec<f32> = (0..rows * 128)
                .map(|i| ((i % 13) as f32 - 6.0) / 6.0)
                .collect();
            let r: Vec<f32> = (0..rows * 40)
                .map(|i| ((i % 7) as f32 - 3.0) / 3.0)
                .collect();
            let x = Tensor::<A, 2>::from_data(TensorData::new(x, [rows, 128]), &dev).require_grad();
            let r = Tensor::<A, 2>::from_data(TensorData::new(r, [rows, 40]), &dev);
            let y = layer.forward(x.clone());
            let grads = (y.clone() * r).sum().backward();
            let y: Vec<f32> = y.into_data().to_vec().unwrap();
            let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            (y, g)
        };
        for rows in [3, 20] {
            unregister::<A>();
            unregister::<Flex>();
            let (y0, g0) = run(rows);
            register::<A>();
            register::<Flex>();
            let (y1, g1) = run(rows);
            unregister::<A>();
            unregister::<Flex>();
            for (a, b) in y0.iter().zip(&y1).chain(g0.iter().zip(&g1)) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "{rows} rows: {a} vs {b}"
                );
            }
        }
    }
}
