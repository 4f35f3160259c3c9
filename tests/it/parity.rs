//! The model, loaded through the user-facing loader, against HF transformers' outputs on the
//! tiny fixture (`tests/reference/make_tiny_qwen3vl.py`): 2 left-padded sequences, 3 images
//! with non-square grids, DeepStack, GQA.

use qwen3_vl_moelora::checkpoint::{load_model, WeightDType};
use qwen3_vl_moelora::cli::forward::{output_tensors, read_inputs};

use crate::common::*;

fn run(
    dtype: WeightDType,
) -> std::collections::BTreeMap<String, qwen3_vl_moelora::checkpoint::HostTensor> {
    let dev = Default::default();
    let (_, model) = load_model::<Cpu>(&tiny_model(), &dev, dtype).unwrap();
    let inputs = read_inputs::<Cpu>(&tiny_inputs(), &dev).unwrap();
    let out = model.forward(&inputs, true).unwrap();
    output_tensors(&out, true)
}

#[test]
fn f32_matches_transformers_on_every_intermediate() {
    let got = run(WeightDType::F32);
    let want = tiny_reference();
    let mask = tiny_mask();
    let mut checked = 0;
    for (name, w) in &want.tensors {
        let g = got
            .get(name)
            .unwrap_or_else(|| panic!("forward did not produce {name}"));
        match w {
            qwen3_vl_moelora::checkpoint::HostTensor::I64(..) => assert_eq!(g, w, "{name}"),
            _ => {
                // Sequence tensors are compared at real tokens; padded rows are unspecified.
                let per_token = name == "logits" || name.starts_with("hidden_states_");
                let err = rel_err(g, w, per_token.then_some(mask.as_slice()));
                assert!(err <= 1e-4, "{name}: relative error {err:.3e} > 1e-4");
            }
        }
        checked += 1;
    }
    // logits, positions, deltas, vision last/merged, 3 DeepStack, 5 hidden states
    assert_eq!(checked, 13);
}

#[test]
fn low_precision_stays_close() {
    let want = tiny_reference();
    let mask = tiny_mask();
    for dtype in [WeightDType::BF16, WeightDType::F16] {
        let got = run(dtype);
        let err = rel_err(&got["logits"], &want.tensors["logits"], Some(&mask));
        assert!(err < 5e-2, "{dtype:?} logits relative error {err:.3e}");
        assert_eq!(got["position_ids"], want.tensors["position_ids"]);
    }
}

/// Training projects only the caption targets' rows onto the vocabulary: those logits must be
/// the full forward's logits at the same rows.
#[test]
fn selected_rows_have_the_full_forwards_logits() {
    let dev = Default::default();
    let (_, model) = load_model::<Cpu>(&tiny_model(), &dev, WeightDType::F32).unwrap();
    let inputs = read_inputs::<Cpu>(&tiny_inputs(), &dev).unwrap();
    let full = model.forward(&inputs, false).unwrap().logits;
    let [b, t, v] = full.dims();
    let rows = [1i64, (t + 2) as i64, (b * t - 1) as i64, 3];
    let picked = model.forward_rows(&inputs, &rows).unwrap().logits;
    assert_eq!(picked.dims(), [1, rows.len(), v]);
    let full = full.reshape([b * t, v]);
    for (i, &r) in rows.iter().enumerate() {
        let want = full.clone().narrow(0, r as usize, 1);
        let got = picked.clone().reshape([rows.len(), v]).narrow(0, i, 1);
        let err = (got - want.clone()).abs().max().into_scalar() / want.abs().max().into_scalar();
        assert!(err < 1e-5, "row {r}: relative error {err:.3e}");
    }
}
