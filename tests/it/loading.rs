//! Checkpoint loading: sharded and single files, bf16/f16/f32 on disk, untied LM head, and
//! the error messages for missing files and missing or mis-shaped tensors.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;
use qwen3_vl_moelora::checkpoint::{load_model, HostTensor, WeightDType};
use qwen3_vl_moelora::cli::forward::{output_tensors, read_inputs};
use qwen3_vl_moelora::Error;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::common::*;

/// (name, dtype, shape, bytes) of every tensor of the fixture checkpoint.
type Raw = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn fixture_tensors() -> Raw {
    let bytes = std::fs::read(tiny_model().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Raw = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of the fixture folder with `tensors` as its weights (one file, or sharded).
fn model_dir(tensors: &Raw, shards: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_model().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    if shards == 1 {
        write(&dir.path().join("model.safetensors"), tensors);
    } else {
        let per = tensors.len().div_ceil(shards);
        let mut map = serde_json::Map::new();
        for (i, chunk) in tensors.chunks(per).enumerate() {
            let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
            write(&dir.path().join(&file), chunk);
            for t in chunk {
                map.insert(t.0.clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
    }
    dir
}

fn logits(dir: &Path) -> HostTensor {
    let dev = Default::default();
    let (_, model) = load_model::<Cpu>(dir, &dev, WeightDType::F32).unwrap();
    let inputs = read_inputs::<Cpu>(&tiny_inputs(), &dev).unwrap();
    output_tensors(&model.forward(&inputs, false).unwrap(), false)
        .remove("logits")
        .unwrap()
}

fn convert(tensors: &Raw, to: Dtype) -> Raw {
    tensors
        .iter()
        .map(|(n, d, s, b)| {
            assert_eq!(*d, Dtype::BF16);
            let vals = b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32());
            let bytes: Vec<u8> = match to {
                Dtype::F32 => vals.flat_map(f32::to_le_bytes).collect(),
                Dtype::F16 => vals
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                _ => unreachable!(),
            };
            (n.clone(), to, s.clone(), bytes)
        })
        .collect()
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let tensors = fixture_tensors();
    let single = logits(&tiny_model());
    let sharded = model_dir(&tensors, 3);
    assert_eq!(logits(sharded.path()), single);
}

#[test]
fn f32_and_f16_files_load() {
    let tensors = fixture_tensors();
    let mask = tiny_mask();
    let single = logits(&tiny_model());
    // bf16 -> f32 is exact, so the logits are identical.
    assert_eq!(
        logits(model_dir(&convert(&tensors, Dtype::F32), 2).path()),
        single
    );
    // bf16 -> f16 rounds tiny values; the model stays close.
    let f16 = logits(model_dir(&convert(&tensors, Dtype::F16), 1).path());
    let err = rel_err(&f16, &single, Some(&mask));
    assert!(err < 1e-2, "{err}");
}

#[test]
fn untied_lm_head_is_loaded_and_used() {
    let mut tensors = fixture_tensors();
    // A separate head: the embedding table scaled by -2 must scale the logits by -2.
    let embed = tensors
        .iter()
        .find(|t| t.0 == "model.language_model.embed_tokens.weight")
        .unwrap()
        .clone();
    let scaled: Vec<u8> = embed
        .3
        .chunks_exact(2)
        .flat_map(|c| {
            half::bf16::from_f32(-2.0 * half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .to_le_bytes()
        })
        .collect();
    tensors.push((
        "lm_head.weight".into(),
        Dtype::BF16,
        embed.2.clone(),
        scaled,
    ));
    let dir = model_dir(&tensors, 1);
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg = cfg.replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let (HostTensor::F32(untied, _), HostTensor::F32(tied, _)) =
        (logits(dir.path()), logits(&tiny_model()))
    else {
        unreachable!()
    };
    let worst = untied
        .iter()
        .zip(&tied)
        .map(|(u, t)| (u + 2.0 * t).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
    // And without lm_head.weight the untied model reports the missing tensor.
    tensors.pop();
    let dir2 = model_dir(&tensors, 1);
    std::fs::copy(
        dir.path().join("config.json"),
        dir2.path().join("config.json"),
    )
    .unwrap();
    let err = load_model::<Cpu>(dir2.path(), &Default::default(), WeightDType::F32).unwrap_err();
    assert!(
        err.to_string().contains("`lm_head.weight` is missing"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut tensors = fixture_tensors();
    tensors.retain(|t| t.0 != "model.visual.blocks.2.attn.qkv.bias");
    let dir = model_dir(&tensors, 2);
    let err = load_model::<Cpu>(dir.path(), &Default::default(), WeightDType::F32).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::MissingTensor { .. }), "{msg}");
    assert!(msg.contains("model.visual.blocks.2.attn.qkv.bias"), "{msg}");
}

#[test]
fn misshaped_tensor_names_expected_and_found() {
    let mut tensors = fixture_tensors();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "model.language_model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(t.2, vec![64, 64]);
    t.2 = vec![32, 128];
    let dir = model_dir(&tensors, 1);
    let err = load_model::<Cpu>(dir.path(), &Default::default(), WeightDType::F32).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model.language_model.layers.1.self_attn.k_proj.weight")
            && msg.contains("expected shape [64, 64], found [32, 128]"),
        "{msg}"
    );
}

#[test]
fn missing_files_say_what_to_download() {
    let err = load_model::<Cpu>(
        Path::new("model/Qwen3-VL-4B-Instruct-absent"),
        &Default::default(),
        WeightDType::F32,
    )
    .unwrap_err();
    assert!(err.to_string().contains("download"), "{err}");

    // Config present, weights absent.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_model().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_model::<Cpu>(dir.path(), &Default::default(), WeightDType::F32).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // A shard listed in the index but absent.
    let tensors = fixture_tensors();
    let dir = model_dir(&tensors, 2);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_model::<Cpu>(dir.path(), &Default::default(), WeightDType::F32).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("incomplete"),
        "{msg}"
    );

    // A truncated (corrupt) file.
    let dir = model_dir(&tensors, 1);
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_model::<Cpu>(dir.path(), &Default::default(), WeightDType::F32).unwrap_err();
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn weights_keep_the_requested_dtype() {
    let dev = Default::default();
    let (_, model) = load_model::<Cpu>(&tiny_model(), &dev, WeightDType::BF16).unwrap();
    assert_eq!(model.dtype(), DType::BF16);
    let w: Tensor<Cpu, 2> = model.visual.blocks[0]
        .attn
        .qkv
        .base()
        .dense()
        .unwrap()
        .weight
        .val();
    assert_eq!(w.dtype(), DType::BF16);
}
