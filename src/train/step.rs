//! The model as burn-train sees it: [`TrainModel`] wraps [`Qwen3VlModel`] and implements
//! `TrainStep` (forward, caption loss, backward of the scaled loss) and `InferenceStep`
//! (held-out loss), and overrides `optimize` for what burn 0.21 leaves to us: loss-scale
//! unscaling, global gradient-norm clipping, skipping non-finite steps, metrics rows, log lines
//! and step checkpoints.

use std::sync::Arc;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use burn::train::metric::ItemLazy;
use burn::train::{InferenceStep, TrainOutput, TrainStep};

use super::checkpoint::{save_checkpoint, CheckpointState};
use super::data::TrainBatch;
use super::grads::{apply_grad_factor, grad_sq_sum};
use super::memory::StepMemory;
use super::profile::PhaseClock;
use super::recompute::{RecomputedPass, HEAD_CHUNK_BYTES};
use super::state::{append_row, RunState, StepClaim, StepRow, Window};
use super::vision_cache::VisionCache;
use crate::error::Error;
use crate::model::vision::VisionOutput;
use crate::model::{ImageFeatures, ModelInputs, Qwen3VlModel};

/// The trained model plus the run's shared state.
#[derive(Module, Debug)]
pub struct TrainModel<B: Backend> {
    /// The network (with adapters when they are trained).
    pub model: Qwen3VlModel<B>,
    /// Settings, loss scaler, metrics.
    #[module(skip)]
    pub run: Arc<RunState>,
    /// The base model's config.json text (written with full-model checkpoints).
    #[module(skip)]
    pub config_json: Arc<String>,
    /// Vision features of the training images (frozen, un-adapted vision tower only).
    #[module(skip)]
    pub vision_cache: Option<Arc<VisionCache>>,
    /// How the step's device memory is allocated.
    #[module(skip)]
    pub step_memory: Arc<StepMemory>,
}

/// What one micro-batch reports to the metrics (already on the host).
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// LM loss + aux loss.
    pub loss: f64,
    /// Caption cross-entropy (mean over target tokens).
    pub lm_loss: f64,
    /// Weighted MoE load-balancing loss.
    pub aux_loss: f64,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Samples in the batch.
    pub samples: usize,
    /// Tokens routed to each expert.
    pub expert_tokens: Vec<usize>,
    /// Gradient norm of the last optimizer step.
    pub grad_norm: f64,
    /// Steps skipped so far.
    pub skipped: usize,
}

impl StepOutput {
    /// What `batch` reports before its step's figures are filled in: its losses (LM `lm`,
    /// weighted aux `aux`), sizes and expert routing.
    fn of_batch<B: Backend>(
        batch: &TrainBatch<B>,
        lm: f64,
        aux: f64,
        expert_tokens: Vec<usize>,
    ) -> Self {
        Self {
            loss: lm + aux,
            lm_loss: lm,
            aux_loss: aux,
            tokens: batch.batch.tokens,
            samples: batch.positions.len(),
            expert_tokens,
            ..Default::default()
        }
    }
}

impl ItemLazy for StepOutput {
    type ItemSync = StepOutput;
    fn sync(self) -> StepOutput {
        self
    }
}

/// Cross-entropy of the target tokens: `logits` [n, V] are those of the positions `rows` (of the
/// flattened [B·T] positions of a `[B, T]` batch) that predict `ids` (the label one position
/// later). The mean over all target tokens, or with `per_sample` the mean over the B samples of
/// each sample's mean (a sample without targets adds 0).
pub fn caption_loss<B: Backend>(
    logits: Tensor<B, 2>,
    rows: &[i64],
    ids: &[i64],
    [b, t]: [usize; 2],
    per_sample: bool,
) -> Tensor<B, 1> {
    if rows.is_empty() {
        return Tensor::zeros([1], (&logits.device(), DType::F32));
    }
    weighted_nll(logits, ids, &caption_weights(rows, [b, t], per_sample))
}

/// The weight of each target row in [`caption_loss`]: 1/n each, or with `per_sample`
/// 1 / (its sample's target count · B).
pub fn caption_weights(rows: &[i64], [b, t]: [usize; 2], per_sample: bool) -> Vec<f32> {
    if !per_sample {
        return vec![1.0 / rows.len().max(1) as f32; rows.len()];
    }
    // Row r belongs to sample r / T.
    let mut count = vec![0usize; b];
    rows.iter().for_each(|&r| count[r as usize / t] += 1);
    rows.iter()
        .map(|&r| 1.0 / (count[r as usize / t] * b) as f32)
        .collect()
}

/// `Σ_r w_r · −log softmax(logits_r)[ids_r]` over the rows of `logits` [n, V] (f32 math).
pub fn weighted_nll<B: Backend>(
    logits: Tensor<B, 2>,
    ids: &[i64],
    weights: &[f32],
) -> Tensor<B, 1> {
    let (device, n) = (logits.device(), ids.len());
    let weights = Tensor::<B, 2>::from_data(TensorData::new(weights.to_vec(), [n, 1]), &device);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [n, 1]), &device);
    let logp = log_softmax(logits.cast(DType::F32), 1).gather(1, ids); // [n, 1]
    (logp * weights).sum().neg()
}

/// Seed of the micro-batch starting at run position `position`.
fn batch_seed(seed: u64, position: usize) -> u64 {
    let mut z = seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 29)
}

/// (LM loss, weighted aux loss, tokens per expert) of one batch.
pub type Losses<B> = (Tensor<B, 1>, Option<Tensor<B, 1>>, Vec<usize>);

impl<B: Backend> TrainModel<B> {
    /// The model inputs of `batch`, with the vision tower's features from the cache where it
    /// holds them; and the cache to fill from this pass's vision output (it runs the tower).
    /// `training`: the batch holds training-set samples, whose vision features may come from
    /// (and go to) the cache; held-out batches never touch it (their set indexes name other
    /// samples).
    fn cached_inputs(
        &self,
        batch: &TrainBatch<B>,
        training: bool,
    ) -> (ModelInputs<B>, Option<&VisionCache>) {
        let inputs = &batch.batch.inputs;
        let image_token = self.model.meta.image_token_id;
        let Some(cache) = self
            .vision_cache
            .as_deref()
            .filter(|_| training && inputs.pixel_values.is_some())
        else {
            return (inputs.clone(), None);
        };
        match cache.lookup(inputs, &batch.indexes, image_token, &self.device()) {
            Some(features) => {
                let cached = ModelInputs {
                    pixel_values: None,
                    image_features: Some(features),
                    ..inputs.clone()
                };
                (cached, None)
            }
            None => (inputs.clone(), Some(cache)),
        }
    }

    /// Keeps this pass's vision features in `cache` (from [`Self::cached_inputs`]).
    fn fill_cache(
        &self,
        batch: &TrainBatch<B>,
        cache: Option<&VisionCache>,
        vision: Option<&VisionOutput<B>>,
    ) {
        if let (Some(c), Some(v)) = (cache, vision) {
            let image_token = self.model.meta.image_token_id;
            c.store(
                &batch.batch.inputs,
                &batch.indexes,
                image_token,
                &ImageFeatures::from(v),
            );
        }
    }

    /// The caption loss of `batch` from the logits of its target rows [1, n, V].
    fn lm_loss(&self, batch: &TrainBatch<B>, logits: Tensor<B, 3>) -> Tensor<B, 1> {
        let inputs = &batch.batch.inputs;
        let [_, n, v] = logits.dims();
        caption_loss(
            logits.reshape([n, v]),
            &batch.target_rows,
            &batch.target_ids,
            [inputs.batch, inputs.len],
            self.run.settings.loss_per_sample,
        )
    }

    /// Forward pass and losses (see [`Self::cached_inputs`] for `training`).
    pub fn losses(&self, batch: &TrainBatch<B>, training: bool) -> crate::Result<Losses<B>> {
        let (inputs, fill) = self.cached_inputs(batch, training);
        let out = self.model.forward_rows(&inputs, logit_rows(batch))?;
        self.fill_cache(batch, fill, out.vision.as_ref());
        let lm = self.lm_loss(batch, out.logits);
        Ok((lm, out.aux_loss, out.expert_tokens))
    }

    /// The losses of `batch` and what they report (values read back to the host); a failed
    /// forward pass stops the run with an error naming `what`.
    fn measured_losses(
        &self,
        batch: &TrainBatch<B>,
        training: bool,
        what: impl Fn() -> String,
    ) -> (Tensor<B, 1>, Option<Tensor<B, 1>>, StepOutput) {
        let (lm, aux, expert_tokens) = match self.losses(batch, training) {
            Ok(l) => l,
            Err(e) => self.run.fail(Error::Input(format!("{}: {e}", what()))),
        };
        let (lm_v, aux_v) = (scalar(&lm), aux.as_ref().map(scalar).unwrap_or(0.0));
        (
            lm,
            aux,
            StepOutput::of_batch(batch, lm_v, aux_v, expert_tokens),
        )
    }

    fn device(&self) -> B::Device {
        self.model.language_model.embed_tokens.weight.val().device()
    }
}

/// The rows whose logits the loss needs: the targets' (row 0 stands in when there are none;
/// the loss is then 0).
fn logit_rows<B: Backend>(batch: &TrainBatch<B>) -> &[i64] {
    match batch.target_rows.is_empty() {
        true => &[0],
        false => &batch.target_rows,
    }
}

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    t.clone().cast(DType::F32).into_scalar().elem::<f64>()
}

impl<B: AutodiffBackend> TrainModel<B> {
    /// One micro-batch: forward, losses into the step's window, backward of the scaled loss.
    fn forward_backward(&self, batch: TrainBatch<B>) -> TrainOutput<StepOutput> {
        let s = &self.run.settings;
        let seed = batch_seed(s.seed, batch.positions[0]);
        B::seed(&self.device(), seed);
        if s.recompute_layers {
            return self.forward_backward_recomputed(batch, seed);
        }
        let what = || format!("training batch of {}", self.run.describe(&batch.indexes));
        let (lm, aux, mut output) = self.measured_losses(&batch, true, what);
        let total = match aux {
            Some(a) => lm + a.cast(DType::F32),
            None => lm,
        };
        self.note_losses(&batch, &mut output);
        let factor = self.loss_factor();
        TrainOutput::new(self, total.mul_scalar(factor).backward(), output)
    }

    /// [`Self::forward_backward`] with layer recomputation (see `train::recompute`).
    fn forward_backward_recomputed(
        &self,
        batch: TrainBatch<B>,
        seed: u64,
    ) -> TrainOutput<StepOutput> {
        let what = || format!("training batch of {}", self.run.describe(&batch.indexes));
        let mut clock = PhaseClock::<B>::start(&self.device());
        let (inputs, fill) = self.cached_inputs(&batch, true);
        let rows = logit_rows(&batch);
        let mut pass = match RecomputedPass::forward(&self.model, &inputs, rows, seed) {
            Ok(p) => p,
            Err(e) => self.run.fail(Error::Input(format!("{}: {e}", what()))),
        };
        self.fill_cache(&batch, fill, pass.vision.take().as_ref());
        self.step_memory.phase_done::<B>(&self.device());
        clock.lap("forward");
        let factor = self.loss_factor();
        let inputs = &batch.batch.inputs;
        let weights = caption_weights(
            &batch.target_rows,
            [inputs.batch, inputs.len],
            self.run.settings.loss_per_sample,
        );
        // The head's loss in chunks of target rows, each back-propagated at once.
        let lm = match batch.target_rows.is_empty() {
            true => Tensor::zeros([1], (&self.device(), DType::F32)),
            false => pass.head(&self.model, factor, HEAD_CHUNK_BYTES, |logits, r| {
                weighted_nll(logits, &batch.target_ids[r.clone()], &weights[r])
            }),
        };
        let (lm_v, aux_v) = (
            scalar(&lm),
            pass.aux_loss.as_ref().map(scalar).unwrap_or(0.0),
        );
        self.step_memory.phase_done::<B>(&self.device());
        clock.lap("head");
        let expert_tokens = pass.expert_tokens.clone();
        let mut output = StepOutput::of_batch(&batch, lm_v, aux_v, expert_tokens);
        self.note_losses(&batch, &mut output);
        let grads = pass.backward(&self.model, factor);
        clock.lap("backward");
        clock.report("micro-batch");
        TrainOutput {
            grads,
            item: output,
        }
    }

    /// The factor the loss is back-propagated with: loss scale / accumulation.
    fn loss_factor(&self) -> f64 {
        self.run.lock().scaler.scale / self.run.settings.grad_accum as f64
    }

    /// Stops the run on a non-finite loss that no loss scaling can recover; adds the
    /// micro-batch's losses to its step's window and fills in the step figures of `output`.
    fn note_losses(&self, batch: &TrainBatch<B>, output: &mut StepOutput) {
        let s = &self.run.settings;
        let (lm_v, aux_v) = (output.lm_loss, output.aux_loss);
        if !lm_v.is_finite() && !s.dynamic_loss_scale {
            self.run.fail(Error::Input(format!(
                "the loss is {lm_v} on the training batch of {} (f32 compute has no loss \
                 scaling to recover; lower train.lr or check these samples)",
                self.run.describe(&batch.indexes)
            )));
        }
        let mut p = self.run.lock();
        let w = p.windows.entry(s.step_of(batch.positions[0])).or_default();
        w.lm += lm_v;
        w.aux += aux_v;
        w.micro += 1;
        w.tokens += batch.batch.tokens;
        w.samples += batch.positions.len();
        w.indexes.extend(&batch.indexes);
        let routed = &output.expert_tokens;
        if w.expert_tokens.len() < routed.len() {
            w.expert_tokens.resize(routed.len(), 0);
        }
        for (a, b) in w.expert_tokens.iter_mut().zip(routed) {
            *a += b;
        }
        output.grad_norm = p.rows.last().map(|r| r.grad_norm).unwrap_or(0.0);
        output.skipped = p.skipped;
    }
}

impl<B: AutodiffBackend> TrainStep for TrainModel<B> {
    type Input = TrainBatch<B>;
    type Output = StepOutput;

    fn step(&self, batch: TrainBatch<B>) -> TrainOutput<StepOutput> {
        let inputs = &batch.batch.inputs;
        // Image patches the vision tower runs on: none when the cache holds the batch's
        // features, so the tower's allocations are freed once the cache takes over.
        let image_token = self.model.meta.image_token_id;
        let cached = self
            .vision_cache
            .as_ref()
            .is_some_and(|c| c.holds(inputs, &batch.indexes, image_token));
        let patches = match (&inputs.pixel_values, cached) {
            (Some(p), false) => p.dims()[0],
            _ => 0,
        };
        let shape = vec![inputs.batch, inputs.len, patches, batch.target_rows.len()];
        // Exact allocations are freed when this shape changes (see `StepMemory`).
        self.step_memory
            .run::<B, _, _>(&self.device(), shape, batch, |b| self.forward_backward(b))
    }

    fn optimize<B2, O>(self, optim: &mut O, lr: f64, mut grads: GradientsParams) -> Self
    where
        B2: AutodiffBackend,
        O: Optimizer<Self, B2>,
        Self: AutodiffModule<B2>,
    {
        let run = self.run.clone();
        let s = &run.settings;
        let mut p = run.lock();
        // The first replica to finish a step decides it; with one device that is every step.
        let step = match p.claim_step(&format!("{:?}", self.device())) {
            StepClaim::Decide(step) => step,
            StepClaim::Apply(d) => {
                drop(p);
                if !d.finite {
                    return self;
                }
                apply_grad_factor::<B2, Self>(&self, &run, &mut grads, d.factor);
                return optim.step(lr, self, grads);
            }
        };
        let mut clock = PhaseClock::<B>::start(&self.device());
        let scale = p.scaler.scale;
        let norm = grad_sq_sum::<B2, Self>(&self, &grads).sqrt() / scale;
        clock.lap("gradient norm");
        p.step = step;
        let window = p.windows.remove(&step).unwrap_or_default();
        let mut factor = 1.0;
        let mut model = if norm.is_finite() {
            let clip = if s.max_grad_norm > 0.0 && norm > s.max_grad_norm {
                s.max_grad_norm / norm
            } else {
                1.0
            };
            factor = clip / scale;
            apply_grad_factor::<B2, Self>(&self, &run, &mut grads, factor);
            p.scaler.good();
            p.consecutive_skips = 0;
            optim.step(lr, self, grads)
        } else {
            p.skipped += 1;
            p.consecutive_skips += 1;
            p.scaler.overflow();
            if p.consecutive_skips > s.max_consecutive_skips {
                let msg = format!(
                    "step {}: gradients were not finite for {} steps in a row (loss scale now \
                     {}); last samples: {}",
                    p.step,
                    p.consecutive_skips,
                    p.scaler.scale,
                    run.describe(&window.indexes)
                );
                drop(p);
                run.fail(Error::Input(msg));
            }
            self
        };
        clock.lap("optimizer");
        clock.report("step");
        p.decided(step, norm.is_finite(), factor, s.replicas);
        let row = step_row(&mut p, &window, lr, norm, s.samples_per_epoch);
        if let Err(e) = append_row(&s.out_dir, &row) {
            drop(p);
            run.fail(e);
        }
        if s.log_every > 0 && (row.step.is_multiple_of(s.log_every) || row.step == s.total_steps) {
            println!("{}", log_line(&row, s.total_steps));
        }
        p.rows.push(row);
        let save =
            (s.save_every > 0 && p.step.is_multiple_of(s.save_every)) || p.step == s.total_steps;
        if save {
            let state = CheckpointState {
                step: p.step,
                position: p.step * s.samples_per_step(),
                scheduler_calls: p.step * s.grad_accum * s.replicas,
                samples_per_step: s.samples_per_step(),
                scaler: p.scaler,
                skipped: p.skipped,
                seconds: p.seconds_before + p.started.elapsed().as_secs_f64(),
                seed: s.seed,
            };
            let config = model.config_json.clone();
            match save_checkpoint::<B, B2, _>(
                &mut model.model,
                &config,
                optim.to_record(),
                &state,
                s,
            ) {
                Ok(_) => p.checkpoints.push(state.step),
                Err(e) => {
                    drop(p);
                    run.fail(e)
                }
            }
        }
        model
    }
}

impl<B: Backend> InferenceStep for TrainModel<B> {
    type Input = TrainBatch<B>;
    type Output = StepOutput;

    fn step(&self, batch: TrainBatch<B>) -> StepOutput {
        self.measured_losses(&batch, false, || "held-out batch".into())
            .2
    }
}

fn step_row(
    p: &mut super::state::Progress,
    w: &Window,
    lr: f64,
    norm: f64,
    samples_per_epoch: usize,
) -> StepRow {
    let now = std::time::Instant::now();
    let dt = (now - p.last_step_at).as_secs_f64().max(1e-9);
    p.last_step_at = now;
    let micro = w.micro.max(1) as f64;
    let routed: usize = w.expert_tokens.iter().sum();
    let consumed =
        p.rows.last().map(|r| r.epoch).unwrap_or(0.0) * samples_per_epoch as f64 + w.samples as f64;
    StepRow {
        step: p.step,
        epoch: consumed / samples_per_epoch.max(1) as f64,
        lr,
        loss: (w.lm + w.aux) / micro,
        lm_loss: w.lm / micro,
        aux_loss: w.aux / micro,
        grad_norm: norm,
        loss_scale: p.scaler.scale,
        skipped: p.skipped,
        tokens: w.tokens,
        samples: w.samples,
        seconds: p.seconds_before + p.started.elapsed().as_secs_f64(),
        tokens_per_s: w.tokens as f64 / dt,
        samples_per_s: w.samples as f64 / dt,
        expert_share: w
            .expert_tokens
            .iter()
            .map(|&c| c as f64 / routed.max(1) as f64)
            .collect(),
    }
}

/// The plain progress line printed every `log_every` steps.
pub fn log_line(r: &StepRow, total: usize) -> String {
    let mut s = format!(
        "step {:>5}/{total} | epoch {:.2} | loss {:.4} | lm {:.4} | aux {:.4} | lr {:.3e} | \
         grad {:.3} | {:.0} tok/s | {:.2} samples/s | skipped {}",
        r.step,
        r.epoch,
        r.loss,
        r.lm_loss,
        r.aux_loss,
        r.lr,
        r.grad_norm,
        r.tokens_per_s,
        r.samples_per_s,
        r.skipped
    );
    if !r.expert_share.is_empty() {
        let shares: Vec<String> = r
            .expert_share
            .iter()
            .map(|v| format!("{:.0}%", v * 100.0))
            .collect();
        s.push_str(&format!(" | experts {}", shares.join("/")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    use crate::model::qwen3_vl::flat_rows;

    #[test]
    fn caption_loss_is_the_mean_target_nll() {
        let dev = Default::default();
        // [1, 3, 2] logits; predict id 1 from position 0 and id 0 from position 1.
        let logits = Tensor::<B, 3>::from_floats([[[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]], &dev);
        let l = caption_loss(flat_rows(logits, &[0, 1]), &[0, 1], &[1, 0], [1, 3], false);
        let l = l.into_scalar();
        let nll = |a: f32, b: f32| -(a - (a.exp() + b.exp()).ln());
        let want = (nll(1.0, 0.0) + nll(2.0, 0.0)) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
    }

    /// Two samples, one with 3 targets and one with 1: per token each target weighs 1/4; per
    /// sample the lone target weighs 1/2 and the others 1/6.
    #[test]
    fn per_sample_loss_averages_each_samples_mean() {
        let dev = Default::default();
        let logits = Tensor::<B, 3>::from_floats(
            [
                [[0.0, 1.0], [2.0, 0.0], [0.5, 0.0], [1.0, 1.0]],
                [[3.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
            ],
            &dev,
        );
        let (rows, ids) = ([0, 1, 2, 4], [1, 0, 0, 1]);
        let nll = |a: f32, b: f32, id: usize| -([a, b][id] - (a.exp() + b.exp()).ln());
        let each = [
            nll(0.0, 1.0, 1),
            nll(2.0, 0.0, 0),
            nll(0.5, 0.0, 0),
            nll(3.0, 0.0, 1),
        ];
        let picked = flat_rows(logits, &rows);
        let tokens = caption_loss(picked.clone(), &rows, &ids, [2, 4], false).into_scalar();
        let want = each.iter().sum::<f32>() / 4.0;
        assert!((tokens - want).abs() < 1e-6, "{tokens} vs {want}");
        let samples = caption_loss(picked, &rows, &ids, [2, 4], true).into_scalar();
        let want = ((each[0] + each[1] + each[2]) / 3.0 + each[3]) / 2.0;
        assert!((samples - want).abs() < 1e-6, "{samples} vs {want}");
    }
}
