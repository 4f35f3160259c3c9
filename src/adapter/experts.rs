//! The two products of a MoE-LoRA layer as tensor ops: the router's logits and the experts'
//! update added to the base output. `quant::kernels::expert_step` runs the same math as one
//! autodiff step each (with a closed-form backward) where it is registered; these are the
//! reference and the path of every other backend.

use burn::prelude::*;
use burn::tensor::DType;

/// What the experts' step reads.
#[derive(Debug, Clone)]
pub struct ExpertInputs<B: Backend> {
    /// The base layer's output [N, out] (compute dtype).
    pub y: Tensor<B, 2>,
    /// The layer input [N, in] (compute dtype).
    pub x: Tensor<B, 2>,
    /// The experts' dropout keep mask [N, in] (0 or 1, compute dtype, constant), if any: its
    /// 1/keep rides on the gates.
    pub mask: Option<Tensor<B, 2>>,
    /// Expert A matrices [E, r, in] (f32).
    pub a: Tensor<B, 3>,
    /// Expert B matrices [E, out, r] (f32).
    pub b: Tensor<B, 3>,
    /// Each token's gate per expert [N, E] (f32, the LoRA scaling folded in; 0 where the
    /// token did not choose the expert).
    pub gate: Tensor<B, 2>,
}

/// The router's logits [N, E] (f32): `(x · mask) · routerᵀ` in f32, where `mask` [N, in] (f32,
/// constant) is the router's dropout mask with its 1/keep folded in.
pub fn router_logits_ops<B: Backend>(
    x: Tensor<B, 2>,
    router: Tensor<B, 2>,
    mask: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let x = x.cast(DType::F32);
    let x = match mask {
        Some(m) => x * m,
        None => x,
    };
    x.matmul(router.transpose())
}

/// `y + ((x · mask) · [A_1; …; A_E]ᵀ ⊙ gate) · [B_1ᵀ; …; B_Eᵀ]` [N, out]: all experts as one
/// pair of matmuls over every token, each expert's r columns scaled by the token's gate.
pub fn add_experts_ops<B: Backend>(i: ExpertInputs<B>) -> Tensor<B, 2> {
    let [e, r, d_in] = i.a.dims();
    let [_, d_out, _] = i.b.dims();
    let n = i.x.dims()[0];
    let dtype = i.x.dtype();
    let x = match i.mask {
        Some(m) => i.x * m,
        None => i.x,
    };
    let a = i.a.reshape([e * r, d_in]).cast(dtype); // [E·r, in]
    let b = i.b.cast(dtype).swap_dims(1, 2).reshape([e * r, d_out]); // [E·r, out]
                                                                     // [N, E·r] viewed as [N, E, r] times the gate broadcast over r (no expanded copy).
    let gate = i.gate.cast(dtype).unsqueeze_dim::<3>(2); // [N, E, 1]
    let h = x.matmul(a.transpose()).reshape([n, e, r]) * gate;
    i.y + h.reshape([n, e * r]).matmul(b)
}
