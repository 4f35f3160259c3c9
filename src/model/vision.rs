//! The vision tower: patch embedding, interpolated learned positions, 2-D RoPE blocks with
//! block-diagonal attention per image (per frame), the patch merger and the DeepStack mergers.
//!
//! Patch rows arrive in 2x2 merge-block order (see `patch_rows_cols`): every grid-dependent
//! quantity here is laid out in that same order.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::DType;

use super::attention::attention;
use super::config::{VisionAct, VisionConfig};
use super::layers::{Embedding, LayerNorm, Linear};
use super::rotary::{apply_rotary, vision_cos_sin};
use crate::adapter::{AdapterStats, Projection};
use crate::error::{Error, Result};

const LN_EPS: f64 = 1e-6;

/// Conv3d with kernel = stride = (T, P, P) written as a linear map on flattened patch rows.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// weight [D, C·T·P·P] (the HF conv weight [D, C, T, P, P] flattened), bias [D]
    pub proj: Linear<B>,
}

/// Fused-qkv self-attention of a vision block.
#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    /// [3D, D]: rows Q | K | V.
    pub qkv: Projection<B>,
    /// [D, D]
    pub proj: Projection<B>,
    /// Attention heads.
    pub num_heads: usize,
}

/// fc1 -> GELU (tanh approximation by default) -> fc2.
#[derive(Module, Debug)]
pub struct VisionMlp<B: Backend> {
    /// [I, D]
    pub linear_fc1: Projection<B>,
    /// [D, I]
    pub linear_fc2: Projection<B>,
    /// Whether the activation is the tanh approximation (`gelu_pytorch_tanh`).
    pub gelu_tanh: bool,
}

/// Pre-norm transformer block of the vision tower.
#[derive(Module, Debug)]
pub struct VisionBlock<B: Backend> {
    /// Before attention.
    pub norm1: LayerNorm<B>,
    /// Before the MLP.
    pub norm2: LayerNorm<B>,
    /// Self-attention.
    pub attn: VisionAttention<B>,
    /// MLP.
    pub mlp: VisionMlp<B>,
}

/// Merges each 2x2 block of patches into one LLM token: LayerNorm, fc1, exact GELU, fc2.
#[derive(Module, Debug)]
pub struct PatchMerger<B: Backend> {
    /// Over D per patch (main merger) or over 4D after the shuffle (DeepStack mergers).
    pub norm: LayerNorm<B>,
    /// [4D, 4D]
    pub linear_fc1: Projection<B>,
    /// [out, 4D]
    pub linear_fc2: Projection<B>,
    /// Normalise after concatenating the 4 patches (DeepStack) rather than before.
    pub postshuffle_norm: bool,
}

/// Grid-independent sizes the forward pass needs.
#[derive(Debug, Clone)]
pub struct VisionMeta {
    /// Values per patch row.
    pub patch_dim: usize,
    /// Merge side (2).
    pub merge: usize,
    /// Side of the learned position grid.
    pub pos_grid_side: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vision RoPE base.
    pub rope_theta: f64,
    /// Blocks tapped by the DeepStack mergers.
    pub deepstack_indexes: Vec<usize>,
}

/// `Qwen3VLVisionModel`.
#[derive(Module, Debug)]
pub struct VisionModel<B: Backend> {
    /// Patch projection.
    pub patch_embed: PatchEmbed<B>,
    /// Learned [G², D] position table.
    pub pos_embed: Embedding<B>,
    /// Transformer blocks.
    pub blocks: Vec<VisionBlock<B>>,
    /// Final merger.
    pub merger: PatchMerger<B>,
    /// One merger per DeepStack tap.
    pub deepstack_merger_list: Vec<PatchMerger<B>>,
    /// Sizes.
    #[module(skip)]
    pub meta: VisionMeta,
}

/// What the vision tower returns for a batch of images.
#[derive(Debug, Clone)]
pub struct VisionOutput<B: Backend> {
    /// Hidden state after the last block, [N, D] in patch order.
    pub last_hidden: Tensor<B, 2>,
    /// Merged tokens, [N/4, out_hidden], images concatenated.
    pub merged: Tensor<B, 2>,
    /// One [N/4, out_hidden] feature per DeepStack tap, in block order.
    pub deepstack: Vec<Tensor<B, 2>>,
}

impl<B: Backend> PatchMerger<B> {
    fn init(c: &VisionConfig, postshuffle_norm: bool, device: &B::Device) -> Self {
        let m = c.merged_dim();
        let norm_dim = if postshuffle_norm { m } else { c.hidden_size };
        Self {
            norm: LayerNorm::init(norm_dim, LN_EPS, device),
            linear_fc1: Projection::init(m, m, true, device),
            linear_fc2: Projection::init(m, c.out_hidden_size, true, device),
            postshuffle_norm,
        }
    }

    /// [N, D] in merge-block order -> [N/4, out].
    pub fn forward(&self, x: Tensor<B, 2>, stats: &AdapterStats<B>) -> Tensor<B, 2> {
        let [n, d] = x.dims();
        let m = self.linear_fc1.d_in();
        let x = if self.postshuffle_norm {
            self.norm.forward(x.reshape([n * d / m, m]))
        } else {
            self.norm.forward(x).reshape([n * d / m, m])
        };
        self.linear_fc2
            .forward(gelu(self.linear_fc1.forward(x, stats)), stats)
    }
}

impl<B: Backend> VisionBlock<B> {
    fn init(c: &VisionConfig, device: &B::Device) -> Self {
        let d = c.hidden_size;
        Self {
            norm1: LayerNorm::init(d, LN_EPS, device),
            norm2: LayerNorm::init(d, LN_EPS, device),
            attn: VisionAttention {
                qkv: Projection::init(d, 3 * d, true, device),
                proj: Projection::init(d, d, true, device),
                num_heads: c.num_heads,
            },
            mlp: VisionMlp {
                linear_fc1: Projection::init(d, c.intermediate_size, true, device),
                linear_fc2: Projection::init(c.intermediate_size, d, true, device),
                gelu_tanh: c.act() == VisionAct::GeluTanh,
            },
        }
    }

    /// One block over all patches; attention stays within each `(start, len)` segment.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        rope: &(Tensor<B, 3>, Tensor<B, 3>),
        segments: &[(usize, usize)],
        stats: &AdapterStats<B>,
    ) -> Tensor<B, 2> {
        let h = x.clone()
            + self
                .attn
                .forward(self.norm1.forward(x), rope, segments, stats);
        let y = self
            .mlp
            .linear_fc1
            .forward(self.norm2.forward(h.clone()), stats);
        let y = if self.mlp.gelu_tanh {
            gelu_approximate(y)
        } else {
            gelu(y)
        };
        h + self.mlp.linear_fc2.forward(y, stats)
    }
}

impl<B: Backend> VisionAttention<B> {
    /// Non-causal attention per segment, RoPE applied in f32.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        (cos, sin): &(Tensor<B, 3>, Tensor<B, 3>),
        segments: &[(usize, usize)],
        stats: &AdapterStats<B>,
    ) -> Tensor<B, 2> {
        let [n, d] = x.dims();
        let nh = self.num_heads;
        let hd = d / nh;
        let dtype = x.dtype();
        // [N, 3D] -> [N, 3, nh, hd]; rows of the fused weight are Q | K | V.
        let qkv = self.qkv.forward(x, stats).reshape([n, 3, nh, hd]);
        let part = |i: usize| qkv.clone().narrow(1, i, 1).reshape([n, nh, hd]);
        let rot = |t: Tensor<B, 3>| {
            apply_rotary(t.cast(DType::F32), cos.clone(), sin.clone()).cast(dtype)
        };
        let (q, k, v) = (rot(part(0)), rot(part(1)), part(2));
        let outs: Vec<Tensor<B, 2>> = segments
            .iter()
            .map(|&(start, len)| {
                // [len, nh, hd] -> [1, nh, len, hd]
                let seg = |t: &Tensor<B, 3>| {
                    t.clone()
                        .narrow(0, start, len)
                        .swap_dims(0, 1)
                        .unsqueeze_dim(0)
                };
                let o = attention(seg(&q), seg(&k), seg(&v), None);
                o.squeeze_dim::<3>(0).swap_dims(0, 1).reshape([len, d])
            })
            .collect();
        self.proj.forward(Tensor::cat(outs, 0), stats)
    }
}

impl<B: Backend> VisionModel<B> {
    /// A lazily initialised tower for `c`.
    pub fn init(c: &VisionConfig, device: &B::Device) -> Self {
        Self {
            patch_embed: PatchEmbed {
                proj: Linear::init(c.patch_dim(), c.hidden_size, true, device),
            },
            pos_embed: Embedding::init(c.num_position_embeddings, c.hidden_size, device),
            blocks: (0..c.depth).map(|_| VisionBlock::init(c, device)).collect(),
            merger: PatchMerger::init(c, false, device),
            deepstack_merger_list: c
                .deepstack_visual_indexes
                .iter()
                .map(|_| PatchMerger::init(c, true, device))
                .collect(),
            meta: VisionMeta {
                patch_dim: c.patch_dim(),
                merge: c.spatial_merge_size,
                pos_grid_side: c.pos_grid_side(),
                head_dim: c.head_dim(),
                rope_theta: c.rope_theta(),
                deepstack_indexes: c.deepstack_visual_indexes.clone(),
            },
        }
    }

    /// Runs the tower on `pixel_values` [N, C·T·P·P] for images with patch grids `grids`.
    pub fn forward(
        &self,
        pixel_values: Tensor<B, 2>,
        grids: &[[usize; 3]],
        stats: &AdapterStats<B>,
    ) -> Result<VisionOutput<B>> {
        let meta = &self.meta;
        let [n, pd] = pixel_values.dims();
        if pd != meta.patch_dim {
            return Err(Error::Input(format!(
                "pixel_values rows have {pd} values, the vision config needs {}",
                meta.patch_dim
            )));
        }
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if expected != n {
            return Err(Error::Input(format!(
                "pixel_values has {n} patch rows but image_grid_thw {grids:?} needs {expected}"
            )));
        }
        for (i, g) in grids.iter().enumerate() {
            if g.contains(&0) || g[1] % meta.merge != 0 || g[2] % meta.merge != 0 {
                return Err(Error::Input(format!(
                    "image_grid_thw row {i} = {g:?}: t, h, w must be > 0 and h, w divisible by \
                     the merge size {}",
                    meta.merge
                )));
            }
        }
        let device = pixel_values.device();
        let dtype = self.patch_embed.proj.weight.val().dtype();
        let mut x = self.patch_embed.proj.forward(pixel_values.cast(dtype));
        x = x + self.position_embeddings(grids, &device).cast(dtype);

        let coords = patch_rows_cols(grids, meta.merge);
        let rope = vision_cos_sin::<B>(&coords, meta.head_dim, meta.rope_theta, &device);
        let segments = frame_segments(grids);
        let mut deepstack = Vec::with_capacity(meta.deepstack_indexes.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, &rope, &segments, stats);
            if let Some(k) = meta.deepstack_indexes.iter().position(|&j| j == i) {
                deepstack.push(self.deepstack_merger_list[k].forward(x.clone(), stats));
            }
        }
        let merged = self.merger.forward(x.clone(), stats);
        Ok(VisionOutput {
            last_hidden: x,
            merged,
            deepstack,
        })
    }

    /// Bilinear (align-corners) samples of the learned grid for every patch, f32 [N, D].
    fn position_embeddings(&self, grids: &[[usize; 3]], device: &B::Device) -> Tensor<B, 2> {
        let (idx, w) = pos_embed_interpolation(grids, self.meta.pos_grid_side, self.meta.merge);
        let n = w.len() / 4;
        let table = self.pos_embed.weight.val();
        let d = table.dims()[1];
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [4 * n]), device);
        let w = Tensor::<B, 3>::from_data(TensorData::new(w, [n, 4, 1]), (device, DType::F32));
        // [4N, D] -> [N, 4, D], weighted sum over the 4 corners in f32.
        let rows = table.select(0, idx).cast(DType::F32).reshape([n, 4, d]);
        (rows * w).sum_dim(1).reshape([n, d])
    }
}

/// (row, col) of every patch, in merge-block order, repeated for each frame.
pub fn patch_rows_cols(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for mh in 0..merge {
                        for mw in 0..merge {
                            out.push((bh * merge + mh, bw * merge + mw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Attention segments (start row, rows): one per frame of each image.
pub fn frame_segments(grids: &[[usize; 3]]) -> Vec<(usize, usize)> {
    let mut start = 0;
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            out.push((start, h * w));
            start += h * w;
        }
    }
    out
}

/// Indices into the G x G table and weights (4 per patch, corners (y0,x0), (y0,x1), (y1,x0),
/// (y1,x1)) of the align-corners bilinear resampling to each image's h x w grid.
pub fn pos_embed_interpolation(
    grids: &[[usize; 3]],
    g: usize,
    merge: usize,
) -> (Vec<i64>, Vec<f32>) {
    let mut idx = Vec::new();
    let mut wts = Vec::new();
    for &[t, h, w] in grids {
        let coord = |i: usize, n: usize| -> (usize, usize, f32) {
            let s = if n == 1 {
                0.0
            } else {
                (i as f32 * (g - 1) as f32) / (n - 1) as f32
            };
            let lo = s.floor() as usize;
            (lo, (lo + 1).min(g - 1), s - lo as f32)
        };
        for (r, c) in patch_rows_cols(&[[t, h, w]], merge) {
            let (y0, y1, dy) = coord(r, h);
            let (x0, x1, dx) = coord(c, w);
            idx.extend([y0 * g + x0, y0 * g + x1, y1 * g + x0, y1 * g + x1].map(|v| v as i64));
            wts.extend([
                (1.0 - dy) * (1.0 - dx),
                (1.0 - dy) * dx,
                dy * (1.0 - dx),
                dy * dx,
            ]);
        }
    }
    (idx, wts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_block_order() {
        let rc = patch_rows_cols(&[[1, 2, 4]], 2);
        assert_eq!(
            rc,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }

    #[test]
    fn interpolation_hits_corners_exactly() {
        let (idx, w) = pos_embed_interpolation(&[[1, 2, 2]], 48, 2);
        // patch (0,0) -> cell 0; (1,1) -> cell 47·48 + 47 with weight 1.
        assert_eq!(idx[0], 0);
        assert_eq!(w[0], 1.0);
        let last = &idx[12..16];
        assert!(last.contains(&(47 * 48 + 47)));
        let total: f32 = w[12..16].iter().sum();
        assert_eq!(total, 1.0);
    }

    #[test]
    fn segments_per_frame() {
        assert_eq!(
            frame_segments(&[[1, 4, 6], [2, 2, 2]]),
            vec![(0, 24), (24, 4), (28, 4)]
        );
    }
}
