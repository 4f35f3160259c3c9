//! Layer recomputation (`train.gradient_checkpointing = "layers"`, what HF's gradient
//! checkpointing does): the decoder layers run forward without an autodiff graph, keeping only
//! each layer's input; the backward pass then re-runs one layer at a time on a fresh graph,
//! from the last layer down, and back-propagates it at once. The step's activation memory is
//! one layer's graph plus one [B, T, H] input per layer, instead of every layer's graph.
//!
//! Several graphs take part: the prefix (embeddings, and the vision tower when it runs), each
//! layer's re-run, the final norm of the target rows from a leaf on the last layer's output,
//! and the LM head with the loss, in chunks of target rows (its f32 logits over the vocabulary
//! are the step's largest tensors). The gradient of each graph's output is the next one's seed:
//! the head chunks give d(rows), the norm gives d(last), re-running layer i with
//! `sum(y_i · dy_i)` gives dx_i = dy_{i-1}, and the prefix ends with `sum(embeds · dx_0)`.
//! Each layer's share of the load-balancing loss is added to its re-run, since its router
//! probabilities only exist there. Dropout masks are reproduced by seeding the backend before
//! a layer's forward and again before its re-run.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use std::ops::Range;

use crate::adapter::AdapterStats;
use crate::error::Result;
use crate::model::attention::causal_padding_mask;
use crate::model::params::count_trainable;
use crate::model::qwen3_vl::flat_rows;
use crate::model::vision::VisionOutput;
use crate::model::{ModelInputs, Qwen3VlModel};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Largest f32 logits block [rows, V] of one head chunk (32 MiB: 55 rows of Qwen3's
/// 151,936-token vocabulary).
pub const HEAD_CHUNK_BYTES: usize = 32 << 20;

/// A forward pass of layer recomputation, ready for its backward pass.
pub struct RecomputedPass<B: AutodiffBackend> {
    /// The final-normed hidden state of the requested rows [rows, H], on a graph from `last`.
    rows: Tensor<B, 2>,
    /// The loss's gradient with respect to `rows`, once [`Self::head`] ran.
    d_rows: Option<Tensor<Inner<B>, 2>>,
    /// Gradients of the head's parameters (a trained LM head or tied embedding).
    head_grads: GradientsParams,
    /// `aux_loss_coef` × the mean load-balancing loss (None without MoE-LoRA): a value only,
    /// its gradient is formed in the re-runs.
    pub aux_loss: Option<Tensor<Inner<B>, 1>>,
    /// Tokens routed to each expert, summed over the MoE-LoRA layers.
    pub expert_tokens: Vec<usize>,
    /// Vision tower outputs, when it ran.
    pub vision: Option<VisionOutput<B>>,
    /// Leaf of the final norm's graph: the last layer's output [B, T, H].
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
    /// Runs `model` on `inputs` up to the final norm of `rows` of the flattened [B·T] positions
    /// (at least one) and keeps what the backward pass needs. `seed`: the micro-batch's.
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

        // The final norm of the rows, from a leaf on the last layer's output.
        let last = Tensor::<B, 3>::from_inner(x).require_grad();
        let hidden = model.language_model.norm.forward(last.clone());
        Ok(Self {
            rows: flat_rows(hidden, rows),
            d_rows: None,
            head_grads: GradientsParams::new(),
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

    /// The LM head and the loss, a chunk of rows at a time (at most `chunk_bytes` of f32
    /// logits): `loss_of(logits [rows, V], rows)` gives a chunk's share of the loss, which is
    /// back-propagated at once, times `factor` (loss scale, averaging). Returns the loss (the
    /// chunks' sum, a value); without this call the loss is taken as a constant.
    pub fn head(
        &mut self,
        model: &Qwen3VlModel<B>,
        factor: f64,
        chunk_bytes: usize,
        loss_of: impl Fn(Tensor<B, 2>, Range<usize>) -> Tensor<B, 1>,
    ) -> Tensor<Inner<B>, 1> {
        let [n, _] = self.rows.dims();
        let per_chunk = (chunk_bytes / (4 * model.meta.vocab_size)).max(1);
        let rows = self.rows.clone().inner();
        let mut loss = None;
        let mut d_rows = Vec::new();
        for start in (0..n).step_by(per_chunk) {
            let len = per_chunk.min(n - start);
            let leaf =
                Tensor::<B, 2>::from_inner(rows.clone().narrow(0, start, len)).require_grad();
            let logits = model
                .lm_logits(leaf.clone().unsqueeze())
                .squeeze_dim::<2>(0); // [len, V]
            let part = loss_of(logits, start..start + len);
            loss = sum_some(loss, Some(part.clone().inner()));
            let mut grads = part.mul_scalar(factor).backward();
            d_rows.push(
                leaf.grad_remove(&mut grads)
                    .expect("the rows are a leaf of the loss"),
            );
            take_grads(&mut grads, &model.lm_head, &mut self.head_grads);
            take_grads(
                &mut grads,
                &model.language_model.embed_tokens,
                &mut self.head_grads,
            );
        }
        self.d_rows = Some(Tensor::cat(d_rows, 0));
        loss.expect("at least one row")
    }

    /// Back-propagates the loss of [`Self::head`] and `aux_scale` × [`Self::aux_loss`] through
    /// the whole model, re-running each decoder layer; returns every parameter's gradient.
    /// `aux_scale` is the factor the head's loss was multiplied by (loss scale, averaging).
    pub fn backward(mut self, model: &Qwen3VlModel<B>, aux_scale: f64) -> GradientsParams {
        let mut acc = std::mem::take(&mut self.head_grads);
        // Final norm: d(last).
        let mut dy = None;
        if let Some(d) = self.d_rows.take() {
            let mut grads = dot(self.rows.clone(), Tensor::from_inner(d)).backward();
            dy = self.last.grad_remove(&mut grads);
            take_grads(&mut grads, &model.language_model.norm, &mut acc);
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

    /// A loss over some rows' logits [rows, V] (any smooth function that sums over rows).
    fn loss_of(logits: Tensor<Ad, 2>) -> Tensor<Ad, 1> {
        logits.powi_scalar(2).sum().mul_scalar(1e-4)
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

    /// A copy of every gradient `grads` holds for `model`'s parameters.
    fn copy_of(grads: &GradientsParams, model: &Qwen3VlModel<Ad>) -> GradientsParams {
        struct Copy<'a>(&'a GradientsParams, GradientsParams);
        impl ModuleVisitor<Ad> for Copy<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Ad, D>>) {
                if let Some(g) = self.0.get::<Flex, D>(p.id) {
                    self.1.register(p.id, g);
                }
            }
        }
        let mut c = Copy(grads, GradientsParams::new());
        model.visit(&mut c);
        c.1
    }

    /// The gradients of `factor` × (`loss_of` the logits of `rows` + the aux loss) for the
    /// micro-batch seeded with `seed`: by layer recomputation with head chunks of
    /// `recompute` bytes, or (None) with the whole forward pass kept as one graph, each decoder
    /// layer seeded as the recomputed pass seeds it (what recomputation must reproduce,
    /// dropout included).
    fn gradients(
        recompute: Option<usize>,
        model: &Qwen3VlModel<Ad>,
        inputs: &ModelInputs<Ad>,
        rows: &[i64],
        seed: u64,
    ) -> GradientsParams {
        let factor = 3.0;
        let dev = model.device();
        Ad::seed(&dev, seed); // as the training step does
        if let Some(chunk_bytes) = recompute {
            let mut pass = RecomputedPass::forward(model, inputs, rows, seed).unwrap();
            assert_eq!(pass.aux_loss.is_some(), model.meta.aux_loss_coef > 0.0);
            pass.head(model, factor, chunk_bytes, |logits, _| loss_of(logits));
            return pass.backward(model, factor);
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
        let logits = logits.squeeze_dim::<2>(0);
        let aux = e.stats.mean_aux_loss().unwrap();
        let loss = (loss_of(logits) + aux.mul_scalar(model.meta.aux_loss_coef)).mul_scalar(factor);
        GradientsParams::from_grads(loss.backward(), model)
    }

    /// burn-flex's random numbers come from one process-wide generator: another test drawing
    /// from it in parallel would change the masks between a layer's forward and its re-run.
    /// So the check runs alone, in a child process of this test binary.
    #[test]
    fn recomputed_gradients_match_one_graph_with_dropout() {
        crate::adapter::testing::run_alone("train::recompute::tests::dropout_check_run_alone");
    }

    #[test]
    #[ignore = "run alone by recomputed_gradients_match_one_graph_with_dropout"]
    fn dropout_check_run_alone() {
        let (model, inputs) = adapted(AdapterKind::Moelora, 0.3);
        let rows = [1, 5, 9];
        let mut want = gradients(None, &model, &inputs, &rows, 7);
        let mut got = gradients(Some(HEAD_CHUNK_BYTES), &model, &inputs, &rows, 7);
        let err = compare(&mut got, &mut want, &model);
        assert!(err < 1e-5, "relative error {err}");
        // Another seed gives other dropout masks, hence other gradients: the check can fail.
        let mut other = gradients(Some(HEAD_CHUNK_BYTES), &model, &inputs, &rows, 8);
        let mut want = gradients(None, &model, &inputs, &rows, 7);
        let err = compare(&mut other, &mut want, &model);
        assert!(err > 1e-3, "relative error {err}");
        // With MoE-LoRA's one-step router and experts (what training on a GPU registers), the
        // re-runs take the steps while the graph-free forward takes the tensor ops: the same
        // masks and gradients as the tensor ops in one graph (this process is alone: the
        // registry is process-wide).
        use crate::quant::kernels::{expert_step, routing};
        routing::register::<Ad>();
        expert_step::register::<Ad>();
        let mut got = gradients(Some(HEAD_CHUNK_BYTES), &model, &inputs, &rows, 7);
        let mut steps = gradients(None, &model, &inputs, &rows, 7);
        let mut want = gradients(None, &model, &inputs, &rows, 7);
        expert_step::unregister::<Ad>();
        let mut ops = gradients(None, &model, &inputs, &rows, 7);
        routing::unregister::<Ad>();
        let err = compare(&mut got, &mut want, &model);
        assert!(err < 1e-5, "steps, recomputed: relative error {err}");
        let err = compare(&mut steps, &mut ops, &model);
        assert!(
            err < 1e-5,
            "steps against the ops, one graph: relative error {err}"
        );
    }

    /// Without dropout the recomputed pass gives the model's own `forward_rows` gradients, with
    /// the head in one chunk or a row at a time.
    #[test]
    fn recomputed_gradients_match_the_model_forward() {
        for kind in [AdapterKind::Lora, AdapterKind::Moelora] {
            let (model, inputs) = adapted(kind, 0.0);
            let rows = [0, 4, 7, 11];
            let out = model.forward_rows(&inputs, &rows).unwrap();
            let mut loss = loss_of(out.logits.squeeze_dim::<2>(0));
            if let Some(aux) = out.aux_loss {
                loss = loss + aux;
            }
            let grads = loss.mul_scalar(3.0).backward(); // the factor `gradients` uses
            let want = GradientsParams::from_grads(grads, &model);
            for chunk_bytes in [HEAD_CHUNK_BYTES, 1] {
                let mut want = copy_of(&want, &model);
                let mut got = gradients(Some(chunk_bytes), &model, &inputs, &rows, 1);
                let err = compare(&mut got, &mut want, &model);
                assert!(
                    err < 1e-5,
                    "{kind:?}, chunks of {chunk_bytes} B: relative error {err}"
                );
            }
        }
    }
}
