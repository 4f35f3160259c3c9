//! [`Nf4Backend`] for burn's fusion backend (the default `Cuda` type): each kernel is registered
//! as a custom operation that runs the inner backend's kernel on the materialised inputs.

use std::marker::PhantomData;

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::{Nf4Backend, Nf4Meta, Nf4Parts};

/// One NF4 kernel call recorded in a fusion stream.
#[derive(Debug)]
struct Nf4Op<B> {
    desc: CustomOpIr,
    meta: Nf4Meta,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + Nf4Backend> Operation<B::FusionRuntime> for Nf4Op<B> {
    fn execute(&self, h: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        // Inputs: [x,] words, absmax, scale_words, scale_map, code.
        let gemv = inputs.len() == 6;
        let first = usize::from(gemv);
        let float = |h: &mut HandleContainer<_>, i: usize| {
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(
                h.get_float_tensor::<B>(&inputs[first + i]),
            ))
        };
        let int = |h: &mut HandleContainer<_>, i: usize| {
            Tensor::<B, 1, Int>::from_primitive(h.get_int_tensor::<B>(&inputs[first + i]))
        };
        let parts = Nf4Parts {
            words: int(h, 0),
            absmax: float(h, 1),
            scale_words: int(h, 2),
            scale_map: float(h, 3),
            code: float(h, 4),
            meta: self.meta,
        };
        let out = if gemv {
            let x = h.get_float_tensor::<B>(&inputs[0]);
            B::nf4_gemv(Tensor::from_primitive(TensorPrimitive::Float(x)), &parts)
        } else {
            B::nf4_dequantize(&parts)
        };
        h.register_float_tensor::<B>(&self.desc.outputs[0].id, out.into_primitive().tensor());
    }
}

/// Records an NF4 kernel (`x` given: the GEMV, else the dequantization) with output `shape`.
fn record<B: FusionBackend + Nf4Backend>(
    x: Option<FusionTensor<B::FusionRuntime>>,
    w: &Nf4Parts<Fusion<B>>,
    shape: [usize; 2],
) -> FusionTensor<B::FusionRuntime> {
    let float = |t: &Tensor<Fusion<B>, 1>| t.clone().into_primitive().tensor();
    let parts = [
        w.words.clone().into_primitive(),
        float(&w.absmax),
        w.scale_words.clone().into_primitive(),
        float(&w.scale_map),
        float(&w.code),
    ];
    let inputs: Vec<FusionTensor<B::FusionRuntime>> = x.into_iter().chain(parts).collect();
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let out = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::new(shape),
        w.meta.compute,
    );
    let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new("nf4", &irs, &[out]);
    let op = Nf4Op::<B> {
        desc: desc.clone(),
        meta: w.meta,
        _backend: PhantomData,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .output()
}

impl<B: FusionBackend + Nf4Backend> Nf4Backend for Fusion<B> {
    fn nf4_dequantize(w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        let out = record::<B>(None, w, [w.meta.d_out, w.meta.d_in]);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn nf4_gemv(x: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        let rows = x.dims()[0];
        let x = x.cast(w.meta.compute).into_primitive().tensor();
        let out = record::<B>(Some(x), w, [rows, w.meta.d_out]);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
