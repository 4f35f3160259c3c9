//! LoRA and Mixture-of-Experts LoRA adapters on the model's frozen linear layers.
//!
//! * [`Projection`]: a targetable linear layer of the model — plain, [`LoraLinear`] or
//!   [`MoeLoraLinear`].
//! * [`inject`]: wraps the layers named by an [`AdapterConfig`] and freezes everything else.
//! * [`peft`]: PEFT-compatible `adapter_model.safetensors` + `adapter_config.json`.

pub mod config;
pub mod inject;
pub mod lora;
pub mod merge;
pub mod moe_lora;
pub mod peft;

use std::cell::RefCell;

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;

pub use config::{AdapterConfig, AdapterKind};
pub use lora::LoraLinear;
pub use moe_lora::{MoeLoraLinear, MoeLoraOptions};

use crate::model::layers::Linear;
use crate::quant::Nf4Linear;

/// Marks every float parameter of `module` as not trainable, without materialising lazy
/// parameters (burn's `no_grad` initialises them, i.e. allocates a whole 4B model).
pub fn freeze<B: Backend, M: Module<B>>(module: M) -> M {
    struct Freeze;
    impl<B: Backend> burn::module::ModuleMapper<B> for Freeze {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            param.set_require_grad(false)
        }
    }
    module.map(&mut Freeze)
}

/// Whether the parameter named `name` (HF-style path) belongs to an adapter: LoRA's
/// `lora_a`/`lora_b`, MoE-LoRA's `router`/`experts_a`/`experts_b`.
pub fn is_adapter_param(name: &str) -> bool {
    ["lora_a", "lora_b", "router", "experts_a", "experts_b"]
        .iter()
        .any(|k| name.ends_with(k) || name.contains(&format!(".{k}.")))
}

/// A frozen base layer an adapter can wrap: dense f32/f16/bf16 weights ([`Linear`]) or the
/// packed NF4 weight ([`Nf4Linear`]).
pub trait FrozenLinear<B: Backend>: Module<B> + core::fmt::Debug {
    /// `x · Wᵀ + b` on the last dimension.
    fn forward_frozen<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
    /// Input width.
    fn d_in(&self) -> usize;
    /// Output width.
    fn d_out(&self) -> usize;
    /// Device of the weights (without materialising lazy ones).
    fn device(&self) -> B::Device;
}

impl<B: Backend> FrozenLinear<B> for Linear<B> {
    fn forward_frozen<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward(x)
    }
    fn d_in(&self) -> usize {
        Linear::d_in(self)
    }
    fn d_out(&self) -> usize {
        Linear::d_out(self)
    }
    fn device(&self) -> B::Device {
        self.weight.lazy_device()
    }
}

/// Router statistics gathered during one forward pass: each MoE layer's load-balancing loss
/// and its per-expert token counts.
#[derive(Debug, Default)]
pub struct AdapterStats<B: Backend> {
    aux: RefCell<Vec<Tensor<B, 1>>>,
    counts: RefCell<Vec<Tensor<B, 1>>>,
}

impl<B: Backend> AdapterStats<B> {
    /// Empty statistics.
    pub fn new() -> Self {
        Self {
            aux: RefCell::new(Vec::new()),
            counts: RefCell::new(Vec::new()),
        }
    }

    /// Records one MoE layer's loss and token counts per expert ([E], on the device).
    pub fn record(&self, aux: Tensor<B, 1>, counts: Tensor<B, 1>) {
        self.aux.borrow_mut().push(aux);
        self.counts.borrow_mut().push(counts);
    }

    /// Mean load-balancing loss over the MoE layers (None without MoE layers).
    pub fn mean_aux_loss(&self) -> Option<Tensor<B, 1>> {
        let aux = self.aux.borrow();
        if aux.is_empty() {
            return None;
        }
        Some(Tensor::cat(aux.clone(), 0).mean())
    }

    /// Tokens routed to each expert, summed over the MoE layers (layers with fewer experts
    /// count towards the first ones). One read from the device.
    pub fn expert_tokens(&self) -> Vec<usize> {
        let counts = self.counts.borrow();
        let Some(n) = counts.iter().map(|c| c.dims()[0]).max() else {
            return Vec::new();
        };
        let padded: Vec<Tensor<B, 1>> = counts
            .iter()
            .map(|c| {
                let (e, device) = (c.dims()[0], c.device());
                let c = c.clone().cast(DType::F32);
                match n - e {
                    0 => c,
                    pad => Tensor::cat(vec![c, Tensor::zeros([pad], (&device, DType::F32))], 0),
                }
            })
            .collect();
        let total: Vec<f32> = Tensor::stack::<2>(padded, 0)
            .sum_dim(0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        total.iter().map(|&t| t.round() as usize).collect()
    }
}

/// The weight under a projection: dense (trainable when no adapter wraps it) or NF4-packed.
#[derive(Module, Debug)]
pub enum BaseLinear<B: Backend> {
    /// Dense f32/f16/bf16 weight.
    Dense(Linear<B>),
    /// Frozen 4-bit weight.
    Nf4(Nf4Linear<B>),
}

impl<B: Backend> BaseLinear<B> {
    /// The dense layer (None when the weight is NF4).
    pub fn dense(&self) -> Option<&Linear<B>> {
        match self {
            BaseLinear::Dense(l) => Some(l),
            BaseLinear::Nf4(_) => None,
        }
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        FrozenLinear::d_in(self)
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        FrozenLinear::d_out(self)
    }
}

impl<B: Backend> FrozenLinear<B> for BaseLinear<B> {
    fn forward_frozen<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            BaseLinear::Dense(l) => l.forward(x),
            BaseLinear::Nf4(l) => l.forward(x),
        }
    }
    fn d_in(&self) -> usize {
        match self {
            BaseLinear::Dense(l) => l.d_in(),
            BaseLinear::Nf4(l) => l.d_in,
        }
    }
    fn d_out(&self) -> usize {
        match self {
            BaseLinear::Dense(l) => l.d_out(),
            BaseLinear::Nf4(l) => l.d_out,
        }
    }
    fn device(&self) -> B::Device {
        match self {
            BaseLinear::Dense(l) => FrozenLinear::device(l),
            BaseLinear::Nf4(l) => FrozenLinear::device(l),
        }
    }
}

/// A linear layer adapters can target.
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    /// No adapter.
    Plain(BaseLinear<B>),
    /// LoRA.
    Lora(LoraLinear<B, BaseLinear<B>>),
    /// Mixture of LoRA experts.
    MoeLora(MoeLoraLinear<B, BaseLinear<B>>),
}

impl<B: Backend> Projection<B> {
    /// A plain, lazily initialised dense layer.
    pub fn init(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        Projection::Plain(BaseLinear::Dense(Linear::init(d_in, d_out, bias, device)))
    }

    /// The frozen base layer.
    pub fn base(&self) -> &BaseLinear<B> {
        match self {
            Projection::Plain(l) => l,
            Projection::Lora(l) => &l.base,
            Projection::MoeLora(l) => &l.base,
        }
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.base().d_in()
    }

    /// Applies the layer (and its adapter) to the last dimension of `x`.
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        stats: &AdapterStats<B>,
    ) -> Tensor<B, D> {
        match self {
            Projection::Plain(l) => l.forward_frozen(x),
            Projection::Lora(l) => l.forward(x),
            Projection::MoeLora(l) => l.forward(x, stats),
        }
    }

    /// Trainable adapter parameters of this layer.
    pub fn adapter_params(&self) -> usize {
        use crate::model::params::count_params;
        match self {
            Projection::Plain(_) => 0,
            Projection::Lora(l) => count_params(&l.lora_a) + count_params(&l.lora_b),
            Projection::MoeLora(l) => {
                count_params(&l.router) + count_params(&l.experts_a) + count_params(&l.experts_b)
            }
        }
    }
}
