//! KV-cache decoding against a full recompute, and greedy generation against HF `generate` on
//! the tiny fixture (`tests/reference/make_generate_fixture.py`).

use burn::prelude::*;
use qwen3_vl_moelora::checkpoint::{load_model, TensorFile, WeightDType};
use qwen3_vl_moelora::cli::forward::read_inputs;
use qwen3_vl_moelora::infer::generate::{generate, GenerateOptions};
use qwen3_vl_moelora::infer::sampling::SamplingOptions;
use qwen3_vl_moelora::model::{KvCache, ModelInputs, Qwen3VlModel};

use crate::common::*;

fn tiny() -> (Qwen3VlModel<Cpu>, ModelInputs<Cpu>) {
    let dev = Default::default();
    let (_, model) = load_model::<Cpu>(&tiny_model(), &dev, WeightDType::F32).unwrap();
    let inputs = read_inputs::<Cpu>(&tiny_inputs(), &dev).unwrap();
    (model, inputs)
}

fn host(t: Tensor<Cpu, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// max |a − b| / max |b|
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    num / den
}

/// `inputs` with `extra` [B, N] tokens appended to every row (mask 1).
fn appended(inputs: &ModelInputs<Cpu>, extra: &[Vec<i64>]) -> ModelInputs<Cpu> {
    let (b, t, n) = (inputs.batch, inputs.len, extra[0].len());
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let old_mask = inputs.attention_mask.clone().unwrap_or(vec![1; b * t]);
    for row in 0..b {
        ids.extend_from_slice(&inputs.input_ids[row * t..(row + 1) * t]);
        ids.extend_from_slice(&extra[row]);
        mask.extend_from_slice(&old_mask[row * t..(row + 1) * t]);
        mask.extend(std::iter::repeat_n(1, n));
    }
    ModelInputs {
        input_ids: ids,
        len: t + n,
        attention_mask: Some(mask),
        ..inputs.clone()
    }
}

/// Logits of the last position of a full forward pass, [B·V].
fn full_last(model: &Qwen3VlModel<Cpu>, inputs: &ModelInputs<Cpu>) -> Vec<f32> {
    let logits = model.forward(inputs, false).unwrap().logits;
    let [b, t, v] = logits.dims();
    host(logits.slice([0..b, t - 1..t, 0..v]).reshape([b, v]))
}

#[test]
fn kv_cache_decoding_matches_a_full_recompute() {
    let (model, inputs) = tiny();
    let b = inputs.batch;
    let mut cache = KvCache::new(model.language_model.layers.len(), b);
    let first = host(model.extend(&inputs, &mut cache).unwrap());
    assert!(rel(&first, &full_last(&model, &inputs)) <= 1e-5);
    // One token per step, then a 3-token chunk (as a chat's next turn), then one more token.
    let steps: Vec<Vec<Vec<i64>>> = vec![
        vec![vec![17], vec![200]],
        vec![vec![5], vec![5]],
        vec![vec![99], vec![3]],
        vec![vec![1, 2, 3], vec![4, 250 - 1, 6]],
        vec![vec![42], vec![43]],
    ];
    let mut extra: Vec<Vec<i64>> = vec![Vec::new(); b];
    for chunk in &steps {
        let n = chunk[0].len();
        let got = if n == 1 {
            let toks: Vec<i64> = chunk.iter().map(|r| r[0]).collect();
            host(model.decode_step(&toks, &mut cache).unwrap())
        } else {
            let step = ModelInputs {
                input_ids: chunk.concat(),
                batch: b,
                len: n,
                attention_mask: None,
                pixel_values: None,
                image_grid_thw: Vec::new(),
                image_features: None,
            };
            host(model.extend(&step, &mut cache).unwrap())
        };
        for (row, c) in chunk.iter().enumerate() {
            extra[row].extend_from_slice(c);
        }
        let want = full_last(&model, &appended(&inputs, &extra));
        let err = rel(&got, &want);
        assert!(err <= 1e-5, "after {extra:?}: relative error {err:.3e}");
    }
    assert_eq!(cache.len(), inputs.len + 7);
}

/// Row 0 of the fixture alone (unpadded, its two images).
fn first_row_alone(inputs: &ModelInputs<Cpu>) -> ModelInputs<Cpu> {
    let t = inputs.len;
    let rows: usize = inputs.image_grid_thw[..2]
        .iter()
        .map(|g| g.iter().product::<usize>())
        .sum();
    let pv = inputs.pixel_values.clone().unwrap();
    let width = pv.dims()[1];
    ModelInputs {
        input_ids: inputs.input_ids[..t].to_vec(),
        batch: 1,
        len: t,
        attention_mask: None,
        pixel_values: Some(pv.slice([0..rows, 0..width])),
        image_grid_thw: inputs.image_grid_thw[..2].to_vec(),
        image_features: None,
    }
}

/// Prefills `one` (a single row) and decodes `tokens`; the logits after each step.
fn decode_logits(
    model: &Qwen3VlModel<Cpu>,
    one: &ModelInputs<Cpu>,
    tokens: &[i64],
) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(model.language_model.layers.len(), 1);
    model.extend(one, &mut cache).unwrap();
    tokens
        .iter()
        .map(|&tok| host(model.decode_step(&[tok], &mut cache).unwrap()))
        .collect()
}

/// Row 0 of the fixture alone (unpadded, its two images): decode steps run without a mask.
#[test]
fn unpadded_single_row_decoding_matches_a_full_recompute() {
    let (model, inputs) = tiny();
    let one = first_row_alone(&inputs);
    let tokens = [7i64, 8, 9, 10];
    let mut extra = vec![Vec::new()];
    for (tok, got) in tokens.iter().zip(decode_logits(&model, &one, &tokens)) {
        extra[0].push(*tok);
        let err = rel(&got, &full_last(&model, &appended(&one, &extra)));
        assert!(err <= 1e-5, "after {extra:?}: relative error {err:.3e}");
    }
}

/// A sampled image or video placeholder id decodes as a text token (HF's decode steps never
/// look for a grid): no error, finite logits, and the next position advances by one.
#[test]
fn sampled_placeholder_ids_decode_as_text() {
    let (model, inputs) = tiny();
    let one = first_row_alone(&inputs);
    let mut cache = KvCache::new(model.language_model.layers.len(), 1);
    model.extend(&one, &mut cache).unwrap();
    for id in [model.meta.video_token_id, model.meta.image_token_id] {
        let before = cache.next_positions()[0];
        let logits = host(model.decode_step(&[id], &mut cache).unwrap());
        assert!(logits.iter().all(|v| v.is_finite()));
        assert_eq!(cache.next_positions()[0], before + 1);
    }
}

mod counted {
    //! The tensor-op layer kernels, counting their calls (what a registered backend runs,
    //! numerically the reference).
    use super::Cpu;
    use burn::prelude::*;
    use qwen3_vl_moelora::quant::kernels::layer_ops::LayerOps;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    pub static CALLS: [AtomicUsize; 5] = [const { AtomicUsize::new(0) }; 5];

    fn reference() -> LayerOps<Cpu> {
        LayerOps::reference()
    }
    fn rms_norm(x: Tensor<Cpu, 2>, w: Tensor<Cpu, 1>, eps: f64) -> Tensor<Cpu, 2> {
        CALLS[0].fetch_add(1, SeqCst);
        (reference().rms_norm)(x, w, eps)
    }
    fn rms_norm_rotary(
        x: Tensor<Cpu, 4>,
        w: Tensor<Cpu, 1>,
        eps: f64,
        cos: &Tensor<Cpu, 4>,
        sin: &Tensor<Cpu, 4>,
    ) -> Tensor<Cpu, 4> {
        CALLS[1].fetch_add(1, SeqCst);
        (reference().rms_norm_rotary)(x, w, eps, cos, sin)
    }
    fn softmax_scaled(x: Tensor<Cpu, 2>, scale: f64) -> Tensor<Cpu, 2> {
        CALLS[2].fetch_add(1, SeqCst);
        (reference().softmax_scaled)(x, scale)
    }
    fn swiglu(g: Tensor<Cpu, 2>, u: Tensor<Cpu, 2>) -> Tensor<Cpu, 2> {
        CALLS[3].fetch_add(1, SeqCst);
        (reference().swiglu)(g, u)
    }
    fn add_rms_norm(
        x: Tensor<Cpu, 2>,
        delta: Tensor<Cpu, 2>,
        w: Tensor<Cpu, 1>,
        eps: f64,
    ) -> (Tensor<Cpu, 2>, Tensor<Cpu, 2>) {
        CALLS[4].fetch_add(1, SeqCst);
        (reference().add_rms_norm)(x, delta, w, eps)
    }

    /// The table to register.
    pub fn ops() -> LayerOps<Cpu> {
        LayerOps {
            rms_norm,
            add_rms_norm,
            rms_norm_rotary,
            softmax_scaled,
            swiglu,
        }
    }
}

/// Each decode step's logits in `got` within relative error `tol` of `want`'s.
fn assert_steps_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f64) {
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        let err = rel(g, w);
        assert!(err <= tol, "decode step {step}: relative error {err:.3e}");
    }
}

/// With layer kernels registered for a backend, decoding sends every norm (the first and the
/// residual-add + norm ones), q/k norm + rotary, unmasked softmax and SwiGLU through them (in their [rows, d] / [B, H, T, d] layouts) and
/// the logits are those of the tensor-op layers.
#[test]
fn decoding_uses_registered_layer_kernels_with_the_same_logits() {
    use qwen3_vl_moelora::quant::kernels::layer_ops;
    use std::sync::atomic::Ordering::SeqCst;
    let (model, inputs) = tiny();
    let one = first_row_alone(&inputs);
    let tokens = [7i64, 8, 9];
    let want = decode_logits(&model, &one, &tokens);
    let before: Vec<usize> = counted::CALLS.iter().map(|c| c.load(SeqCst)).collect();
    layer_ops::register_ops(counted::ops());
    let got = decode_logits(&model, &one, &tokens);
    layer_ops::unregister::<Cpu>();
    let names = [
        "rms_norm",
        "rms_norm_rotary",
        "softmax_scaled",
        "swiglu",
        "add_rms_norm",
    ];
    for (i, name) in names.iter().enumerate() {
        let calls = counted::CALLS[i].load(SeqCst) - before[i];
        assert!(calls > 0, "the registered {name} was not called");
    }
    assert_steps_close(&got, &want, 1e-6);
}

/// Joining each layer's q, k, v and gate, up into one matmul (inference) leaves the prefill and
/// decode logits unchanged up to rounding, and the parts' weights become views of the joined
/// ones (a second call joins nothing new).
#[test]
fn joined_dense_projections_give_the_same_logits() {
    let (model, inputs) = tiny();
    let one = first_row_alone(&inputs);
    let tokens = [7i64, 8, 9];
    let want = decode_logits(&model, &one, &tokens);
    let mut joined = model.clone();
    let layers = joined.language_model.layers.len();
    assert_eq!(joined.language_model.fuse_dense_projections(), 2 * layers);
    assert_eq!(joined.language_model.fuse_dense_projections(), 0);
    let got = decode_logits(&joined, &one, &tokens);
    assert_eq!(got.len(), want.len());
    assert_steps_close(&got, &want, 1e-5);
}

#[test]
fn greedy_generation_matches_transformers_generate() {
    let (model, inputs) = tiny();
    let fixture = TensorFile::read(&reference("tiny-qwen3-vl-generate.safetensors")).unwrap();
    for (suffix, penalty) in [("", 1.0), ("_rep1.5", 1.5)] {
        let (want, shape) = fixture.i64(&format!("new_tokens{suffix}"), 2).unwrap();
        let (want_logits, lshape) = fixture.f32(&format!("step_logits{suffix}"), 3).unwrap();
        let (b, n) = (shape[0], shape[1]);
        let opts = GenerateOptions {
            max_new_tokens: n,
            sampling: SamplingOptions {
                repetition_penalty: penalty,
                ..Default::default()
            },
            stop_tokens: Vec::new(),
        };
        let mut cache = KvCache::new(model.language_model.layers.len(), b);
        let mut history = vec![Vec::new(); b];
        let mut streamed = vec![Vec::new(); b];
        let rows = generate(&model, &mut cache, &inputs, &mut history, &opts, |r, t| {
            streamed[r].push(t)
        })
        .unwrap();
        for row in 0..b {
            let want_row: Vec<u32> = want[row * n..(row + 1) * n]
                .iter()
                .map(|&t| t as u32)
                .collect();
            assert_eq!(rows[row].ids, want_row, "row {row}, penalty {penalty}");
            assert_eq!(streamed[row], want_row);
            assert_eq!(rows[row].pending, want_row.last().copied());
        }
        // The raw logits of every step, with HF's tokens fed back.
        let v = lshape[2];
        let mut cache = KvCache::new(model.language_model.layers.len(), b);
        let mut logits = host(model.extend(&inputs, &mut cache).unwrap());
        for step in 0..n {
            let w = &want_logits[step * b * v..(step + 1) * b * v];
            let err = rel(&logits, w);
            assert!(
                err <= 1e-4,
                "step {step}, penalty {penalty}: relative error {err:.3e}"
            );
            let toks: Vec<i64> = (0..b).map(|r| want[r * n + step]).collect();
            logits = host(model.decode_step(&toks, &mut cache).unwrap());
        }
    }
}

#[test]
fn generation_stops_at_a_stop_token_and_reports_it() {
    let (model, inputs) = tiny();
    let fixture = TensorFile::read(&reference("tiny-qwen3-vl-generate.safetensors")).unwrap();
    let (want, _) = fixture.i64("new_tokens_rep1.5", 2).unwrap();
    // Row 1's greedy tokens (penalty 1.5) are 16 ×8, 99, 175 ×3: stopping on 99 ends row 1
    // after 8 tokens while row 0 (which never emits 99) runs to the limit.
    assert!(!want[..12].contains(&99) && want[12 + 8] == 99);
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingOptions {
            repetition_penalty: 1.5,
            ..Default::default()
        },
        stop_tokens: vec![99],
    };
    let mut cache = KvCache::new(model.language_model.layers.len(), 2);
    let mut history = vec![Vec::new(); 2];
    let rows = generate(&model, &mut cache, &inputs, &mut history, &opts, |_, _| {}).unwrap();
    assert_eq!(rows[1].ids.len(), 8);
    assert!(rows[1].stopped && rows[1].pending == Some(99));
    assert_eq!(rows[0].ids.len(), 12);
    assert!(!rows[0].stopped);
}
