//! The binary as users run it: `info`, `forward`, and clear failures on bad input.

use std::process::Command;

use qwen3_vl_moelora::checkpoint::TensorFile;

use crate::common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qwen3-vl-moelora"))
}

fn config(name: &str) -> String {
    format!("{}/model/configs/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn info_prints_the_family_parameter_counts() {
    for (name, line) in [
        ("qwen3-vl-2b-instruct.json", "parameters: 2,127,532,032"),
        ("qwen3-vl-4b-instruct.json", "parameters: 4,437,815,808"),
        ("qwen3-vl-8b-instruct.json", "parameters: 8,767,123,696"),
    ] {
        let out = bin()
            .args(["info", "--model", &config(name)])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.lines().any(|l| l == line), "{name}: {text}");
        if name.contains("4b") {
            assert!(text.lines().any(|l| l == "text: 4,022,468,096"), "{text}");
            assert!(text.lines().any(|l| l == "vision: 415,347,712"), "{text}");
            // bitsandbytes reports 2,415,636,992 "parameters" for the 4-bit 4B (packed bytes).
            assert!(
                text.contains("bitsandbytes parameter count 2,415,636,992"),
                "{text}"
            );
        }
    }
    // A model folder works too.
    let out = bin()
        .args(["info", "--model"])
        .arg(tiny_model())
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn forward_writes_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let out = bin()
        .args(["forward", "--device", "cpu", "--model"])
        .arg(tiny_model())
        .arg("--inputs")
        .arg(tiny_inputs())
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = TensorFile::read(&out_path).unwrap();
    let want = tiny_reference();
    let err = rel_err(
        &got.tensors["logits"],
        &want.tensors["logits"],
        Some(&tiny_mask()),
    );
    assert!(err <= 1e-4, "{err}");
    assert_eq!(got.tensors["position_ids"], want.tensors["position_ids"]);
    assert_eq!(got.tensors["rope_deltas"], want.tensors["rope_deltas"]);
}

fn fails_with(args: &[&str], needle: &str) {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn bad_device_lists_fail_clearly() {
    fails_with(&["train", "--devices", "cpu,cpu"], "CUDA devices only");
    // No GPU here: the first entry is not usable; on a GPU machine cuda:99 does not exist.
    fails_with(&["train", "--devices", "cuda:0,cuda:99"], "--devices");
    fails_with(&["train", "--devices", "cuda:0,gpu1"], "--devices");
    fails_with(
        &["train", "--device", "cpu", "--devices", "cuda:0,cuda:1"],
        "cannot be used with",
    );
    // Several hosts: refused with the reason.
    fails_with(
        &["train", "--nodes", "2", "--coordinator", "10.0.0.1:29500"],
        "burn 0.21.0",
    );
}

#[test]
fn bad_inputs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    let cfg = std::fs::read_to_string(config("qwen3-vl-4b-instruct.json")).unwrap();
    std::fs::write(
        &bad,
        cfg.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 7"),
    )
    .unwrap();
    fails_with(
        &["info", "--model", bad.to_str().unwrap()],
        "text_config.num_key_value_heads",
    );
    fails_with(&["info", "--model", "model/nothing-here"], "not found");
    let model = tiny_model();
    let inputs = tiny_inputs();
    let (m, i) = (model.to_str().unwrap(), inputs.to_str().unwrap());
    let out = dir.path().join("o.safetensors");
    let o = out.to_str().unwrap();
    fails_with(
        &[
            "forward", "--model", m, "--inputs", i, "--out", o, "--dtype", "f8",
        ],
        "--dtype",
    );
    fails_with(
        &[
            "forward", "--model", m, "--inputs", i, "--out", o, "--device", "tpu",
        ],
        "--device",
    );
    fails_with(
        &["forward", "--model", m, "--inputs", m, "--out", o],
        "tiny-qwen3-vl",
    );
    fails_with(
        &["train", "--config", "experiments/nope.toml"],
        "experiments/nope.toml",
    );
    // The NF4 kernel bench needs a GPU backend; bad row lists name their flag.
    fails_with(&["bench", "nf4", "--device", "cpu"], "needs a CUDA device");
    fails_with(
        &["bench", "nf4", "--device", "cpu", "--gemv-rows", "1,x"],
        "--gemv-rows",
    );
    fails_with(
        &["bench", "nf4", "--device", "cpu", "--checks", "some"],
        "expected all, nf4, gemv, gemm, others or none",
    );

    // Inputs whose image tokens do not match the grids.
    let f = TensorFile::read(&inputs).unwrap();
    let mut t = f.tensors.clone();
    if let Some(qwen3_vl_moelora::checkpoint::HostTensor::I64(g, _)) = t.get_mut("image_grid_thw") {
        g[1] = 2; // image 0: grid (1, 2, 6) needs 3 tokens, the ids hold 6
    }
    let bad_in = dir.path().join("in.safetensors");
    qwen3_vl_moelora::checkpoint::tensor_file::write_tensors(&bad_in, &t).unwrap();
    fails_with(
        &[
            "forward",
            "--model",
            m,
            "--inputs",
            bad_in.to_str().unwrap(),
            "--out",
            o,
        ],
        "placeholder tokens",
    );
    assert!(!out.exists(), "no output on failure");
}

#[test]
fn preprocess_writes_hf_identical_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.safetensors");
    let image = reference("images/rgb_64x96_exact.png");
    let st = bin()
        .args(["preprocess", "--min-pixels", "4096", "--image"])
        .arg(&image)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = TensorFile::read(&out).unwrap();
    let (pv, shape) = got.f32("pixel_values", 2).unwrap();
    assert_eq!(shape, vec![24, 1536]);
    assert_eq!(got.i64("image_grid_thw", 2).unwrap().0, vec![1, 4, 6]);
    let fixture = TensorFile::read(&reference("image-processor-reference.safetensors")).unwrap();
    let (levels, _) = fixture.i64("rgb_64x96_exact.levels", 2).unwrap();
    for (r, row) in pv.chunks(1536).enumerate() {
        for ch in 0..3 {
            for i in 0..256 {
                let want = (levels[r * 768 + ch * 256 + i] as f32 - 127.5) / 127.5;
                assert_eq!(row[ch * 512 + i].to_bits(), want.to_bits());
                assert_eq!(row[ch * 512 + 256 + i].to_bits(), want.to_bits());
            }
        }
    }
    // Bad inputs: a non-image file, a too-small image, a bad --resize.
    let junk = dir.path().join("junk.jpg");
    std::fs::write(&junk, b"definitely not a jpeg").unwrap();
    let o = out.to_str().unwrap();
    fails_with(
        &["preprocess", "--image", junk.to_str().unwrap(), "--out", o],
        "junk.jpg",
    );
    let tiny = dir.path().join("tiny.png");
    image::RgbImage::new(8, 40).save(&tiny).unwrap();
    fails_with(
        &["preprocess", "--image", tiny.to_str().unwrap(), "--out", o],
        "smaller than one 16x16 patch",
    );
    let img = image.to_str().unwrap();
    fails_with(
        &["preprocess", "--image", img, "--resize", "280", "--out", o],
        "--resize",
    );
}

#[test]
fn info_prints_peft_trainable_lines() {
    let run = |args: &[&str]| {
        let out = bin().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let c4 = config("qwen3-vl-4b-instruct.json");
    let text = run(&[
        "info",
        "--model",
        &c4,
        "--adapter",
        "lora",
        "--r",
        "8",
        "--alpha",
        "16",
        "--targets",
        "q_proj,k_proj,v_proj,o_proj",
    ]);
    assert!(
        text.lines().any(|l| l
            == "trainable params: 5,898,240 || all params: 4,443,714,048 || trainable%: 0.1327"),
        "{text}"
    );
    let text = run(&[
        "info",
        "--model",
        &c4,
        "--adapter",
        "moelora",
        "--experts",
        "2",
        "--targets",
        "q_proj,k_proj,v_proj,o_proj",
    ]);
    assert!(
        text.lines().any(|l| l
            == "trainable params: 12,644,352 || all params: 4,450,460,160 || trainable%: 0.2841"),
        "{text}"
    );
    // A peft-made folder: the same line peft printed when it made it.
    let m = tiny_model();
    let a = reference("tiny-qwen3-vl-lora");
    let text = run(&[
        "info",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
    ]);
    assert!(
        text.lines()
            .any(|l| l == "trainable params: 17,920 || all params: 417,056 || trainable%: 4.2968"),
        "{text}"
    );
    fails_with(
        &[
            "info",
            "--model",
            &c4,
            "--adapter",
            "lora",
            "--targets",
            "visual_q_proj",
        ],
        "valid names: q_proj",
    );
}

#[test]
fn experiment_files_resolve_and_print_the_trainable_line() {
    let c4 = config("qwen3-vl-4b-instruct.json");
    let exp = format!(
        "{}/experiments/qwen3-vl-4b-lora.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = bin()
        .args(["info", "--experiment", &exp, "--model", &c4])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("grad_accum = 8") && text.contains("lr = 0.0001"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l
            == "trainable params: 5,898,240 || all params: 4,443,714,048 || trainable%: 0.1327"),
        "{text}"
    );
    // Without the checkpoint: where to put it, non-zero exit.
    fails_with(
        &["info", "--experiment", &exp],
        "model/Qwen3-VL-4B-Instruct",
    );
    fails_with(
        &[
            "info",
            "--experiment",
            &exp,
            "--model",
            &c4,
            "--set",
            "train.lrr=3",
        ],
        "unknown field `lrr`",
    );
    fails_with(
        &[
            "info",
            "--experiment",
            &exp,
            "--model",
            &c4,
            "--set",
            "model.dtype=f8",
        ],
        "model.dtype",
    );
}

#[test]
fn bench_train_times_the_training_step_of_an_experiment() {
    let exp = format!(
        "{}/experiments/qwen3-vl-4b-moelora.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = bin()
        .args(["bench", "train", "--config", &exp, "--random-weights"])
        .args([
            "--steps", "2", "--warmup", "1", "--device", "cpu", "--model",
        ])
        .arg(tiny_model())
        .args(["--set", "train.grad_accum=2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let r: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(r["seq_tokens"], 120);
    // The experiment's 280x280 resize is 288x288: 18x18 patches.
    assert_eq!(r["image_patches"], 324);
    assert_eq!(r["grad_accum"], 2);
    assert!(r["samples_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["trainable"].as_u64().unwrap() > 0);
}

#[test]
fn caption_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = crate::common::tiny_model();
    let tok = crate::common::reference("qwen-tokenizer/tokenizer.json");
    let (tiny, tok) = (tiny.to_str().unwrap(), tok.to_str().unwrap());
    let cpu = ["--device", "cpu"];
    let run = |extra: &[&str], needle: &str| {
        let mut args = vec!["caption"];
        args.extend_from_slice(&cpu);
        args.extend_from_slice(extra);
        fails_with(&args, needle);
    };
    run(
        &["--adapter", "no/such/run", "--image", "a.png"],
        "no/such/run does not exist",
    );
    run(
        &[
            "--adapter",
            dir.path().to_str().unwrap(),
            "--image",
            "a.png",
        ],
        "holds no adapter",
    );
    run(&["--image", "a.png"], "--model");
    let base = ["--model", tiny, "--tokenizer", tok];
    let with_base = |extra: &[&str], needle: &str| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&args, needle);
    };
    with_base(&["--image", "a.png", "--top-p", "2"], "--top-p");
    with_base(
        &["--image", "a.png", "--sample", "--temperature", "0"],
        "--temperature",
    );
    with_base(&["--image", "missing.png"], "missing.png");
}
