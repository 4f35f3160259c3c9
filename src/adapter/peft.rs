//! Adapter folders in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Plain LoRA uses peft's names (`base_model.model.<module>.lora_A.weight` [r, in],
//! `.lora_B.weight` [out, r]) and config (`peft_type: "LORA"`), so `PeftModel.from_pretrained`
//! loads it and a peft LoRA folder loads here. MoE-LoRA uses the same layout with
//! `peft_type: "MOELORA"`, the extra fields `num_experts`, `top_k`, `renormalize`,
//! `router_dropout`, `aux_loss_coef`, and the keys `<module>.moe_router.weight` [E, in],
//! `<module>.moe_experts.<e>.lora_A.weight` and `.lora_B.weight`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::DType;
use serde_json::{json, Value};

use super::config::{AdapterConfig, AdapterKind};
use super::inject::{inject, sites};
use super::Projection;
use crate::checkpoint::save::to_host_f32;
use crate::checkpoint::tensor_file::{write_atomically, write_tensors};
use crate::checkpoint::TensorFile;
use crate::error::{Error, Result};
use crate::model::Qwen3VlModel;

/// File names inside an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Weights file inside an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn key(module: &str, rest: &str) -> String {
    format!("base_model.model.{module}.{rest}")
}

/// Reads `adapter_config.json` of a peft LoRA folder or one of ours.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let file = dir.join(CONFIG_FILE);
    if !file.exists() {
        return Err(Error::MissingFile {
            path: file,
            hint: format!(
                "{} holds no adapter: pass a folder with {CONFIG_FILE} and {WEIGHTS_FILE} \
                 (a training output folder or a peft LoRA folder)",
                dir.display()
            ),
        });
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: file.clone(),
        message: e.to_string(),
    })?;
    let bad = |field: &str, message: String| Error::Config {
        path: file.clone(),
        field: field.into(),
        message,
    };
    let kind = match v["peft_type"].as_str() {
        Some("LORA") => AdapterKind::Lora,
        Some("MOELORA") => AdapterKind::Moelora,
        other => {
            return Err(bad(
                "peft_type",
                format!("expected \"LORA\" or \"MOELORA\", found {other:?}"),
            ))
        }
    };
    for (field, unsupported) in [("use_dora", true), ("use_rslora", true)] {
        if v[field].as_bool() == Some(unsupported) {
            return Err(bad(
                field,
                "is not supported (plain LoRA scaling alpha / r only)".into(),
            ));
        }
    }
    for field in ["rank_pattern", "alpha_pattern"] {
        if v[field].as_object().is_some_and(|o| !o.is_empty()) {
            return Err(bad(
                field,
                "per-module ranks or alphas are not supported".into(),
            ));
        }
    }
    if let Some(b) = v["bias"].as_str().filter(|b| *b != "none") {
        return Err(bad(
            "bias",
            format!("only \"none\" is supported (found \"{b}\")"),
        ));
    }
    let targets = match &v["target_modules"] {
        Value::Array(a) => a
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        Value::String(s) => {
            return Err(bad(
                "target_modules",
                format!("a regular expression ({s:?}) is not supported; list the module names"),
            ))
        }
        _ => return Err(bad("target_modules", "missing".into())),
    };
    let layers = match &v["layers_to_transform"] {
        Value::Null => None,
        Value::Number(n) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|n| n.as_u64().map(|n| n as usize))
                .collect(),
        ),
        _ => {
            return Err(bad(
                "layers_to_transform",
                "expected an integer or a list".into(),
            ))
        }
    };
    let num = |f: &str, default: f64| v[f].as_f64().unwrap_or(default);
    let cfg = AdapterConfig {
        kind,
        r: v["r"]
            .as_u64()
            .ok_or_else(|| bad("r", "missing or not an integer".into()))? as usize,
        alpha: num("lora_alpha", 8.0),
        dropout: num("lora_dropout", 0.0),
        experts: num("num_experts", 2.0) as usize,
        top_k: num("top_k", 1.0) as usize,
        renormalize: v["renormalize"].as_bool().unwrap_or(false),
        router_dropout: num("router_dropout", 0.0),
        aux_loss_coef: num("aux_loss_coef", 0.01),
        targets,
        layers,
    };
    cfg.validate().map_err(|e| bad("adapter", e.to_string()))?;
    Ok(cfg)
}

/// Writes the adapter of `model` to `dir` (each file via a temporary file and a rename).
pub fn save_adapter<B: Backend>(
    model: &mut Qwen3VlModel<B>,
    cfg: &AdapterConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for s in sites(model) {
        match &*s.proj {
            Projection::Plain(_) => {}
            Projection::Lora(l) => {
                tensors.insert(key(&s.name, "lora_A.weight"), to_host_f32(l.lora_a.val()));
                tensors.insert(key(&s.name, "lora_B.weight"), to_host_f32(l.lora_b.val()));
            }
            Projection::MoeLora(l) => {
                tensors.insert(
                    key(&s.name, "moe_router.weight"),
                    to_host_f32(l.router.val()),
                );
                for e in 0..l.experts() {
                    let a = l.experts_a.val().narrow(0, e, 1).squeeze_dim::<2>(0);
                    let b = l.experts_b.val().narrow(0, e, 1).squeeze_dim::<2>(0);
                    tensors.insert(
                        key(&s.name, &format!("moe_experts.{e}.lora_A.weight")),
                        to_host_f32(a),
                    );
                    tensors.insert(
                        key(&s.name, &format!("moe_experts.{e}.lora_B.weight")),
                        to_host_f32(b),
                    );
                }
            }
        }
    }
    let mut config = json!({
        "peft_type": if cfg.kind == AdapterKind::Lora { "LORA" } else { "MOELORA" },
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets,
        "layers_to_transform": cfg.layers,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
    });
    if cfg.kind == AdapterKind::Moelora {
        config["num_experts"] = cfg.experts.into();
        config["top_k"] = cfg.top_k.into();
        config["renormalize"] = cfg.renormalize.into();
        config["router_dropout"] = cfg.router_dropout.into();
        config["aux_loss_coef"] = cfg.aux_loss_coef.into();
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_tensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Input(e.to_string()))?;
    write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Injects the adapter described by `dir` into `model` and loads its weights.
pub fn load_adapter<B: Backend>(
    model: Qwen3VlModel<B>,
    dir: &Path,
) -> Result<(Qwen3VlModel<B>, AdapterConfig)> {
    let cfg = read_adapter_config(dir)?;
    let (mut model, _) = inject(model, &cfg)?;
    let file = TensorFile::read(&dir.join(WEIGHTS_FILE))?;
    let mut used = BTreeSet::new();
    {
        let mut get = |name: String, shape: [usize; 2]| -> Result<Vec<f32>> {
            let (v, s) = file.f32(&name, 2)?;
            if s != shape {
                return Err(Error::ShapeMismatch {
                    name,
                    location: file.location.clone(),
                    expected: shape.to_vec(),
                    found: s,
                });
            }
            used.insert(name);
            Ok(v)
        };
        for s in sites(&mut model) {
            let (din, dout) = (s.proj.d_in(), s.proj.base().d_out());
            match s.proj {
                Projection::Plain(_) => {}
                Projection::Lora(l) => {
                    let dev = l.lora_a.lazy_device();
                    let r = l.lora_a.lazy_shape().dims::<2>()[0];
                    let a = get(key(&s.name, "lora_A.weight"), [r, din])?;
                    let b = get(key(&s.name, "lora_B.weight"), [dout, r])?;
                    l.lora_a = param(l.lora_a.id, a, [r, din], &dev);
                    l.lora_b = param(l.lora_b.id, b, [dout, r], &dev);
                }
                Projection::MoeLora(l) => {
                    let dev = l.router.lazy_device();
                    let (e_n, r) = (l.experts(), l.experts_a.lazy_shape().dims::<3>()[1]);
                    let router = get(key(&s.name, "moe_router.weight"), [e_n, din])?;
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    for e in 0..e_n {
                        a.extend(get(
                            key(&s.name, &format!("moe_experts.{e}.lora_A.weight")),
                            [r, din],
                        )?);
                        b.extend(get(
                            key(&s.name, &format!("moe_experts.{e}.lora_B.weight")),
                            [dout, r],
                        )?);
                    }
                    l.router = param(l.router.id, router, [e_n, din], &dev);
                    l.experts_a = param(l.experts_a.id, a, [e_n, r, din], &dev);
                    l.experts_b = param(l.experts_b.id, b, [e_n, dout, r], &dev);
                }
            }
        }
    }
    if let Some(extra) = file.tensors.keys().find(|k| !used.contains(*k)) {
        return Err(Error::Input(format!(
            "{}: tensor `{extra}` matches no adapted module of this model (wrong base model or \
             target_modules?)",
            file.location
        )));
    }
    Ok((model, cfg))
}

fn param<B: Backend, const D: usize>(
    id: burn::module::ParamId,
    v: Vec<f32>,
    shape: [usize; D],
    dev: &B::Device,
) -> Param<Tensor<B, D>> {
    let t = Tensor::<B, D>::from_data(TensorData::new(v, shape), (dev, DType::F32));
    Param::initialized(id, t.require_grad())
}
