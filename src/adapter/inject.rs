//! Wrapping the model's linear layers with adapters, by module name, and the parameter summary.

use burn::prelude::*;

use super::config::{AdapterConfig, AdapterKind};
use super::{LoraLinear, MoeLoraLinear, MoeLoraOptions, Projection};
use crate::error::{Error, Result};
use crate::model::params::{count_params, group};
use crate::model::Qwen3VlModel;

/// One targetable layer: its HF module name, decoder-layer/vision-block index, and the layer.
pub struct Site<'a, B: Backend> {
    /// e.g. `model.language_model.layers.3.self_attn.q_proj`
    pub name: String,
    /// Layer or block index (None for the mergers).
    pub layer: Option<usize>,
    /// The layer.
    pub proj: &'a mut Projection<B>,
}

impl<B: Backend> Site<'_, B> {
    /// The last path component (`q_proj`, `qkv`, `linear_fc1`...).
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }
}

/// Every targetable linear layer of the model, text first, in module order.
pub fn sites<B: Backend>(model: &mut Qwen3VlModel<B>) -> Vec<Site<'_, B>> {
    let mut out = Vec::new();
    for (i, l) in model.language_model.layers.iter_mut().enumerate() {
        let p = format!("model.language_model.layers.{i}");
        let a = &mut l.self_attn;
        for (n, proj) in [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
        ] {
            out.push(Site {
                name: format!("{p}.{n}"),
                layer: Some(i),
                proj,
            });
        }
        let m = &mut l.mlp;
        for (n, proj) in [
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ] {
            out.push(Site {
                name: format!("{p}.{n}"),
                layer: Some(i),
                proj,
            });
        }
    }
    for (i, b) in model.visual.blocks.iter_mut().enumerate() {
        let p = format!("model.visual.blocks.{i}");
        for (n, proj) in [
            ("attn.qkv", &mut b.attn.qkv),
            ("attn.proj", &mut b.attn.proj),
            ("mlp.linear_fc1", &mut b.mlp.linear_fc1),
            ("mlp.linear_fc2", &mut b.mlp.linear_fc2),
        ] {
            out.push(Site {
                name: format!("{p}.{n}"),
                layer: Some(i),
                proj,
            });
        }
    }
    let mergers = std::iter::once(("model.visual.merger".to_string(), &mut model.visual.merger))
        .chain(
            model
                .visual
                .deepstack_merger_list
                .iter_mut()
                .enumerate()
                .map(|(k, m)| (format!("model.visual.deepstack_merger_list.{k}"), m)),
        );
    for (p, m) in mergers {
        out.push(Site {
            name: format!("{p}.linear_fc1"),
            layer: None,
            proj: &mut m.linear_fc1,
        });
        out.push(Site {
            name: format!("{p}.linear_fc2"),
            layer: None,
            proj: &mut m.linear_fc2,
        });
    }
    out
}

/// Freezes the model and wraps every layer `cfg` targets; returns how many were wrapped.
/// A configuration that matches nothing is an error.
pub fn inject<B: Backend>(
    model: Qwen3VlModel<B>,
    cfg: &AdapterConfig,
) -> Result<(Qwen3VlModel<B>, usize)> {
    cfg.validate()?;
    let mut model = super::freeze(model);
    model.meta.aux_loss_coef = if cfg.kind == AdapterKind::Moelora {
        cfg.aux_loss_coef
    } else {
        0.0
    };
    let mut wrapped = 0;
    for site in sites(&mut model) {
        if !cfg.targets.iter().any(|t| t == site.short_name()) {
            continue;
        }
        let in_layers = match (&cfg.layers, site.layer) {
            (None, _) => true,
            (Some(ls), Some(l)) => ls.contains(&l),
            (Some(_), None) => false,
        };
        if !in_layers {
            continue;
        }
        let Projection::Plain(base) = &*site.proj else {
            return Err(Error::Input(format!(
                "{} already has an adapter",
                site.name
            )));
        };
        let base = base.clone();
        *site.proj = match cfg.kind {
            AdapterKind::Lora => {
                Projection::Lora(LoraLinear::new(base, cfg.r, cfg.alpha, cfg.dropout))
            }
            AdapterKind::Moelora => Projection::MoeLora(MoeLoraLinear::new(
                base,
                MoeLoraOptions {
                    r: cfg.r,
                    alpha: cfg.alpha,
                    experts: cfg.experts,
                    top_k: cfg.top_k,
                    renormalize: cfg.renormalize,
                    dropout: cfg.dropout,
                    router_dropout: cfg.router_dropout,
                },
            )),
        };
        wrapped += 1;
    }
    if wrapped == 0 {
        return Err(Error::Argument {
            arg: "targets".into(),
            message: format!(
                "{:?} with layers {:?} matched no module of this model",
                cfg.targets, cfg.layers
            ),
        });
    }
    Ok((model, wrapped))
}

/// (trainable adapter parameters, all parameters) of a model. An NF4 weight counts as its
/// packed bytes (half its values), as peft reports a bitsandbytes 4-bit model.
pub fn trainable_counts<B: Backend>(model: &mut Qwen3VlModel<B>) -> (usize, usize) {
    let dense = count_params(&*model);
    let sites = sites(model);
    let packed: usize = sites
        .iter()
        .filter(|s| matches!(s.proj.base(), super::BaseLinear::Nf4(_)))
        .map(|s| s.proj.base().d_in() * s.proj.base().d_out() / 2)
        .sum();
    let trainable = sites.iter().map(|s| s.proj.adapter_params()).sum();
    (trainable, dense + packed)
}

/// peft's `print_trainable_parameters` line.
pub fn trainable_line(trainable: usize, all: usize) -> String {
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        group(trainable),
        group(all),
        100.0 * trainable as f64 / all.max(1) as f64
    )
}
