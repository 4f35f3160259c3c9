//! The Qwen3 text decoder: GQA attention with per-head q/k RMSNorm before M-RoPE, SwiGLU MLP,
//! and DeepStack injection of visual features after the first decoder layers.

use burn::module::Module;
use burn::prelude::*;

use super::attention::attention;
use super::config::TextConfig;
use super::decode::{KvCache, LayerCache};
use super::layers::{Embedding, RmsNorm};
use super::rotary::norm_and_rotate;
use crate::adapter::{AdapterStats, Projection};
use crate::quant::kernels::layer_ops;

/// Self-attention of a decoder layer.
#[derive(Module, Debug)]
pub struct TextAttention<B: Backend> {
    /// [Hq·d, H]
    pub q_proj: Projection<B>,
    /// [Hkv·d, H]
    pub k_proj: Projection<B>,
    /// [Hkv·d, H]
    pub v_proj: Projection<B>,
    /// [H, Hq·d]
    pub o_proj: Projection<B>,
    /// RMSNorm over each query head, before RoPE.
    pub q_norm: RmsNorm<B>,
    /// RMSNorm over each key head, before RoPE.
    pub k_norm: RmsNorm<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct TextMlp<B: Backend> {
    /// [I, H]
    pub gate_proj: Projection<B>,
    /// [I, H]
    pub up_proj: Projection<B>,
    /// [H, I]
    pub down_proj: Projection<B>,
}

/// Pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Attention.
    pub self_attn: TextAttention<B>,
    /// Before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// MLP.
    pub mlp: TextMlp<B>,
}

/// `Qwen3VLTextModel`: embeddings, decoder layers, final norm.
#[derive(Module, Debug)]
pub struct TextModel<B: Backend> {
    /// [vocab, H]
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
}

/// Visual features to add after the first decoder layers.
#[derive(Debug, Clone)]
pub struct DeepStackInjection<B: Backend> {
    /// For each of the B·T positions: 0 for text, 1 + k for the k-th visual token.
    pub index: Tensor<B, 1, Int>,
    /// One [N_vis, H] feature per tap; tap i is added after layer i.
    pub features: Vec<Tensor<B, 2>>,
}

/// Decoder output.
#[derive(Debug, Clone)]
pub struct TextOutput<B: Backend> {
    /// Final-normed hidden state [B, T, H].
    pub hidden: Tensor<B, 3>,
    /// Raw output of every layer but the last, before DeepStack (HF's `hidden_states[1..L]`),
    /// when requested.
    pub layer_outputs: Vec<Tensor<B, 3>>,
}

impl<B: Backend> TextAttention<B> {
    /// `x` [B, T, H], rotary tables [B, 1, T, d], mask [B, 1, T, P + T] -> [B, T, H].
    ///
    /// With a `cache` holding P earlier positions, the new keys and values are appended to it
    /// and the queries attend to all P + T of them.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
        stats: &AdapterStats<B>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [B, T, heads·d] -> [B, heads, T, d], normed per head, then rotated.
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, d]).swap_dims(1, 2);
        let q = heads(self.q_proj.forward(x.clone(), stats), hq);
        let q = norm_and_rotate(&self.q_norm, q, cos, sin);
        let k = heads(self.k_proj.forward(x.clone(), stats), hkv);
        let k = norm_and_rotate(&self.k_norm, k, cos, sin);
        let v = heads(self.v_proj.forward(x, stats), hkv);
        let (k, v) = match cache {
            Some(c) => c.extend(k, v),
            None => (k, v),
        };
        let o = attention(q, k, v, mask);
        self.o_proj
            .forward(o.swap_dims(1, 2).reshape([b, t, hq * d]), stats)
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// One residual attention + MLP step (`cache`: this layer's keys and values so far).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
        stats: &AdapterStats<B>,
    ) -> Tensor<B, 3> {
        let normed = self.input_layernorm.forward(x.clone());
        let h = x + self.self_attn.forward(normed, cos, sin, mask, cache, stats);
        let n = self.post_attention_layernorm.forward(h.clone());
        let mlp = &self.mlp;
        let act = swiglu(
            mlp.gate_proj.forward(n.clone(), stats),
            mlp.up_proj.forward(n, stats),
        );
        h + mlp.down_proj.forward(act, stats)
    }
}

/// `silu(gate) · up` [B, T, I]: one fused kernel where the backend registered one (burn-cuda),
/// else the tensor ops.
fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    let Some(fused) = layer_ops::registered::<B>() else {
        return swiglu_ops(gate, up);
    };
    let [b, t, i] = gate.dims();
    (fused.swiglu)(gate.reshape([b * t, i]), up.reshape([b * t, i])).reshape([b, t, i])
}

/// `silu(gate) · up` with tensor ops (what the fused `swiglu` kernel computes in one launch).
pub fn swiglu_ops<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    burn::tensor::activation::silu(gate) * up
}

impl<B: Backend> TextModel<B> {
    /// A lazily initialised decoder for `c`.
    pub fn init(c: &TextConfig, device: &B::Device) -> Self {
        let (h, d) = (c.hidden_size, c.head_dim());
        let (hq, hkv) = (c.num_attention_heads, c.kv_heads());
        let eps = c.rms_norm_eps;
        let bias = c.attention_bias;
        let layer = || DecoderLayer {
            input_layernorm: RmsNorm::init(h, eps, device),
            self_attn: TextAttention {
                q_proj: Projection::init(h, hq * d, bias, device),
                k_proj: Projection::init(h, hkv * d, bias, device),
                v_proj: Projection::init(h, hkv * d, bias, device),
                o_proj: Projection::init(hq * d, h, bias, device),
                q_norm: RmsNorm::init(d, eps, device),
                k_norm: RmsNorm::init(d, eps, device),
                num_heads: hq,
                num_kv_heads: hkv,
                head_dim: d,
            },
            post_attention_layernorm: RmsNorm::init(h, eps, device),
            mlp: TextMlp {
                gate_proj: Projection::init(h, c.intermediate_size, false, device),
                up_proj: Projection::init(h, c.intermediate_size, false, device),
                down_proj: Projection::init(c.intermediate_size, h, false, device),
            },
        };
        Self {
            embed_tokens: Embedding::init(c.vocab_size, h, device),
            layers: (0..c.num_hidden_layers).map(|_| layer()).collect(),
            norm: RmsNorm::init(h, eps, device),
        }
    }

    /// Runs the decoder on `inputs_embeds` [B, T, H] with rotary tables `(cos, sin)`
    /// [B, 1, T, d] and the attention mask [B, 1, T, P + T], where P is the number of
    /// positions already in `cache` (0 without one); the new keys and values are appended.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        inputs_embeds: Tensor<B, 3>,
        (cos, sin): (&Tensor<B, 4>, &Tensor<B, 4>),
        mask: Option<Tensor<B, 4, Bool>>,
        deepstack: Option<&DeepStackInjection<B>>,
        keep_layer_outputs: bool,
        mut cache: Option<&mut KvCache<B>>,
        stats: &AdapterStats<B>,
    ) -> TextOutput<B> {
        let [b, t, h] = inputs_embeds.dims();
        let mut x = inputs_embeds;
        let mut layer_outputs = Vec::new();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, cos, sin, mask.clone(), layer_cache, stats);
            if keep_layer_outputs && i < last {
                layer_outputs.push(x.clone());
            }
            if let Some(ds) = deepstack {
                if let Some(feat) = ds.features.get(i) {
                    // Row 0 of the padded table is zero: text positions get nothing added.
                    let zero = Tensor::zeros([1, h], (&feat.device(), feat.dtype()));
                    let table = Tensor::cat(vec![zero, feat.clone().cast(x.dtype())], 0);
                    let add = table.select(0, ds.index.clone()).reshape([b, t, h]);
                    x = x + add;
                }
            }
        }
        TextOutput {
            hidden: self.norm.forward(x),
            layer_outputs,
        }
    }
}
