//! NF4 quantization against bitsandbytes 0.50.2's own output (tests/reference/make_nf4_fixture.py):
//! `nf4-cuda.safetensors` from its CUDA kernel on an H200, `nf4-cpu.safetensors` from its
//! pure-torch CPU path.

use qwen3_vl_moelora::checkpoint::tensor_file::{decode_f32, parse_safetensors, write_raw};
use qwen3_vl_moelora::quant::dynamic::NestedAbsmax;
use qwen3_vl_moelora::quant::{Absmax, Nf4Tensor};
use safetensors::SafeTensors;

use crate::common::reference;

const CASES: [(&str, usize, bool); 5] = [
    ("f32_edges", 64, false),
    ("bf16_nested", 64, true),
    ("f16_bs128", 128, true),
    ("f32_bs32", 32, false),
    ("f32_odd", 64, true),
];

fn fixture(device: &str) -> Vec<u8> {
    std::fs::read(reference(&format!("nf4-{device}.safetensors"))).unwrap()
}

fn floats(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let v = st.tensor(name).unwrap();
    (decode_f32(name, "fixture", &v).unwrap(), v.shape().to_vec())
}

fn dtype_name(st: &SafeTensors<'_>, case: &str) -> &'static str {
    match st.tensor(&format!("{case}.input")).unwrap().dtype() {
        safetensors::Dtype::BF16 => "bfloat16",
        safetensors::Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// Our quantization of a case's input.
fn ours(st: &SafeTensors<'_>, case: &str, blocksize: usize, nested: bool) -> Nf4Tensor {
    let (input, shape) = floats(st, &format!("{case}.input"));
    Nf4Tensor::quantize(&input, &shape, dtype_name(st, case), blocksize, nested).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn quantization_is_bit_identical_to_bitsandbytes_cuda() {
    let bytes = fixture("cuda");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (case, blocksize, nested) in CASES {
        let name = format!("{case}.weight");
        let theirs = Nf4Tensor::from_safetensors(&st, &name, "nf4-cuda").unwrap();
        let mine = ours(&st, case, blocksize, nested);
        // Codes, scales (plain or double-quantized), offset, maps and the JSON: all identical.
        assert_eq!(mine.packed, theirs.packed, "{case}: packed codes");
        assert_eq!(mine, theirs, "{case}: quant state");
        // And so are the serialized tensors, byte for byte.
        for (key, _, shape, data) in mine.to_raw(&name) {
            let v = st.tensor(&key).unwrap();
            assert_eq!(v.data(), &data[..], "{key}");
            assert_eq!(v.shape(), &shape[..], "{key}");
        }
        // Dequantized values: bit-identical to bitsandbytes' f32 dequantization.
        let (deq, _) = floats(&st, &format!("{case}.dequantized_f32"));
        assert_eq!(bits(&mine.dequantize()), bits(&deq), "{case}: dequantized");
        if nested {
            let (absmax, _) = floats(&st, &format!("{case}.absmax_f32"));
            assert_eq!(bits(&mine.absmax_f32()), bits(&absmax), "{case}: absmax");
        }
    }
}

#[test]
fn the_fixture_covers_zero_blocks_thresholds_and_partial_blocks() {
    let bytes = fixture("cuda");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let edges = ours(&st, "f32_edges", 64, false);
    let Absmax::Plain(absmax) = &edges.absmax else {
        panic!("plain")
    };
    // Block 1 is all zeros (scale 0, codes 0 as on CUDA, dequantized to zero); block 2 holds
    // every code value and every threshold with absmax exactly 1.
    assert_eq!(absmax[1], 0.0);
    assert!(edges.packed[32..64].iter().all(|&b| b == 0));
    assert!(edges.dequantize()[64..128].iter().all(|&v| v == 0.0));
    assert_eq!(absmax[2], 1.0);
    let codes: Vec<u8> = edges.packed[64..72]
        .iter()
        .flat_map(|b| [b >> 4, b & 15])
        .collect();
    assert_eq!(codes, (0..16).collect::<Vec<u8>>());
    // 315 values: 5 blocks, the last of 59; 158 bytes, the last low nibble the 0.0 pad (code 7).
    let odd = ours(&st, "f32_odd", 64, true);
    assert_eq!(odd.packed.len(), 158);
    assert_eq!(odd.packed[157] & 15, 7);
    // 260 blocks: two nested scales.
    let Absmax::Nested(n) = ours(&st, "bf16_nested", 64, true).absmax else {
        panic!("nested")
    };
    assert_eq!((n.codes.len(), n.nested_absmax.len()), (260, 2));
}

#[test]
fn differences_from_the_bitsandbytes_cpu_path_are_only_its_known_ones() {
    // bitsandbytes' two back ends disagree with each other on two things; we follow CUDA:
    // an all-zero block (CPU: code 7, CUDA: code 0) and a value exactly on one of four
    // thresholds (CPU compares with f32-computed midpoints, CUDA with f32 literals).
    let bytes = fixture("cpu");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let code = qwen3_vl_moelora::quant::nf4::NF4_CODE;
    let cpu_midpoints: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    for (case, blocksize, nested) in CASES {
        let name = format!("{case}.weight");
        let theirs = Nf4Tensor::from_safetensors(&st, &name, "nf4-cpu").unwrap();
        let mine = ours(&st, case, blocksize, nested);
        let (input, _) = floats(&st, &format!("{case}.input"));
        let plain = qwen3_vl_moelora::quant::nf4::block_absmax(&input, blocksize);
        let code_of = |t: &Nf4Tensor, i: usize| {
            let b = t.packed[i / 2];
            if i.is_multiple_of(2) {
                b >> 4
            } else {
                b & 15
            }
        };
        let mut explained = 0;
        for (i, &x) in input.iter().enumerate() {
            if code_of(&mine, i) == code_of(&theirs, i) {
                continue;
            }
            let m = plain[i / blocksize];
            let on_threshold = cpu_midpoints.contains(&(x * (1.0 / m)));
            assert!(m == 0.0 || on_threshold, "{case}[{i}] = {x}: codes differ");
            explained += 1;
        }
        if case == "f32_edges" {
            // The zero block's 64 values and the 0|1, 12|13 and 14|15 midpoints (8|9's f32
            // literal lies above its midpoint, so both back ends give the midpoint code 8).
            assert_eq!(explained, 67, "{case}");
        }
        // The scales agree everywhere (double quantization included).
        assert_eq!(mine.absmax, theirs.absmax, "{case}: scales");
    }
}

#[test]
fn checkpoints_round_trip_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..64 * 300)
        .map(|i| ((i * 7919) % 1000) as f32 / 1e4 - 0.05)
        .collect();
    let t = Nf4Tensor::quantize(&values, &[300, 64], "bfloat16", 64, true).unwrap();
    let path = dir.path().join("w.safetensors");
    write_raw(&path, &t.to_raw("layer.weight")).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = parse_safetensors(&path, &bytes).unwrap();
    assert_eq!(
        Nf4Tensor::from_safetensors(&st, "layer.weight", "w").unwrap(),
        t
    );
    // A missing piece names the tensor.
    let keep: Vec<_> = t
        .to_raw("layer.weight")
        .into_iter()
        .filter(|r| !r.0.ends_with("nested_absmax"))
        .collect();
    write_raw(&path, &keep).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = parse_safetensors(&path, &bytes).unwrap();
    let err = Nf4Tensor::from_safetensors(&st, "layer.weight", "w").unwrap_err();
    assert!(
        err.to_string().contains("layer.weight.nested_absmax"),
        "{err}"
    );
    // The nested scales alone: their dequantization is close to the plain scales.
    let plain = qwen3_vl_moelora::quant::nf4::block_absmax(&values, 64);
    let back = NestedAbsmax::quantize(&plain).dequantize();
    for (a, b) in plain.iter().zip(&back) {
        assert!((a - b).abs() < 0.01 * a.abs() + 1e-6, "{a} vs {b}");
    }
}

#[test]
fn quantize_writes_a_bitsandbytes_checkpoint_of_the_tiny_model() {
    use qwen3_vl_moelora::quant::convert::{quantize_checkpoint, QuantizeOptions};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-nf4");
    let src = crate::common::tiny_model();
    let r = quantize_checkpoint(&src, &out, &QuantizeOptions::default()).unwrap();
    // Every 2-D linear weight of the tiny model (text, vision blocks, mergers).
    assert_eq!(r.quantized, 52);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "bitsandbytes");
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
    assert_eq!(q["bnb_4bit_use_double_quant"], true);

    let orig_bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let orig = SafeTensors::deserialize(&orig_bytes).unwrap();
    let new_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let new = SafeTensors::deserialize(&new_bytes).unwrap();
    let name = "model.language_model.layers.0.self_attn.q_proj.weight";
    let t = Nf4Tensor::from_safetensors(&new, name, "tiny-nf4").unwrap();
    assert_eq!(t.dtype, "bfloat16");
    let (w, shape) = floats(&orig, name);
    assert_eq!(t.shape, shape);
    let back = t.dequantize();
    let err: f32 = w
        .iter()
        .zip(&back)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt()
        / w.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert!(err < 0.12, "NF4 relative error {err}");
    // Embeddings, norms and biases are copied byte for byte.
    for keep in [
        "model.language_model.embed_tokens.weight",
        "model.language_model.norm.weight",
        "model.visual.blocks.0.attn.qkv.bias",
    ] {
        assert_eq!(
            orig.tensor(keep).unwrap().data(),
            new.tensor(keep).unwrap().data(),
            "{keep}"
        );
    }
    // A second run into the same folder, or on the 4-bit checkpoint, is refused.
    let again = quantize_checkpoint(&src, &out, &QuantizeOptions::default()).unwrap_err();
    assert!(again.to_string().contains("not empty"), "{again}");
    let twice =
        quantize_checkpoint(&out, &dir.path().join("x"), &QuantizeOptions::default()).unwrap_err();
    assert!(twice.to_string().contains("already a 4-bit"), "{twice}");
    let bad = QuantizeOptions {
        blocksize: 48,
        ..Default::default()
    };
    let e = quantize_checkpoint(&src, &dir.path().join("y"), &bad).unwrap_err();
    assert!(e.to_string().contains("48"), "{e}");
}

mod model {
    use burn::module::Param;
    use burn::prelude::*;
    use burn::tensor::DType;
    use qwen3_vl_moelora::adapter::inject::sites;
    use qwen3_vl_moelora::adapter::{BaseLinear, Projection};
    use qwen3_vl_moelora::checkpoint::{load_model, HostTensor, WeightDType};
    use qwen3_vl_moelora::cli::forward::{output_tensors, read_inputs};
    use qwen3_vl_moelora::quant::convert::{quantize_checkpoint, QuantizeOptions};
    use qwen3_vl_moelora::quant::load::{load_model_nf4, Nf4Options};
    use qwen3_vl_moelora::quant::Nf4Tensor;

    use crate::common::*;

    const OPTS: Nf4Options = Nf4Options {
        blocksize: 64,
        double_quant: true,
        compute: DType::F32,
    };

    fn logits(model: &qwen3_vl_moelora::model::Qwen3VlModel<Cpu>) -> HostTensor {
        let inputs = read_inputs::<Cpu>(&tiny_inputs(), &Default::default()).unwrap();
        let out = model.forward(&inputs, false).unwrap();
        output_tensors(&out, false).remove("logits").unwrap()
    }

    #[test]
    fn quantizing_at_load_equals_loading_the_4bit_checkpoint() {
        let dev = Default::default();
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        quantize_checkpoint(&tiny_model(), &q, &QuantizeOptions::default()).unwrap();
        let (_, a) = load_model_nf4::<Cpu>(&tiny_model(), &dev, WeightDType::F32, &OPTS).unwrap();
        let (_, mut b) = load_model_nf4::<Cpu>(&q, &dev, WeightDType::F32, &OPTS).unwrap();
        let nf4 = sites(&mut b)
            .iter()
            .filter(|s| matches!(s.proj.base(), BaseLinear::Nf4(_)))
            .count();
        assert_eq!(nf4, 52);
        assert_eq!(logits(&a), logits(&b));
    }

    #[test]
    fn the_nf4_base_computes_with_the_dequantized_weights() {
        let dev = Default::default();
        let (_, nf4) = load_model_nf4::<Cpu>(&tiny_model(), &dev, WeightDType::F32, &OPTS).unwrap();
        // The dense model with every targetable weight replaced by its NF4 dequantization.
        let (_, mut dense) = load_model::<Cpu>(&tiny_model(), &dev, WeightDType::F32).unwrap();
        for site in sites(&mut dense) {
            let Projection::Plain(BaseLinear::Dense(l)) = site.proj else {
                panic!("dense")
            };
            let w = l.weight.val();
            let shape = w.dims().to_vec();
            let values: Vec<f32> = w.into_data().to_vec().unwrap();
            let q = Nf4Tensor::quantize(&values, &shape, "bfloat16", 64, true).unwrap();
            let t = Tensor::<Cpu, 2>::from_data(TensorData::new(q.dequantize(), shape), &dev);
            l.weight = Param::initialized(l.weight.id, t);
        }
        let err = rel_err(&logits(&nf4), &logits(&dense), Some(&tiny_mask()));
        assert!(err < 1e-5, "relative error {err:.3e}");
        // And NF4 stays near the full-precision model (4-bit weights: a few percent).
        let (_, full) = load_model::<Cpu>(&tiny_model(), &dev, WeightDType::F32).unwrap();
        let err = rel_err(&logits(&nf4), &logits(&full), Some(&tiny_mask()));
        println!("NF4 vs full-precision logits: relative error {err:.3e}");
        assert!(err < 0.25, "NF4 vs full precision: {err:.3e}");
    }
}

#[test]
fn forward_reads_a_4bit_checkpoint_as_nf4() {
    use qwen3_vl_moelora::checkpoint::TensorFile;
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_qwen3-vl-moelora");
    let q = dir.path().join("q");
    let run = |args: &[&std::ffi::OsStr]| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let tiny = crate::common::tiny_model();
    let inputs = crate::common::tiny_inputs();
    run(&[
        "quantize".as_ref(),
        "--model".as_ref(),
        tiny.as_os_str(),
        "--out".as_ref(),
        q.as_os_str(),
    ]);
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    for (model, out, flag) in [(&tiny, &a, Some("--nf4")), (&q, &b, None)] {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "forward".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--inputs".as_ref(),
            inputs.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        args.extend(flag.map(std::ffi::OsStr::new));
        run(&args);
    }
    let (a, b) = (TensorFile::read(&a).unwrap(), TensorFile::read(&b).unwrap());
    assert_eq!(a.tensors["logits"], b.tensors["logits"]);
}
