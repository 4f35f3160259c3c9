//! Layer recomputation (`train.gradient_checkpointing = "layers"`, what HF's gradient
//! checkpointing does): the decoder layers run forward without an autodiff graph, keeping only
//! each layer's input; the backward pass then re-runs one layer at a time on a fresh graph,
//! from the last layer down, and back-propagates it at once. The step's activation memory is
//! one layer's graph plus one [B, T, H] input per layer, instead of every layer's graph.
//!
//! Three graphs take part: the prefix (embeddings, and the vision tower when it runs), each
//! layer's re-run, and the head (final norm, LM head, loss) from a leaf on the last layer's
//! output. The gradient of each graph's output is the next one's seed: the head gives d(last),
//! re-running layer i with `sum(y_i · dy_i)` gives dx_i = dy_{i-1}, and the prefix ends with
//! `sum(embeds · dx_0)`. Each layer's share of the load-balancing loss is added to its re-run,
//! since its router probabilities only exist there. Dropout masks are reproduced by seeding the
//! backend before a layer's forward and again before its re-run.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;

use crate::adapter::AdapterStats;
use crate::error::Result;
use crate::model::attention::causal_padding_mask;
use crate::model::params::count_trainable;
use crate::model::qwen3_vl::flat_rows;
use crate::model::vision::VisionOutput;
use crate::model::{ModelInputs, Qwen3VlModel};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// A forward pass of layer recomputation, ready for its backward pass.
pub struct RecomputedPass<B: AutodiffBackend> {
    /// Logits of the requested rows [1, rows, V] (f32), on the head's graph.
    pub logits: Tensor<B, 3>,
    /// `aux_loss_coef` × the mean load-balancing loss (None without MoE-LoRA): a value only,
    /// its gradient is formed in the re-runs.
    pub aux_loss: Option<Tensor<Inner<B>, 1>>,
    /// Tokens routed to each expert, summed over the MoE-LoRA layers.
    pub expert_tokens: Vec<usize>,
    /// Vision tower outputs, when it ran.
    pub vision: Option<VisionOutput<B>>,
    /// Leaf of the head's graph: the last layer's output [B, T, H].
    last: Tensor<B, 3>,
    /// Input of each decoder layer [B, T, H].
    layer_inputs: Vec<Tensor<Inner<B>, 3>>,
    /// The prefix graph's outputs: embeddings [B, T, H] and DeepStack features [N_vis, H].
    embeds: Tensor<B, 3>,
    deepstack: Vec<Tensor<B, 2>>,
    /// Whether the embeddings and the DeepStack features carry a gradient (a trainable
    /// embedding; a vision tower that ran with trainable weights). Tensors do not say so
    /// themselves: burn's `is_require_grad` is true for leaves only.
    embeds_tracked: bool,
    deepstack_tracked: bool,
    /// Visual index of each of the B·T positions (0 = text).
    visual_index: Option<Tensor<B, 1, Int>>,
    /// Router statistics of the prefix (vision-tower adapters), with their gradient.
    prefix_stats: AdapterStats<B>,
    /// Rotary tables [B, 1, T, d] and attention mask [B, 1, T, T] (constants).
    rope: (Tensor<B, 4>, Tensor<B, 4>),
    mask: Tensor<B, 4, Bool>,
    /// MoE layers of the whole model (each layer's aux share is out of this many).
    moe_layers: usize,
    /// Seed of the micro-batch; layer i's dropout uses `layer_seed(seed, i)`.
    seed: u64,
}

/// Seed of decoder layer `layer`'s dropout in the micro-batch seeded with `seed`.
fn layer_seed(seed: u64, layer: usize) -> u64 {
    let mut z = seed ^ (layer as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z ^ (z >> 29)
}

impl<B: AutodiffBackend> RecomputedPass<B> {
    /// Runs `model` on `inputs` and keeps what the backward pass needs; the logits are those of
    /// `rows` of the flattened [B·T] positions (at least one). `seed`: the micro-batch's.
    pub fn forward(
        model: &Qwen3VlModel<B>,
        inputs: &ModelInputs<B>,
        rows: &[i64],
        seed: u64,
    ) -> Result<Self> {
        let e = model.embed(inputs, false)?;
        let (b, t) = (inputs.batch, inputs.len);
        let device = model.device();
        if e.vision.is_some() {
            // The vision tower ran (a frozen tower keeps no graph): free its activations'
            // exact-size allocations now, or they stay reserved next to the decoder's
            // (`train::memory`); the decoder's are allocated again after this.
            B::memory_cleanup(&device);
        }
        let rope = model.rotary_tables(&e.positions, e.embeds.dtype());
        let mask = causal_padding_mask::<B>(inputs.attention_mask.as_deref(), b, t, &device);
        let vision_tracked = e.vision.is_some() && count_trainable(&model.visual) > 0;
        let embeds_tracked =
            vision_tracked || count_trainable(&model.language_model.embed_tokens) > 0;
        let (deepstack, visual_index) = match e.deepstack {
            Some(d) => (d.features, Some(d.index)),
            None => (Vec::new(), None),
        };

        // The decoder on the inner backend: no graph; each layer's input is kept.
        let text = model.language_model.valid();
        let (cos, sin) = (rope.0.clone().inner(), rope.1.clone().inner());
        let inner_mask = mask.clone().inner();
        let inner_index = visual_index.clone().map(|i| i.inner());
        let stats = AdapterStats::training_without_autodiff();
        let n_layers = text.layers.len();
        let mut x = e.embeds.clone().inner();
        let mut layer_inputs = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            Inner::<B>::seed(&device, layer_seed(seed, i));
            layer_inputs.push(x.clone());
            let tap = deepstack.get(i).map(|f| f.clone().inner());
            let tap = tap.zip(inner_index.as_ref());
            x = text.layer_step(i, x, (&cos, &sin), Some(inner_mask.clone()), tap, &stats);
        }

        let moe_layers = e.stats.len() + stats.len();
        let prefix_aux = e.stats.aux_loss_share(moe_layers).map(|a| a.inner());
        let aux_loss = sum_some(prefix_aux, stats.aux_loss_share(moe_layers))
            .map(|a| a.mul_scalar(model.meta.aux_loss_coef));
        let expert_tokens = add_counts(e.stats.expert_tokens(), stats.expert_tokens());

        // The head, from a leaf on the last layer's output.
        let last = Tensor::<B, 3>::from_inner(x).require_grad();
        let hidden = model.language_model.norm.forward(last.clone());
        let logits = model.lm_logits(flat_rows(hidden, rows).unsqueeze());
        Ok(Self {
            logits,
            aux_loss,
            expert_tokens,
            vision: e.vision,
            last,
            layer_inputs,
            embeds: e.embeds,
            deepstack,
            embeds_tracked,
            deepstack_tracked: vision_tracked,
            visual_index,
            prefix_stats: e.stats,
            rope,
            mask,
            moe_layers,
            seed,
        })
    }

    /// Back-propagates `loss` (formed from [`Self::logits`]; None when it is a constant, as
    /// with no target rows) and `aux_scale` × [`Self::aux_loss`] through the whole model,
    /// re-running each decoder layer; returns every parameter's gradient. `aux_scale` is the
    /// factor `loss` was multiplied by (loss scale, averaging).
    pub fn backward(
        mut self,
        model: &Qwen3VlModel<B>,
        loss: Option<Tensor<B, 1>>,
        aux_scale: f64,
    ) -> GradientsParams {
        let mut acc = GradientsParams::new();
        // Head: d(last).
        let mut dy = None;
        if let Some(loss) = loss {
            let mut grads = loss.backward();
            dy = self.last.grad_remove(&mut grads);
            take_grads(&mut grads, model, &mut acc);
        }

        let aux_coef = aux_scale * model.meta.aux_loss_coef;
        let text = &model.language_model;
        let device = model.device();
        let mut d_deepstack: Vec<Option<Tensor<Inner<B>, 2>>> = vec![None; self.deepstack.len()];
        let (cos, sin) = (&self.rope.0, &self.rope.1);
        for i in (0..text.layers.len()).rev() {
            let input = self.layer_inputs.pop().expect("one input per layer");
            let x = Tensor::<B, 3>::from_inner(input);
            let x_tracked = i > 0 || self.embeds_tracked;
            let x = if x_tracked { x.require_grad() } else { x };
            // A tracked DeepStack feature becomes a leaf of this re-run, to collect its gradient.
            let tap = self.deepstack.get(i).map(|f| match self.deepstack_tracked {
                true => Tensor::from_inner(f.clone().inner()).require_grad(),
                false => f.clone(),
            });
            let tracked = x_tracked
                || (tap.is_some() && self.deepstack_tracked)
                || count_trainable(&text.layers[i]) > 0;
            let stats = AdapterStats::new();
            B::seed(&device, layer_seed(self.seed, i));
            let index = self.visual_index.as_ref();
            let y = text.layer_step(
                i,
                x.clone(),
                (cos, sin),
                Some(self.mask.clone()),
                tap.clone().zip(index),
                &stats,
            );
            let seeded = dy.take().map(|d| dot(y, Tensor::from_inner(d)));
            // Router probabilities always carry a gradient (the router is trained).
            let aux = stats
                .aux_loss_share(self.moe_layers)
                .filter(|_| aux_coef != 0.0)
                .map(|a| a.mul_scalar(aux_coef));
            let root = match aux {
                Some(_) => sum_some(seeded, aux),
                None => seeded.filter(|_| tracked),
            };
            let Some(root) = root else {
                continue;
            };
            let mut grads = root.backward();
            dy = x.grad_remove(&mut grads);
            if let Some(f) = tap.filter(|_| self.deepstack_tracked) {
                d_deepstack[i] = f.grad_remove(&mut grads);
            }
            take_grads(&mut grads, &text.layers[i], &mut acc);
        }

        // Prefix: the embeddings' and DeepStack features' gradients, plus the vision
        // adapters' aux share.
        let mut root = dy
            .filter(|_| self.embeds_tracked)
            .map(|d| dot(self.embeds.clone(), Tensor::from_inner(d)));
        for (f, d) in self.deepstack.iter().zip(d_deepstack) {
            if let Some(d) = d {
                root = sum_some(root, Some(dot(f.clone(), Tensor::from_inner(d))));
            }
        }
        let aux = self
            .prefix_stats
            .aux_loss_share(self.moe_layers)
            .filter(|_| aux_coef != 0.0)
            .map(|a| a.mul_scalar(aux_coef));
        // The vision adapters' router probabilities carry a gradient (they are trained).
        if let Some(root) = sum_some(root, aux) {
            let mut grads = root.backward();
            take_grads(&mut grads, model, &mut acc);
        }
        acc
    }
}

/// `Σ a·b` in f32, whose gradient with respect to `a` is `b`.
fn dot<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, 1> {
    (a * b).sum().cast(DType::F32)
}

/// The sum of whichever of `a` and `b` there are.
fn sum_some<B: Backend>(a: Option<Tensor<B, 1>>, b: Option<Tensor<B, 1>>) -> Option<Tensor<B, 1>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Element-wise sum of two per-expert token counts of possibly different lengths.
fn add_counts(a: Vec<usize>, b: Vec<usize>) -> Vec<usize> {
    let (mut long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    long.iter_mut().zip(short).for_each(|(l, s)| *l += s);
    long
}

/// Moves the gradients of `module`'s parameters out of `grads` into `acc`, adding to any
/// gradient already there (a weight used by two graphs, such as a tied embedding).
fn take_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    grads: &mut B::Gradients,
    module: &M,
    acc: &mut GradientsParams,
) {
    struct Take<'a, B: AutodiffBackend> {
        grads: &'a mut B::Gradients,
        acc: &'a mut GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = param.val().grad_remove(self.grads) {
                let g = match self.acc.remove::<Inner<B>, D>(param.id) {
                    Some(old) => old + g,
                    None => g,
                };
                self.acc.register(param.id, g);
            }
        }
    }
    module.visit(&mut Take::<B> { grads, acc });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::inject::inject;
    use crate::adapter::{AdapterConfig, AdapterKind};
    use crate::checkpoint::{load_model, WeightDType};
    use crate::cli::forward::read_inputs;
    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, ModuleMapper};
    use burn::tensor::Distribution;
    use std::path::Path;

    type Ad = Autodiff<Flex>;

    /// The tiny fixture model with MoE-LoRA (or LoRA) on decoder and vision-tower layers,
    /// adapter weights randomised (B starts at zero, which would hide A's gradient), and its
    /// fixture inputs (one image, so DeepStack features take part).
    fn adapted(kind: AdapterKind, dropout: f64) -> (Qwen3VlModel<Ad>, ModelInputs<Ad>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
        let dev = Default::default();
        let (_, model) =
            load_model::<Ad>(&dir.join("tiny-qwen3-vl"), &dev, WeightDType::F32).unwrap();
        let cfg = AdapterConfig {
            kind,
            r: 2,
            alpha: 4.0,
            dropout,
            experts: 3,
            top_k: 2,
            renormalize: false,
            router_dropout: dropout,
            aux_loss_coef: 0.05,
            targets: ["q_proj", "v_proj", "down_proj", "linear_fc2"]
                .map(String::from)
                .to_vec(),
            layers: None,
        };
        let (model, wrapped) = inject(model, &cfg).unwrap();
        assert!(wrapped > 4);
        struct Randomize;
        impl ModuleMapper<Ad> for Randomize {
            fn map_float<const D: usize>(
                &mut self,
                p: Param<Tensor<Ad, D>>,
            ) -> Param<Tensor<Ad, D>> {
                if !p.val().is_require_grad() {
                    return p;
                }
                p.map(|t| {
                    let dist = Distribution::Uniform(-0.3, 0.3);
                    Tensor::random(t.shape(), dist, &t.device()).require_grad()
                })
            }
        }
        let model = model.map(&mut Randomize);
        let inputs = read_inputs::<Ad>(&dir.join("tiny-qwen3-vl-inputs.safetensors"), &dev);
        (model, inputs.unwrap())
    }

    /// A loss over some rows' logits (any smooth function of them will do).
    fn loss_of(logits: Tensor<Ad, 3>) -> Tensor<Ad, 1> {
        logits.powi_scalar(2).mean().mul_scalar(0.01)
    }

    /// Σ |a − b| / Σ |b| over every gradient of `want`, which must name the same parameters.
    fn compare(
        got: &mut GradientsParams,
        want: &mut GradientsParams,
        model: &Qwen3VlModel<Ad>,
    ) -> f64 {
        struct Cmp<'a> {
            got: &'a mut GradientsParams,
            want: &'a mut GradientsParams,
            diff: f64,
            norm: f64,
            count: usize,
        }
        impl ModuleVisitor<Ad> for Cmp<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Ad, D>>) {
                let g = self.got.remove::<Flex, D>(p.id);
                let w = self.want.remove::<Flex, D>(p.id);
                match (g, w) {
                    (Some(g), Some(w)) => {
                        self.diff += (g - w.clone()).abs().sum().into_scalar() as f64;
                        self.norm += w.abs().sum().into_scalar() as f64;
                        self.count += 1;
                    }
                    (None, None) => {}
                    (g, w) => panic!(
                        "gradient only on one side ({}, {}) of {:?}",
                        g.is_some(),
                        w.is_some(),
                        p.lazy_shape()
                    ),
                }
            }
        }
        let mut c = Cmp {
            got,
            want,
            diff: 0.0,
            norm: 0.0,
            count: 0,
        };
        model.visit(&mut c);
        assert!(c.count > 10, "{} gradients compared", c.count);
        assert!(c.norm > 0.0);
        c.diff / c.norm
    }

    /// The gradients of `factor` × (`loss_of` the logits of `rows` + the aux loss) for the
    /// micro-batch seeded with `seed`: by layer recomputation, or with the whole forward pass
    /// kept as one graph, each decoder layer seeded as the recomputed pass seeds it (what
    /// recomputation must reproduce, dropout included).
    fn gradients(
        recompute: bool,
        model: &Qwen3VlModel<Ad>,
        inputs: &ModelInputs<Ad>,
        rows: &[i64],
        seed: u64,
    ) -> GradientsParams {
        let factor = 3.0;
        let dev = model.device();
        Ad::seed(&dev, seed); // as the training step does
        if recompute {
            let pass = RecomputedPass::forward(model, inputs, rows, seed).unwrap();
            assert_eq!(pass.aux_loss.is_some(), model.meta.aux_loss_coef > 0.0);
            let loss = loss_of(pass.logits.clone()).mul_scalar(factor);
            return pass.backward(model, Some(loss), factor);
        }
        let e = model.embed(inputs, false).unwrap();
        let (b, t) = (inputs.batch, inputs.len);
        let (cos, sin) = model.rotary_tables(&e.positions, e.embeds.dtype());
        let mask = causal_padding_mask::<Ad>(inputs.attention_mask.as_deref(), b, t, &dev);
        let ds = e.deepstack.as_ref().expect("the fixture has an image");
        let mut x = e.embeds.clone();
        for i in 0..model.language_model.layers.len() {
            Ad::seed(&dev, layer_seed(seed, i));
            let tap = ds.features.get(i).map(|f| (f.clone(), &ds.index));
            let rope = (&cos, &sin);
            x = model
                .language_model
                .layer_step(i, x, rope, Some(mask.clone()), tap, &e.stats);
        }
        let hidden = model.language_model.norm.forward(x);
        let logits = model.lm_logits(flat_rows(hidden, rows).unsqueeze());
        let aux = e.stats.mean_aux_loss().unwrap();
        let loss = (loss_of(logits) + aux.mul_scalar(model.meta.aux_loss_coef)).mul_scalar(factor);
        GradientsParams::from_grads(loss.backward(), model)
    }

    /// burn-flex's random numbers come from one process-wide generator: another test drawing
    /// from it in parallel would change the masks between a layer's forward and its re-run.
    /// So the check runs alone, in a child process of this test binary.
    #[test]
    fn recomputed_gradients_match_one_graph_with_dropout() {
        let name = "train::recompute::tests::dropout_check_run_alone";
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

    #[test]
    #[ignore = "run alone by recomputed_gradients_match_one_graph_with_dropout"]
    fn dropout_check_run_alone() {
        let (model, inputs) = adapted(AdapterKind::Moelora, 0.3);
        let rows = [1, 5, 9];
        let mut want = gradients(false, &model, &inputs, &rows, 7);
        let mut got = gradients(true, &model, &inputs, &rows, 7);
        let err = compare(&mut got, &mut want, &model);
        assert!(err < 1e-5, "relative error {err}");
        // Another seed gives other dropout masks, hence other gradients: the check can fail.
        let mut other = gradients(true, &model, &inputs, &rows, 8);
        let mut want = gradients(false, &model, &inputs, &rows, 7);
        let err = compare(&mut other, &mut want, &model);
        assert!(err > 1e-3, "relative error {err}");
    }

    /// Without dropout the recomputed pass gives the model's own `forward_rows` gradients.
    #[test]
    fn recomputed_gradients_match_the_model_forward() {
        for kind in [AdapterKind::Lora, AdapterKind::Moelora] {
            let (model, inputs) = adapted(kind, 0.0);
            let rows = [0, 4, 7, 11];
            let out = model.forward_rows(&inputs, &rows).unwrap();
            let mut loss = loss_of(out.logits);
            if let Some(aux) = out.aux_loss {
                loss = loss + aux;
            }
            let grads = loss.mul_scalar(3.0).backward(); // the factor `gradients` uses
            let mut want = GradientsParams::from_grads(grads, &model);
            let mut got = gradients(true, &model, &inputs, &rows, 1);
            let err = compare(&mut got, &mut want, &model);
            assert!(err < 1e-5, "{kind:?}: relative error {err}");
        }
    }
}
