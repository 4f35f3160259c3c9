//! LoRA and Mixture-of-Experts LoRA adapters on the model's frozen linear layers.
//!
//! * [`Projection`]: a targetable linear layer of the model — plain, [`LoraLinear`] or
//!   [`MoeLoraLinear`].
//! * [`inject`]: wraps the layers named by an [`AdapterConfig`] and freezes everything else.
//! * [`peft`]: PEFT-compatible `adapter_model.safetensors` + `adapter_config.json`.

pub mod config;
pub mod experts;
pub mod inject;
pub mod lora;
pub mod merge;
pub mod moe_lora;
pub mod peft;
pub mod routing;

use std::cell::RefCell;

use burn::module::Module;
use burn::nn::Dropout;
use burn::prelude::*;
use burn::tensor::{DType, Distribution};

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

/// Router statistics gathered during one forward pass, per MoE layer: the tokens routed to
/// each expert and the mean router probability of each expert. The load-balancing loss of all
/// layers is formed from them once, at the end of the pass (a handful of kernels instead of
/// several per layer). Also says whether the pass applies adapter dropout.
#[derive(Debug, Default)]
pub struct AdapterStats<B: Backend> {
    layers: RefCell<Vec<LayerRouting<B>>>,
    /// Apply dropout even without autodiff: the graph-free forward of layer recomputation,
    /// whose dropout masks the backward pass's re-run must reproduce.
    dropout_without_autodiff: bool,
}

/// One MoE layer's routing: tokens per expert [E] (constant), mean probability per expert [E]
/// (with its gradient), and routed slots N·k.
type LayerRouting<B> = (Tensor<B, 1>, Tensor<B, 1>, usize);

impl<B: Backend> AdapterStats<B> {
    /// Empty statistics; dropout applies when autodiff is on (training).
    pub fn new() -> Self {
        Self {
            layers: RefCell::new(Vec::new()),
            dropout_without_autodiff: false,
        }
    }

    /// Empty statistics of a training pass that runs without autodiff (dropout applies).
    pub fn training_without_autodiff() -> Self {
        Self {
            dropout_without_autodiff: true,
            ..Self::new()
        }
    }

    /// Adapter dropout with `d`'s probability, where this pass trains: the inputs scaled by
    /// 1/keep where a Bernoulli(keep) mask is 1, else 0 (burn's `Dropout`, which only
    /// checks for autodiff).
    pub fn dropout<const D: usize>(&self, d: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
        let (x, factor) = self.dropout_unscaled(d, x);
        if factor == 1.0 {
            x
        } else {
            x.mul_scalar(factor)
        }
    }

    /// [`Self::dropout`] without its 1/keep scaling: the masked inputs and the factor (1/keep,
    /// or 1 where no dropout applies) for the caller to fold into a scaling it applies anyway
    /// (one launch fewer per layer: the training step is bound by launches).
    pub fn dropout_unscaled<const D: usize>(
        &self,
        d: &Dropout,
        x: Tensor<B, D>,
    ) -> (Tensor<B, D>, f64) {
        match self.dropout_mask(d, x.shape(), x.dtype(), &x.device()) {
            Some((mask, factor)) => (x * mask, factor),
            None => (x, 1.0),
        }
    }

    /// The keep mask (0 or 1, of `shape` and `dtype`) of dropout `d` and its factor 1/keep,
    /// where this pass trains and `d` drops anything; the same draw as [`Self::dropout`] on an
    /// input of that shape and dtype.
    pub fn dropout_mask<const D: usize>(
        &self,
        d: &Dropout,
        shape: impl Into<burn::tensor::Shape>,
        dtype: DType,
        device: &B::Device,
    ) -> Option<(Tensor<B, D>, f64)> {
        let training = self.dropout_without_autodiff || B::ad_enabled(device);
        if !training || d.prob == 0.0 {
            return None;
        }
        let keep = 1.0 - d.prob;
        let mask = Tensor::random(shape, Distribution::Bernoulli(keep), (device, dtype));
        Some((mask, 1.0 / keep))
    }

    /// MoE layers recorded so far.
    pub fn len(&self) -> usize {
        self.layers.borrow().len()
    }

    /// Whether no MoE layer was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records one MoE layer: tokens per expert `counts` [E] out of `slots` = N·k routed
    /// slots, and the mean router probability per expert `mean_probs` [E] (f32).
    pub fn record(&self, counts: Tensor<B, 1>, mean_probs: Tensor<B, 1>, slots: usize) {
        self.layers.borrow_mut().push((counts, mean_probs, slots));
    }

    /// Mean load-balancing loss over the MoE layers (None without MoE layers): per layer
    /// `E · Σ_i f_i · P_i` with `f_i` = counts / slots (constant) and `P_i` the mean
    /// probability (carries the gradient). Formed once from all layers' statistics.
    pub fn mean_aux_loss(&self) -> Option<Tensor<B, 1>> {
        self.aux_loss_share(self.len())
    }

    /// This pass's layers' share of the mean load-balancing loss over `total` MoE layers
    /// (which may include layers of other passes): `Σ_l E_l · Σ_i f_i · P_i / total`.
    pub fn aux_loss_share(&self, total: usize) -> Option<Tensor<B, 1>> {
        let layers = self.layers.borrow();
        let e_max = layers.iter().map(|(c, _, _)| c.dims()[0]).max()?;
        let (l, device) = (layers.len(), layers[0].0.device());
        // Each layer's weight E_l / (slots_l · total) turns its Σ counts·P into its share.
        let weights: Vec<f32> = layers
            .iter()
            .map(|(c, _, slots)| c.dims()[0] as f32 / (*slots as f32 * total as f32))
            .collect();
        let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [l]), &device);
        // counts, probs: [L, E_max], layers with fewer experts padded with zeros.
        let counts = stack_padded(layers.iter().map(|(c, _, _)| c.clone()), e_max);
        let probs = stack_padded(layers.iter().map(|(_, p, _)| p.clone()), e_max);
        Some((counts * probs * weights.reshape([l, 1])).sum())
    }

    /// Tokens routed to each expert, summed over the MoE layers (layers with fewer experts
    /// count towards the first ones). One read from the device.
    pub fn expert_tokens(&self) -> Vec<usize> {
        let layers = self.layers.borrow();
        let Some(e_max) = layers.iter().map(|(c, _, _)| c.dims()[0]).max() else {
            return Vec::new();
        };
        let total: Vec<f32> = stack_padded(layers.iter().map(|(c, _, _)| c.clone()), e_max)
            .sum_dim(0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        total.iter().map(|&t| t.round() as usize).collect()
    }
}

/// Stacks per-layer vectors [E_l] as f32 rows [L, width], zero-padding the shorter ones.
fn stack_padded<B: Backend>(
    rows: impl Iterator<Item = Tensor<B, 1>>,
    width: usize,
) -> Tensor<B, 2> {
    let padded = rows
        .map(|r| {
            let (e, device) = (r.dims()[0], r.device());
            let r = r.cast(DType::F32);
            match width - e {
                0 => r,
                pad => Tensor::cat(vec![r, Tensor::zeros([pad], (&device, DType::F32))], 0),
            }
        })
        .collect();
    Tensor::stack(padded, 0)
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
            Projection::Lora(l) => l.forward(x, stats),
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

/// Test helpers shared by the crate's tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Runs the `#[ignore]`d test `name` of this test binary alone in a child process and
    /// asserts that it passed. burn-flex's random numbers come from one process-wide
    /// generator, so a test that seeds it and replays the draws must not share the process
    /// with tests drawing in parallel.
    pub fn run_alone(name: &str) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                name,
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(log.contains("1 passed"), "the check did not run: {log}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn t(v: &[f32]) -> Tensor<Flex, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    #[test]
    fn aux_loss_is_the_mean_of_each_layers_loss() {
        // Layer 1: 6 slots, counts (4, 2), P (0.7, 0.3): 2·(4/6·0.7 + 2/6·0.3) = 1.133…
        // Layer 2: 4 slots, counts (1, 3), P (0.2, 0.8): 2·(1/4·0.2 + 3/4·0.8) = 1.3
        let s = AdapterStats::<Flex>::new();
        s.record(t(&[4.0, 2.0]), t(&[0.7, 0.3]), 6);
        s.record(t(&[1.0, 3.0]), t(&[0.2, 0.8]), 4);
        let want = (2.0 * (4.0 / 6.0 * 0.7 + 2.0 / 6.0 * 0.3) + 1.3) / 2.0;
        let got = s.mean_aux_loss().unwrap().into_scalar();
        assert!((got - want as f32).abs() < 1e-6, "{got} vs {want}");
        assert_eq!(s.expert_tokens(), vec![5, 5]);
        // A layer with 3 experts: each layer's loss uses its own expert count.
        s.record(t(&[3.0, 0.0, 0.0]), t(&[0.5, 0.25, 0.25]), 3);
        let third = 3.0 * 0.5;
        let want = (2.0 * (4.0 / 6.0 * 0.7 + 2.0 / 6.0 * 0.3) + 1.3 + third) / 3.0;
        let got = s.mean_aux_loss().unwrap().into_scalar();
        assert!((got - want as f32).abs() < 1e-6, "{got} vs {want}");
        assert_eq!(s.expert_tokens(), vec![8, 5, 0]);
        assert!(AdapterStats::<Flex>::new().mean_aux_loss().is_none());
    }
}
