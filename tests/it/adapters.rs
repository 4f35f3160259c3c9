//! Adapters on the real model: a peft-made LoRA folder loads and gives peft's logits; our
//! exported folder has peft's names and loads back identically; MoE-LoRA round-trips too.

use qwen3_vl_moelora::adapter::inject::inject;
use qwen3_vl_moelora::adapter::peft::{load_adapter, read_adapter_config, save_adapter};
use qwen3_vl_moelora::adapter::{AdapterConfig, AdapterKind};
use qwen3_vl_moelora::checkpoint::{load_model, HostTensor, TensorFile, WeightDType};
use qwen3_vl_moelora::cli::forward::{output_tensors, read_inputs};
use qwen3_vl_moelora::model::Qwen3VlModel;

use crate::common::*;

fn logits(model: &Qwen3VlModel<Cpu>) -> HostTensor {
    let inputs = read_inputs::<Cpu>(&tiny_inputs(), &Default::default()).unwrap();
    output_tensors(&model.forward(&inputs, false).unwrap(), false)
        .remove("logits")
        .unwrap()
}

fn moe(r: usize, targets: &[&str]) -> AdapterConfig {
    AdapterConfig {
        kind: AdapterKind::Moelora,
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        experts: 2,
        top_k: 1,
        renormalize: false,
        router_dropout: 0.0,
        aux_loss_coef: 0.01,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        layers: None,
    }
}

fn base() -> Qwen3VlModel<Cpu> {
    load_model::<Cpu>(&tiny_model(), &Default::default(), WeightDType::F32)
        .unwrap()
        .1
}

#[test]
fn peft_lora_folder_matches_peft_logits() {
    let dir = reference("tiny-qwen3-vl-lora");
    let (mut model, cfg) = load_adapter(base(), &dir).unwrap();
    assert_eq!((cfg.kind, cfg.r, cfg.alpha), (AdapterKind::Lora, 4, 8.0));
    let want = TensorFile::read(&reference("tiny-qwen3-vl-lora-reference.safetensors")).unwrap();
    let got = logits(&model);
    let err = rel_err(&got, &want.tensors["logits"], Some(&tiny_mask()));
    assert!(err <= 1e-4, "logits vs peft: {err:.3e}");
    // The adapter changes the output (B is non-zero).
    let plain = rel_err(
        &logits(&base()),
        &want.tensors["logits"],
        Some(&tiny_mask()),
    );
    assert!(plain > 1e-3, "{plain}");

    // Export: same keys, shapes and values as the peft file; reloads to the same logits.
    let out = tempfile::tempdir().unwrap();
    save_adapter(
        &mut model,
        &cfg,
        "tests/reference/tiny-qwen3-vl",
        out.path(),
    )
    .unwrap();
    let ours = TensorFile::read(&out.path().join("adapter_model.safetensors")).unwrap();
    let theirs = TensorFile::read(&dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.tensors.keys().collect::<Vec<_>>(),
        theirs.tensors.keys().collect::<Vec<_>>()
    );
    assert_eq!(ours.tensors, theirs.tensors);
    assert_eq!(read_adapter_config(out.path()).unwrap(), cfg);
    let (reloaded, _) = load_adapter(base(), out.path()).unwrap();
    assert_eq!(logits(&reloaded), got);
    // For the check in Python (make_peft_fixture.py --check DIR): keep a copy when asked.
    if let Ok(keep) = std::env::var("QWEN3VL_KEEP_EXPORT") {
        save_adapter(
            &mut model,
            &cfg,
            "tests/reference/tiny-qwen3-vl",
            std::path::Path::new(&keep),
        )
        .unwrap();
    }
}

#[test]
fn moelora_round_trips_and_starts_at_the_base() {
    let cfg = AdapterConfig {
        kind: AdapterKind::Moelora,
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        experts: 3,
        top_k: 2,
        renormalize: true,
        router_dropout: 0.1,
        aux_loss_coef: 0.01,
        targets: vec!["q_proj".into(), "down_proj".into(), "qkv".into()],
        layers: Some(vec![0, 2]),
    };
    let (mut model, n) = inject(base(), &cfg).unwrap();
    assert_eq!(n, 2 + 2 + 2); // q_proj, down_proj in layers 0, 2; qkv in blocks 0, 2
                              // A fresh plain LoRA leaves the model unchanged as well.
    let lora = AdapterConfig {
        kind: AdapterKind::Lora,
        ..cfg.clone()
    };
    assert_eq!(logits(&inject(base(), &lora).unwrap().0), logits(&base()));
    // Zero-initialised B: the output equals the base model's exactly.
    assert_eq!(logits(&model), logits(&base()));
    let inputs = read_inputs::<Cpu>(&tiny_inputs(), &Default::default()).unwrap();
    let out = model.forward(&inputs, false).unwrap();
    assert_eq!(out.expert_tokens.len(), 3);
    let aux: f32 = out.aux_loss.unwrap().into_scalar();
    assert!(aux > 0.0 && aux.is_finite());

    let dir = tempfile::tempdir().unwrap();
    save_adapter(&mut model, &cfg, "tiny", dir.path()).unwrap();
    let (reloaded, read) = load_adapter(base(), dir.path()).unwrap();
    assert_eq!(read, cfg);
    assert_eq!(logits(&reloaded), logits(&model));
    let file = TensorFile::read(&dir.path().join("adapter_model.safetensors")).unwrap();
    assert!(file.contains(
        "base_model.model.model.language_model.layers.2.mlp.down_proj.moe_experts.2.lora_B.weight"
    ));
    assert!(file.contains("base_model.model.model.visual.blocks.0.attn.qkv.moe_router.weight"));

    // A folder without an adapter is a clear error.
    let empty = tempfile::tempdir().unwrap();
    let err = load_adapter(base(), empty.path()).unwrap_err().to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("holds no adapter"),
        "{err}"
    );
}

#[test]
fn only_adapter_tensors_get_gradients() {
    type Ad = burn::backend::Autodiff<Cpu>;
    let dev = Default::default();
    let (_, model) = load_model::<Ad>(&tiny_model(), &dev, WeightDType::F32).unwrap();
    for kind in [AdapterKind::Lora, AdapterKind::Moelora] {
        let cfg = AdapterConfig {
            kind,
            ..moe(2, &["q_proj", "v_proj", "linear_fc2"])
        };
        let (model, wrapped) = inject(model.clone(), &cfg).unwrap();
        let inputs = read_inputs::<Ad>(&tiny_inputs(), &dev).unwrap();
        let out = model.forward(&inputs, false).unwrap();
        let mut loss = out.logits.powi_scalar(2).mean();
        if let Some(aux) = out.aux_loss {
            loss = loss + aux;
        }
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
        let per_layer = if kind == AdapterKind::Lora { 2 } else { 3 };
        assert_eq!(
            grads.len(),
            wrapped * per_layer,
            "{kind:?}: only adapter tensors"
        );
        let total = qwen3_vl_moelora::model::params::count_params(&model);
        assert!(total > 400_000);
    }
}

#[test]
fn merge_folds_lora_into_the_weights_and_refuses_moelora() {
    use qwen3_vl_moelora::adapter::merge::{merge_lora, MergeDType};
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("merged");
    let n = merge_lora(
        &tiny_model(),
        &reference("tiny-qwen3-vl-lora"),
        &dir,
        MergeDType::F32,
    )
    .unwrap();
    // q,k,v,o in 4 layers + qkv and linear_fc1 in 4 blocks + linear_fc1 of 4 mergers.
    assert_eq!(n, 16 + 4 + 4 + 4);
    let (_, merged) = load_model::<Cpu>(&dir, &Default::default(), WeightDType::F32).unwrap();
    let want = TensorFile::read(&reference("tiny-qwen3-vl-lora-reference.safetensors")).unwrap();
    let err = rel_err(
        &logits(&merged),
        &want.tensors["logits"],
        Some(&tiny_mask()),
    );
    assert!(err <= 1e-4, "merged logits vs peft: {err:.3e}");
    // Kept dtype (bf16 like the base): close, rounded.
    let dir16 = out.path().join("merged16");
    merge_lora(
        &tiny_model(),
        &reference("tiny-qwen3-vl-lora"),
        &dir16,
        MergeDType::Keep,
    )
    .unwrap();
    let (_, m16) = load_model::<Cpu>(&dir16, &Default::default(), WeightDType::F32).unwrap();
    let err16 = rel_err(&logits(&m16), &want.tensors["logits"], Some(&tiny_mask()));
    assert!(err16 < 2e-2, "{err16}");

    // MoE-LoRA is refused with the reason.
    let cfg = moe(2, &["q_proj"]);
    let (mut model, _) = inject(base(), &cfg).unwrap();
    let moe = out.path().join("moe");
    save_adapter(&mut model, &cfg, "tiny", &moe).unwrap();
    let err = merge_lora(&tiny_model(), &moe, &out.path().join("x"), MergeDType::Keep).unwrap_err();
    assert!(err.to_string().contains("cannot be merged"), "{err}");
}
