//! `Qwen3VLForConditionalGeneration`: vision tower + text decoder + LM head, and the glue that
//! scatters image features into the token sequence.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;

use super::attention::causal_padding_mask;
use super::config::Qwen3VlConfig;
use super::layers::Linear;
use super::position_ids::{rope_index, PositionIds, VisualTokens};
use super::rotary::text_cos_sin;
use super::text::{DeepStackInjection, TextModel};
use super::vision::{VisionModel, VisionOutput};
use crate::adapter::AdapterStats;
use crate::error::{Error, Result};

/// Token ids and rotary settings the glue code needs.
#[derive(Debug, Clone)]
pub struct ModelMeta {
    /// `<|image_pad|>`.
    pub image_token_id: i64,
    /// `<|video_pad|>`.
    pub video_token_id: i64,
    /// Patches merged per side.
    pub spatial_merge_size: usize,
    /// Text head width.
    pub head_dim: usize,
    /// Text RoPE base.
    pub rope_theta: f64,
    /// M-RoPE section.
    pub mrope_section: [usize; 3],
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Weight of the MoE-LoRA load-balancing loss (0 without MoE-LoRA adapters).
    pub aux_loss_coef: f64,
}

/// The full vision-language model. Field names follow HF's state dict (`model.` dropped).
#[derive(Module, Debug)]
pub struct Qwen3VlModel<B: Backend> {
    /// `model.visual`.
    pub visual: VisionModel<B>,
    /// `model.language_model`.
    pub language_model: TextModel<B>,
    /// `lm_head`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// Ids and sizes.
    #[module(skip)]
    pub meta: ModelMeta,
}

/// One batch of inputs, as HF's processor returns them.
#[derive(Debug, Clone)]
pub struct ModelInputs<B: Backend> {
    /// [B, T] token ids, row-major.
    pub input_ids: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Sequence length.
    pub len: usize,
    /// [B, T], 1 = token, 0 = padding; `None` = no padding.
    pub attention_mask: Option<Vec<i64>>,
    /// [N, C·T·P·P] patch rows of all images, or `None` for text only.
    pub pixel_values: Option<Tensor<B, 2>>,
    /// (t, h, w) per image, in order of appearance.
    pub image_grid_thw: Vec<[usize; 3]>,
    /// The vision tower's outputs for these images, computed earlier: used instead of running
    /// the tower on `pixel_values` (a frozen tower gives the same features every epoch).
    pub image_features: Option<ImageFeatures<B>>,
}

/// What the vision tower gives the decoder for a batch's images (batch-major token order).
#[derive(Debug, Clone)]
pub struct ImageFeatures<B: Backend> {
    /// Merged image tokens [N_vis, H].
    pub merged: Tensor<B, 2>,
    /// One [N_vis, H] feature per DeepStack tap.
    pub deepstack: Vec<Tensor<B, 2>>,
}

impl<B: Backend> From<&VisionOutput<B>> for ImageFeatures<B> {
    fn from(out: &VisionOutput<B>) -> Self {
        Self {
            merged: out.merged.clone(),
            deepstack: out.deepstack.clone(),
        }
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// [B, T, vocab], f32 ([1, rows, vocab] from `forward_rows`).
    pub logits: Tensor<B, 3>,
    /// The M-RoPE positions used.
    pub position_ids: PositionIds,
    /// Vision tower outputs, when images were given.
    pub vision: Option<VisionOutput<B>>,
    /// Embeddings after the image rows were scattered in, [B, T, H].
    pub inputs_embeds: Tensor<B, 3>,
    /// Raw outputs of all layers but the last (only with `keep_hidden`).
    pub layer_outputs: Vec<Tensor<B, 3>>,
    /// Final-normed hidden state [B, T, H].
    pub last_hidden: Tensor<B, 3>,
    /// `aux_loss_coef` × mean MoE load-balancing loss over the adapted layers (None without
    /// MoE-LoRA); add it to the training loss.
    pub aux_loss: Option<Tensor<B, 1>>,
    /// Tokens routed to each expert, summed over the MoE-LoRA layers.
    pub expert_tokens: Vec<usize>,
}

/// The positions `rows` of the flattened [B·T] positions of `x` [B, T, D], as [rows, D].
pub fn flat_rows<B: Backend>(x: Tensor<B, 3>, rows: &[i64]) -> Tensor<B, 2> {
    let [b, t, d] = x.dims();
    let n = rows.len();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.to_vec(), [n]), &x.device());
    x.reshape([b * t, d]).select(0, rows)
}

impl<B: Backend> Qwen3VlModel<B> {
    /// A lazily initialised model: nothing is allocated until a parameter is used or loaded.
    pub fn init(cfg: &Qwen3VlConfig, device: &B::Device) -> Self {
        let t = &cfg.text_config;
        Self {
            visual: VisionModel::init(&cfg.vision_config, device),
            language_model: TextModel::init(t, device),
            lm_head: (!cfg.tie_word_embeddings)
                .then(|| Linear::init(t.hidden_size, t.vocab_size, false, device)),
            meta: ModelMeta {
                image_token_id: cfg.image_token_id as i64,
                video_token_id: cfg.video_token_id as i64,
                spatial_merge_size: cfg.vision_config.spatial_merge_size,
                head_dim: t.head_dim(),
                rope_theta: t.rope_theta(),
                mrope_section: t.mrope_section(),
                vocab_size: t.vocab_size,
                aux_loss_coef: 0.0,
            },
        }
    }

    /// Float dtype of the weights (and so of the activations).
    pub fn dtype(&self) -> DType {
        self.language_model.embed_tokens.weight.val().dtype()
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.language_model.embed_tokens.weight.val().device()
    }

    /// Full forward pass; `keep_hidden` also returns every layer's output.
    pub fn forward(&self, inputs: &ModelInputs<B>, keep_hidden: bool) -> Result<ModelOutput<B>> {
        self.forward_inner(inputs, keep_hidden, None)
    }

    /// Forward pass whose logits are only those of `rows` of the flattened [B·T] positions, as
    /// [1, rows, V] (training needs the caption targets' rows: the vocabulary projection of
    /// every position is the largest activation, and mostly unused). At least one row.
    pub fn forward_rows(&self, inputs: &ModelInputs<B>, rows: &[i64]) -> Result<ModelOutput<B>> {
        self.forward_inner(inputs, false, Some(rows))
    }

    fn forward_inner(
        &self,
        inputs: &ModelInputs<B>,
        keep_hidden: bool,
        rows: Option<&[i64]>,
    ) -> Result<ModelOutput<B>> {
        let e = self.embed(inputs, false)?;
        let (b, t) = (inputs.batch, inputs.len);
        let device = self.device();
        let (cos, sin) = self.rotary_tables(&e.positions, e.embeds.dtype());
        let mask = causal_padding_mask::<B>(inputs.attention_mask.as_deref(), b, t, &device);
        let out = self.language_model.forward(
            e.embeds.clone(),
            (&cos, &sin),
            Some(mask),
            e.deepstack.as_ref(),
            keep_hidden,
            None,
            &e.stats,
        );
        let logits = match rows {
            None => self.lm_logits(out.hidden.clone()),
            Some(rows) => {
                let picked = flat_rows(out.hidden.clone(), rows); // [n, H]
                self.lm_logits(picked.unsqueeze()) // [1, n, V]
            }
        };
        Ok(ModelOutput {
            logits,
            position_ids: e.positions,
            vision: e.vision,
            inputs_embeds: e.embeds,
            layer_outputs: out.layer_outputs,
            last_hidden: out.hidden,
            aux_loss: e
                .stats
                .mean_aux_loss()
                .map(|a| a.mul_scalar(self.meta.aux_loss_coef)),
            expert_tokens: e.stats.expert_tokens(),
        })
    }

    /// Text M-RoPE tables [B, 1, T, d] for `positions`, in `dtype`.
    pub(crate) fn rotary_tables(
        &self,
        positions: &PositionIds,
        dtype: DType,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let m = &self.meta;
        text_cos_sin::<B>(
            positions,
            m.head_dim,
            m.rope_theta,
            m.mrope_section,
            dtype,
            &self.device(),
        )
    }

    /// `hidden` [B, T, H] -> logits [B, T, vocab] in f32 (the LM head, tied or not).
    pub(crate) fn lm_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let head = match &self.lm_head {
            Some(h) => h.weight.val(),
            None => self.language_model.embed_tokens.weight.val(),
        };
        burn::tensor::module::linear(hidden, head.transpose(), None).cast(DType::F32)
    }

    /// Token embeddings with the vision tower's features scattered into the image positions,
    /// the M-RoPE positions and the DeepStack features of the batch. `generated`: the tokens
    /// were sampled by the model, so every one is text for the positions (a sampled image or
    /// video placeholder id has no grid, as in HF's decode steps).
    pub(crate) fn embed(&self, inputs: &ModelInputs<B>, generated: bool) -> Result<Embedded<B>> {
        let (b, t) = (inputs.batch, inputs.len);
        let meta = &self.meta;
        validate_ids(inputs, meta.vocab_size)?;
        let visual_id = |id: i64| if generated { -1 } else { id }; // -1: no token matches
        let positions = rope_index(
            &inputs.input_ids,
            b,
            t,
            inputs.attention_mask.as_deref(),
            &inputs.image_grid_thw,
            &[],
            VisualTokens {
                image_token_id: visual_id(meta.image_token_id),
                video_token_id: visual_id(meta.video_token_id),
                spatial_merge_size: meta.spatial_merge_size,
            },
        )?;
        let device = self.device();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(inputs.input_ids.clone(), [b, t]),
            &device,
        );
        let mut embeds = self.language_model.embed_tokens.forward(ids);
        let dtype = embeds.dtype();
        let hidden = embeds.dims()[2];

        // Index of each position's visual token (1-based; 0 = text), in batch-major scan order.
        let mut visual_index = vec![0i64; b * t];
        let mut n_visual = 0;
        for (p, &id) in inputs.input_ids.iter().enumerate() {
            if id == visual_id(meta.image_token_id) {
                n_visual += 1;
                visual_index[p] = n_visual;
            }
        }
        let stats = AdapterStats::new();
        let mut vision = None;
        let mut deepstack = None;
        let features = match (&inputs.image_features, &inputs.pixel_values) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(pv)) => {
                let out = self
                    .visual
                    .forward(pv.clone(), &inputs.image_grid_thw, &stats)?;
                let f = ImageFeatures::from(&out);
                vision = Some(out);
                Some(f)
            }
            (None, None) => None,
        };
        if let Some(f) = features {
            let rows = f.merged.dims()[0];
            if rows != n_visual as usize {
                return Err(Error::Input(format!(
                    "input_ids hold {n_visual} image tokens but the images give {rows} features"
                )));
            }
            // [B·T + N_vis, H] table of text embeddings then image features; pick one per position.
            let flat = embeds.reshape([b * t, hidden]);
            let pick: Vec<i64> = (0..b * t)
                .map(|p| match visual_index[p] {
                    0 => p as i64,
                    k => (b * t) as i64 + k - 1,
                })
                .collect();
            let table = Tensor::cat(vec![flat, f.merged.cast(dtype)], 0);
            let pick = Tensor::<B, 1, Int>::from_data(TensorData::new(pick, [b * t]), &device);
            embeds = table.select(0, pick).reshape([b, t, hidden]);
            let index =
                Tensor::<B, 1, Int>::from_data(TensorData::new(visual_index, [b * t]), &device);
            deepstack = Some(DeepStackInjection {
                index,
                features: f.deepstack,
            });
        } else if n_visual > 0 {
            return Err(Error::Input(format!(
                "input_ids hold {n_visual} image tokens but no pixel_values were given"
            )));
        }
        Ok(Embedded {
            embeds,
            positions,
            deepstack,
            vision,
            stats,
        })
    }
}

/// What the decoder needs for a batch, before any decoder layer runs.
pub(crate) struct Embedded<B: Backend> {
    /// [B, T, H] with image features in the image positions.
    pub embeds: Tensor<B, 3>,
    /// M-RoPE positions.
    pub positions: PositionIds,
    /// Features added after the first decoder layers (with images only).
    pub deepstack: Option<DeepStackInjection<B>>,
    /// Vision tower outputs (with images only).
    pub vision: Option<VisionOutput<B>>,
    /// Adapter statistics collected so far (the vision tower's adapters).
    pub stats: AdapterStats<B>,
}

fn validate_ids<B: Backend>(inputs: &ModelInputs<B>, vocab: usize) -> Result<()> {
    if inputs.input_ids.len() != inputs.batch * inputs.len || inputs.batch == 0 || inputs.len == 0 {
        return Err(Error::Input(format!(
            "input_ids must be a non-empty [B, T] array ({} ids for B = {}, T = {})",
            inputs.input_ids.len(),
            inputs.batch,
            inputs.len
        )));
    }
    if let Some(m) = &inputs.attention_mask {
        if m.len() != inputs.input_ids.len() {
            return Err(Error::Input(format!(
                "attention_mask has {} values, input_ids {}",
                m.len(),
                inputs.input_ids.len()
            )));
        }
    }
    if let Some((p, id)) = inputs
        .input_ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        return Err(Error::Input(format!(
            "input_ids[{}, {}] = {id} is outside the vocabulary [0, {vocab})",
            p / inputs.len,
            p % inputs.len
        )));
    }
    Ok(())
}
