//! The Qwen3 text decoder: GQA attention with per-head q/k RMSNorm before M-RoPE, SwiGLU MLP,
//! and DeepStack injection of visual features after the first decoder layers.

use burn::module::{Module, Param};
use burn::prelude::*;

use super::attention::attention;
use super::config::TextConfig;
use super::decode::{KvCache, LayerCache};
use super::layers::{Embedding, Linear, RmsNorm};
use super::rotary::norm_and_rotate;
use crate::adapter::{AdapterStats, BaseLinear, Projection};
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
    /// For inference: q, k and v stacked in one dense layer [(Hq + 2·Hkv)·d, H] (one
    /// matmul instead of three; see [`TextModel::fuse_dense_projections`]).
    pub qkv: Option<Linear<B>>,
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
    /// For inference: gate and up stacked in one dense layer [2·I, H].
    pub gate_up: Option<Linear<B>>,
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
        let (q, k, v) = match &self.qkv {
            Some(qkv) => {
                // One matmul: [B, T, (Hq + 2·Hkv)·d], split into three column views.
                let y = qkv.forward(x);
                let (nq, nkv) = (hq * d, hkv * d);
                (
                    y.clone().narrow(2, 0, nq),
                    y.clone().narrow(2, nq, nkv),
                    y.narrow(2, nq + nkv, nkv),
                )
            }
            None => (
                self.q_proj.forward(x.clone(), stats),
                self.k_proj.forward(x.clone(), stats),
                self.v_proj.forward(x, stats),
            ),
        };
        let q = norm_and_rotate(&self.q_norm, heads(q, hq), cos, sin);
        let k = norm_and_rotate(&self.k_norm, heads(k, hkv), cos, sin);
        let v = heads(v, hkv);
        let (k, v) = match cache {
            Some(c) => c.extend(k, v),
            None => (k, v),
        };
        // [B, Hq, T, d] -> [B, T, Hq·d]; with one position the order is already that (no copy).
        let o = attention(q, k, v, mask);
        let o = match t {
            1 => o.reshape([b, 1, hq * d]),
            _ => o.swap_dims(1, 2).reshape([b, t, hq * d]),
        };
        self.o_proj.forward(o, stats)
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// One residual attention + MLP step on the residual stream `x` + `pending` (the previous
    /// layer's MLP output, still to be added: the add runs fused with this layer's input norm).
    /// Returns the stream after attention and this layer's MLP output, whose sum is the layer's
    /// output (`cache`: this layer's keys and values so far).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        pending: Option<Tensor<B, 3>>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
        stats: &AdapterStats<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let (x, normed) = self.input_layernorm.forward_added(x, pending);
        let attn = self.self_attn.forward(normed, cos, sin, mask, cache, stats);
        let (h, n) = self.post_attention_layernorm.forward_added(x, Some(attn));
        let mlp = &self.mlp;
        let [b, t, _] = n.dims();
        let i = mlp.gate_proj.base().d_out();
        // silu(gate) · up on [B·T, I] rows
        let act = match &mlp.gate_up {
            Some(gate_up) => {
                // One matmul: [B·T, 2·I], split into two column views.
                let y = gate_up.forward(n).reshape([b * t, 2 * i]);
                swiglu(y.clone().narrow(1, 0, i), y.narrow(1, i, i))
            }
            None => swiglu(
                mlp.gate_proj.forward(n.clone(), stats).reshape([b * t, i]),
                mlp.up_proj.forward(n, stats).reshape([b * t, i]),
            ),
        };
        (h, mlp.down_proj.forward(act.reshape([b, t, i]), stats))
    }
}

/// `silu(gate) · up` [rows, I] (strided views are fine): one fused kernel where the backend
/// registered one (burn-cuda), else the tensor ops.
fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    match layer_ops::registered::<B>() {
        Some(fused) => (fused.swiglu)(gate, up),
        None => swiglu_ops(gate, up),
    }
}

/// Joins dense layers that read the same input into one whose weight holds theirs stacked
/// [Σ d_out, d_in]; each part's weight (and bias) becomes a view of its rows, so nothing is
/// stored twice. None (nothing changed) unless every part is a plain dense layer and all or
/// none have a bias.
fn fuse_dense<B: Backend>(parts: Vec<&mut Projection<B>>) -> Option<Linear<B>> {
    let mut dense = Vec::new();
    for p in parts {
        match p {
            Projection::Plain(BaseLinear::Dense(l)) => dense.push(l),
            _ => return None,
        }
    }
    let with_bias = dense.iter().filter(|l| l.bias.is_some()).count();
    if with_bias != 0 && with_bias != dense.len() {
        return None;
    }
    let weight = Tensor::cat(dense.iter().map(|l| l.weight.val()).collect(), 0);
    let bias = (with_bias > 0).then(|| {
        let biases = dense
            .iter()
            .filter_map(|l| l.bias.as_ref().map(|b| b.val()));
        Tensor::cat(biases.collect(), 0)
    });
    let mut start = 0;
    for l in dense {
        let n = l.weight.dims()[0];
        l.weight = Param::from_tensor(weight.clone().narrow(0, start, n));
        if let Some(b) = &bias {
            l.bias = Some(Param::from_tensor(b.clone().narrow(0, start, n)));
        }
        start += n;
    }
    Some(Linear {
        weight: Param::from_tensor(weight),
        bias: bias.map(Param::from_tensor),
    })
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
                qkv: None,
            },
            post_attention_layernorm: RmsNorm::init(h, eps, device),
            mlp: TextMlp {
                gate_proj: Projection::init(h, c.intermediate_size, false, device),
                up_proj: Projection::init(h, c.intermediate_size, false, device),
                down_proj: Projection::init(c.intermediate_size, h, false, device),
                gate_up: None,
            },
        };
        Self {
            embed_tokens: Embedding::init(c.vocab_size, h, device),
            layers: (0..c.num_hidden_layers).map(|_| layer()).collect(),
            norm: RmsNorm::init(h, eps, device),
        }
    }

    /// For inference: joins each layer's q, k and v, and its gate and up, into one dense layer
    /// each where they are plain dense layers (no adapter, not NF4), so a decode step runs two
    /// matmuls instead of five; returns how many groups were joined. The parts keep views of
    /// the joined weights (no extra memory); the logits are unchanged up to rounding.
    pub fn fuse_dense_projections(&mut self) -> usize {
        let mut joined = 0;
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            if a.qkv.is_none() {
                a.qkv = fuse_dense(vec![&mut a.q_proj, &mut a.k_proj, &mut a.v_proj]);
                joined += usize::from(a.qkv.is_some());
            }
            let m = &mut layer.mlp;
            if m.gate_up.is_none() {
                m.gate_up = fuse_dense(vec![&mut m.gate_proj, &mut m.up_proj]);
                joined += usize::from(m.gate_up.is_some());
            }
        }
        joined
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
        let mut x = inputs_embeds;
        // The last layer's MLP output, added to `x` by the next norm's fused add.
        let mut pending = None;
        let mut layer_outputs = Vec::new();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (h, mlp) = layer.forward(x, pending, cos, sin, mask.clone(), layer_cache, stats);
            let tap = deepstack.and_then(|ds| ds.features.get(i).map(|f| (f, &ds.index)));
            if !(keep_layer_outputs && i < last) && tap.is_none() {
                (x, pending) = (h, Some(mlp));
                continue;
            }
            (x, pending) = (h + mlp, None);
            if keep_layer_outputs && i < last {
                layer_outputs.push(x.clone());
            }
            if let Some((feat, index)) = tap {
                x = add_deepstack(x, feat.clone(), index);
            }
        }
        let (_, hidden) = self.norm.forward_added(x, pending);
        TextOutput {
            hidden,
            layer_outputs,
        }
    }

    /// The residual stream after layer `i`, from its input `x` [B, T, H]: the layer's
    /// attention and MLP outputs added, then the DeepStack feature `tap` [N_vis, H] (with each
    /// position's visual index) when layer `i` has one. Layer recomputation runs the decoder
    /// this way, one layer at a time (the same sums as `forward`, without its fused adds).
    pub fn layer_step(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        (cos, sin): (&Tensor<B, 4>, &Tensor<B, 4>),
        mask: Option<Tensor<B, 4, Bool>>,
        tap: Option<(Tensor<B, 2>, &Tensor<B, 1, Int>)>,
        stats: &AdapterStats<B>,
    ) -> Tensor<B, 3> {
        let (h, mlp) = self.layers[i].forward(x, None, cos, sin, mask, None, stats);
        let x = h + mlp;
        match tap {
            Some((feat, index)) => add_deepstack(x, feat, index),
            None => x,
        }
    }
}

/// `x` [B, T, H] plus the visual feature `feat` [N_vis, H] at each visual position (`index`
/// [B·T]: 0 for text, 1 + k for the k-th visual token).
fn add_deepstack<B: Backend>(
    x: Tensor<B, 3>,
    feat: Tensor<B, 2>,
    index: &Tensor<B, 1, Int>,
) -> Tensor<B, 3> {
    let [b, t, h] = x.dims();
    // Row 0 of the padded table is zero: text positions get nothing added.
    let zero = Tensor::zeros([1, h], (&feat.device(), feat.dtype()));
    let table = Tensor::cat(vec![zero, feat.cast(x.dtype())], 0);
    let add = table.select(0, index.clone()).reshape([b, t, h]);
    x + add
}
