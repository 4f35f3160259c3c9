//! `info --model PATH`: architecture summary and parameter counts by component.

use std::fmt::Write;
use std::path::Path;

use burn::prelude::*;

use crate::adapter::inject::{inject, sites, trainable_counts, trainable_line};
use crate::adapter::{AdapterConfig, AdapterKind};
use crate::error::Result;
use crate::model::config::config_file;
use crate::model::params::{group, param_breakdown};
use crate::model::{Qwen3VlConfig, Qwen3VlModel};

/// Renders the report for the model folder or `config.json` at `path`, with `adapter`
/// injected when given (its peft-style trainable line last). Builds the model lazily on
/// `device`: nothing is allocated, so the 8B prints instantly.
pub fn info_report<B: Backend>(
    path: &Path,
    adapter: Option<&AdapterConfig>,
    device: &B::Device,
) -> Result<String> {
    let file = config_file(path);
    let cfg = Qwen3VlConfig::from_path(&file)?;
    let base = Qwen3VlModel::<B>::init(&cfg, device);
    let model = base;
    let b = param_breakdown(&model);
    let t = &cfg.text_config;
    let v = &cfg.vision_config;
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "model: Qwen3-VL ({})", file.display());
    let _ = writeln!(
        w,
        "text decoder: {} layers, hidden {}, MLP {} (SwiGLU), {} query / {} KV heads x {}, \
         vocab {}, RMSNorm eps {:e}",
        t.num_hidden_layers,
        t.hidden_size,
        t.intermediate_size,
        t.num_attention_heads,
        t.kv_heads(),
        t.head_dim(),
        group(t.vocab_size),
        t.rms_norm_eps
    );
    let _ = writeln!(
        w,
        "  M-RoPE: theta {}, section {:?} (interleaved t/h/w); lm_head {}",
        t.rope_theta(),
        t.mrope_section(),
        if cfg.tie_word_embeddings {
            "tied to embed_tokens"
        } else {
            "separate"
        }
    );
    let g = v.pos_grid_side();
    let _ = writeln!(
        w,
        "vision tower: {} blocks, hidden {}, MLP {} ({}), {} heads x {}, patch {}x{} x {} frames, \
         merge {}x{} -> {}",
        v.depth,
        v.hidden_size,
        v.intermediate_size,
        v.hidden_act,
        v.num_heads,
        v.head_dim(),
        v.patch_size,
        v.patch_size,
        v.temporal_patch_size,
        v.spatial_merge_size,
        v.spatial_merge_size,
        v.out_hidden_size
    );
    let _ = writeln!(
        w,
        "  learned positions {g}x{g} (bilinear, align corners), 2-D RoPE theta {}, DeepStack taps \
         after blocks {:?}",
        v.rope_theta(),
        v.deepstack_visual_indexes
    );
    let _ = writeln!(
        w,
        "tokens: image {} video {} vision_start {} vision_end {}",
        cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    );
    let _ = writeln!(w);
    let width = b
        .text
        .iter()
        .chain(b.vision.iter())
        .map(|r| r.0.len())
        .max()
        .unwrap_or(0)
        + 8;
    for (part, rows) in [("text", &b.text), ("vision", &b.vision)] {
        for (name, n) in rows.iter() {
            let label = format!("{part} {name}");
            let _ = writeln!(w, "  {label:<width$} {:>15}", group(*n));
        }
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "text: {}", group(b.text_total()));
    let _ = writeln!(w, "vision: {}", group(b.vision_total()));
    let _ = writeln!(w, "parameters: {}", group(b.total()));
    let _ = writeln!(
        w,
        "size: {:.2} GB in bf16/f16, {:.2} GB in f32",
        b.total() as f64 * 2.0 / 1e9,
        b.total() as f64 * 4.0 / 1e9
    );
    let mut model = model;
    let quantized: usize = sites(&mut model)
        .iter()
        .map(|s| s.proj.base().d_in() * s.proj.base().d_out())
        .sum();
    let layers = sites(&mut model).len();
    let dense = b.total() - quantized;
    // As bitsandbytes stores it, and as `Nf4Linear` holds it on the device: 4-bit codes, one
    // u8 scale per 64 values, one f32 per 256 scales, the 16- and 256-value maps and the offset
    // per layer; the rest in bf16/f16.
    let bytes = quantized / 2
        + quantized / 64
        + quantized.div_ceil(64 * 256) * 4
        + layers * (16 + 256 + 1) * 4
        + dense * 2;
    let _ = writeln!(
        w,
        "NF4 base: {} linear weights quantized ({} layers), bitsandbytes parameter count {}; \
         {:.2} GB with double quant and a 16-bit rest",
        group(quantized),
        layers,
        group(quantized / 2 + dense),
        bytes as f64 / 1e9
    );
    if let Some(a) = adapter {
        let (mut adapted, layers) = inject(model, a)?;
        let (trainable, all) = trainable_counts(&mut adapted);
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "adapter: {} r={} alpha={} on {} layers ({}){}",
            match a.kind {
                AdapterKind::Lora => "LoRA".to_string(),
                AdapterKind::Moelora =>
                    format!("MoE-LoRA with {} experts, top-{}", a.experts, a.top_k),
            },
            a.r,
            a.alpha,
            layers,
            a.targets.join(","),
            match &a.layers {
                Some(l) => format!(", decoder layers / vision blocks {l:?}"),
                None => String::new(),
            }
        );
        let _ = writeln!(w, "{}", trainable_line(trainable, all));
    }
    Ok(s)
}
