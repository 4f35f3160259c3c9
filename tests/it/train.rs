//! `train` through the binary: a run's outputs, exact resume after kill -9, and errors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qwen3_vl_moelora::train::state::read_rows;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qwen3-vl-moelora"))
}

/// `tests/small-moelora.toml` (a small MoE-LoRA experiment on the demo architecture) with its
/// paths pointing into `dir`.
fn experiment(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/small-moelora.toml"))
        .unwrap()
        .replace("@ROOT@", &root.display().to_string())
        .replace("@WORK@", &dir.display().to_string());
    let f = dir.join("exp.toml");
    std::fs::write(&f, text).unwrap();
    f
}

fn train(exp: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.args(["train", "--plain", "--device", "cpu", "--config"])
        .arg(exp)
        .arg("--output-dir")
        .arg(out);
    c
}

/// Trains `exp` into `out` with the `--set` overrides `sets`; the run's metrics rows.
fn trained_rows(
    exp: &Path,
    out: &Path,
    sets: &[&str],
) -> Vec<qwen3_vl_moelora::train::state::StepRow> {
    let mut cmd = train(exp, out);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let o = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    read_rows(out).unwrap()
}

#[test]
fn killed_run_resumes_with_identical_losses() {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path());
    let full = dir.path().join("full");
    let o = train(&exp, &full).output().unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    let expected = read_rows(&full).unwrap();
    assert_eq!(
        expected.len(),
        54,
        "6 epochs x 36 samples / 4 per step\n{log}"
    );
    assert!(log.contains("held-out exact match: "), "{log}");
    // The run's outputs.
    for f in [
        "metrics.csv",
        "loss.png",
        "lr.png",
        "predictions.jsonl",
        "summary.json",
        "config.toml",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(full.join(f).exists(), "{f} missing");
    }
    let predictions = std::fs::read_to_string(full.join("predictions.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 4);
    let kept: Vec<_> = std::fs::read_dir(full.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(kept.len(), 2, "keep_last = 2: {kept:?}");
    assert!(kept.contains(&"step-000054".to_string()), "{kept:?}");

    // The same run, killed with SIGKILL after its first checkpoint, then resumed.
    let cut = dir.path().join("cut");
    let mut child = train(&exp, &cut)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = cut.join("checkpoints/step-000005/state.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !first.exists() {
        assert!(Instant::now() < deadline, "no checkpoint written");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !cut.join("summary.json").exists(),
        "the run finished before it was killed"
    );
    let o = bin()
        .args(["train", "--plain", "--device", "cpu", "--resume"])
        .arg(&cut)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("resuming at step "), "{log}");
    same_losses(&expected, &read_rows(&cut).unwrap(), "resumed");

    // The full run reused its images' vision features from the second epoch on (the tower is
    // frozen); recomputing them every step gives the same losses.
    assert!(log.contains("vision features cached"), "{log}");
    let fresh = dir.path().join("fresh");
    let o = train(&exp, &fresh)
        .args([
            "--set",
            "train.cache_vision=false",
            "--set",
            "train.save_every=0",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(!log.contains("vision features cached"), "{log}");
    same_losses(
        &expected,
        &read_rows(&fresh).unwrap(),
        "without the vision cache",
    );
    // Held-out batches never read the cache (their set indexes name other samples).
    let held_out = |run: &Path| {
        std::fs::read_to_string(run.join("burn/valid/epoch-1/LM_loss.log"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').next().unwrap().parse::<f64>().unwrap())
            .collect::<Vec<f64>>()
    };
    let (cached, recomputed) = (held_out(&full), held_out(&fresh));
    assert_eq!(cached.len(), 2, "4 held-out samples in batches of 2");
    for (a, b) in cached.iter().zip(&recomputed) {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "held-out loss {a} vs {b}"
        );
    }
    // The loss went down over the run.
    let head: f64 = expected[..5].iter().map(|r| r.lm_loss).sum::<f64>() / 5.0;
    let tail: f64 = expected[49..].iter().map(|r| r.lm_loss).sum::<f64>() / 5.0;
    assert!(tail < head * 0.8, "loss {head} -> {tail}");
}

/// Every step's losses and learning rate agree within 1e-6.
fn same_losses(
    expected: &[qwen3_vl_moelora::train::state::StepRow],
    got: &[qwen3_vl_moelora::train::state::StepRow],
    what: &str,
) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for (a, b) in expected.iter().zip(got) {
        assert_eq!(a.step, b.step);
        for (x, y, name) in [
            (a.loss, b.loss, "loss"),
            (a.lm_loss, b.lm_loss, "lm_loss"),
            (a.aux_loss, b.aux_loss, "aux_loss"),
            (a.lr, b.lr, "lr"),
        ] {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{what}: step {} {name}: {x} vs {y}",
                a.step
            );
        }
    }
}

/// `train.loss_average = "samples"`: batch 2 x accumulation 1 optimizes what batch 1 x
/// accumulation 2 does (same per-step losses, so the same updates), while the default
/// token average weighs the two samples by their caption lengths and drifts apart.
#[test]
fn per_sample_loss_makes_batching_match_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path());
    let run = |name: &str, sets: &[&str]| {
        let common = [
            "adapter.type=lora",
            "adapter.dropout=0.0",
            "train.epochs=2",
            "train.save_every=0",
        ];
        let all: Vec<&str> = common.iter().chain(sets).copied().collect();
        trained_rows(&exp, &dir.path().join(name), &all)
    };
    let accumulated = run("accum", &["train.batch_size=1", "train.grad_accum=2"]);
    let batched = |average: &str| {
        let average = format!("train.loss_average={average}");
        run(
            average.as_str(),
            &["train.batch_size=2", "train.grad_accum=1", average.as_str()],
        )
    };
    let (samples, tokens) = (batched("samples"), batched("tokens"));
    assert_eq!(accumulated.len(), 36, "2 epochs x 36 samples / 2 per step");
    let worst = |rows: &[qwen3_vl_moelora::train::state::StepRow]| {
        assert_eq!(rows.len(), accumulated.len());
        rows.iter()
            .zip(&accumulated)
            .map(|(a, b)| (a.lm_loss - b.lm_loss).abs() / b.lm_loss.abs())
            .fold(0.0, f64::max)
    };
    let (same, drift) = (worst(&samples), worst(&tokens));
    assert!(same < 1e-5, "per-sample batches vs accumulation: {same}");
    assert!(
        drift > 1e-3,
        "token-averaged batches should differ: {drift}"
    );
}

/// `train.gradient_checkpointing = "layers"` re-runs each decoder layer in the backward pass
/// instead of keeping its activations: without dropout, every step's losses are those of a run
/// that keeps them (the same gradients, up to rounding), MoE-LoRA's aux loss included.
#[test]
fn layer_recomputation_trains_like_keeping_activations() {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path());
    let run = |mode: &str| {
        let checkpointing = format!("train.gradient_checkpointing={mode}");
        let sets = [
            "adapter.dropout=0.0",
            "adapter.router_dropout=0.0",
            "train.epochs=2",
            "train.save_every=0",
            &checkpointing,
        ];
        trained_rows(&exp, &dir.path().join(mode), &sets)
    };
    let (kept, recomputed) = (run("off"), run("layers"));
    assert_eq!(kept.len(), 18, "2 epochs x 36 samples / 4 per step");
    for (a, b) in kept.iter().zip(&recomputed) {
        for (x, y, name) in [
            (a.lm_loss, b.lm_loss, "lm_loss"),
            (a.aux_loss, b.aux_loss, "aux_loss"),
            (a.grad_norm, b.grad_norm, "grad_norm"),
        ] {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                "step {} {name}: {x} kept vs {y} recomputed",
                a.step
            );
        }
    }
    let (first, last) = (kept[0].lm_loss, kept[kept.len() - 1].lm_loss);
    assert!(last < first, "the run learns: {first} -> {last}");
}

/// f16 compute (f32 adapter weights and AdamW state) with dynamic loss scaling.
#[test]
fn f16_compute_with_loss_scaling_trains() {
    f16_run_learns(&[]);
}

/// The same on a frozen NF4 base (double quant), quantized when the model is built.
#[test]
fn adapters_train_on_an_nf4_base() {
    f16_run_learns(&["model.quant=nf4", "model.double_quant=true"]);
}

fn f16_run_learns(sets: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path());
    let out = dir.path().join("f16");
    let mut cmd = train(&exp, &out);
    cmd.args(["--set", "model.dtype=f16", "--set", "train.save_every=0"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let o = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    if !sets.is_empty() {
        assert!(
            log.contains("base: NF4 (26 linear layers, double quant true)"),
            "{log}"
        );
    }
    let rows = read_rows(&out).unwrap();
    assert_eq!(rows.len(), 54);
    assert!(rows
        .iter()
        .all(|r| r.loss_scale == 65536.0 && r.skipped == 0));
    assert!(rows
        .iter()
        .all(|r| r.loss.is_finite() && r.grad_norm.is_finite()));
    let head: f64 = rows[..5].iter().map(|r| r.lm_loss).sum::<f64>() / 5.0;
    let tail: f64 = rows[49..].iter().map(|r| r.lm_loss).sum::<f64>() / 5.0;
    assert!(tail < head * 0.8, "{sets:?}: loss {head} -> {tail}");
    // The held-out predictions are scored with the COCO caption metrics.
    assert!(log.contains("held-out BLEU-1..4 "), "{log}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let cider = summary["scores"]["cider_d"].as_f64().unwrap();
    assert!(cider.is_finite() && cider >= 0.0, "{summary}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("data:image/jpeg;base64,").count(), 4);
    // The adapter weights stay f32 on disk.
    let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(!st.is_empty());
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    }
}

/// The built-in demo as `cargo run --release -- train` runs it (experiments/default.toml:
/// synthetic data, base pretraining, MoE-LoRA), with its files redirected to a temp folder.
#[test]
fn demo_learns_the_held_out_captions() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| toml_string(&dir.path().join(s));
    let started = Instant::now();
    let o = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--plain", "--device", "cpu"])
        .args(["--set", &format!("data.train={}", p("synth/captions.csv"))])
        .args([
            "--set",
            &format!("data.tokenizer={}", p("synth/tokenizer.json")),
        ])
        .args([
            "--set",
            &format!("pretrain.train={}", p("synth/objects.csv")),
        ])
        .args(["--set", &format!("model.path={}", p("base"))])
        .args(["--set", &format!("train.output_dir={}", p("out"))])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    let line = log
        .lines()
        .find(|l| l.starts_with("held-out exact match: "))
        .unwrap_or_else(|| panic!("no result line:\n{log}"));
    let rate: f64 = line["held-out exact match: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    println!("{line} in {:.0} s", started.elapsed().as_secs_f64());
    assert!(rate >= 0.80, "{line}\n{log}");
    // The base checkpoint it built loads like any HF folder, and the loss fell.
    assert!(dir.path().join("base/model.safetensors").exists());
    let rows = read_rows(&dir.path().join("out")).unwrap();
    assert!(
        rows.last().unwrap().lm_loss < rows[0].lm_loss * 0.5,
        "{rows:?}"
    );
    captioning_the_demo_output_works(dir.path(), line);
}

/// `caption` and `eval` on the demo's output folder, as a user would type them.
fn captioning_the_demo_output_works(dir: &Path, train_line: &str) {
    let out = dir.join("out");
    let predictions = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let hit: serde_json::Value = predictions
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["exact_match"] == true)
        .expect("a held-out image the adapter captions right");
    let o = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["caption", "--device", "cpu", "--adapter"])
        .arg(&out)
        .args(["--image", hit["image"].as_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // The base comes from the run's config.toml, and so do the prompt and image size.
    assert!(stderr.contains("+ adapter"), "{stderr}");
    let caption = String::from_utf8_lossy(&o.stdout);
    assert_eq!(caption.trim(), hit["reference"].as_str().unwrap());
    // The same adapter on an NF4 base (quantized while loading) still captions.
    let o = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["caption", "--device", "cpu", "--nf4", "--adapter"])
        .arg(&out)
        .args(["--image", hit["image"].as_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("(NF4)"), "{stderr}");
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
    // chat: the same image and prompt as a first turn, then a second turn on the kept cache.
    let mut child = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "24",
            "--adapter",
        ])
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "/image {}\nCOCO Yes:\nCOCO Yes:\n/quit\n",
        hit["image"].as_str().unwrap()
    );
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let answers: Vec<&str> = stdout
        .split("> ")
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    assert_eq!(answers[0], hit["reference"].as_str().unwrap(), "{stdout}");
    // eval re-captions the held-out set with the same (greedy) result as train's check.
    let o = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["eval", "--device", "cpu", "--config"])
        .arg(out.join("config.toml"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    let rate = |l: &str| l.split(" (").next().unwrap().to_string();
    let eval_line = log
        .lines()
        .find(|l| l.starts_with("held-out exact match: "))
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(rate(eval_line), rate(train_line), "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert!(
        report["scores"]["cider_d"].as_f64().unwrap() > 1.0,
        "{report}"
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("data:image/jpeg;base64,"));
}

fn toml_string(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

#[test]
fn bad_values_and_missing_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path());
    let o = train(&exp, &dir.path().join("x"))
        .args(["--set", "train.schedule=step"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("train.schedule") && err.contains("cosine, linear"),
        "{err}"
    );
    let o = train(&exp, &dir.path().join("x"))
        .args(["--model", "model/Qwen3-VL-Nope"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("model/Qwen3-VL-Nope"), "{err}");
    let o = bin()
        .args(["train", "--resume"])
        .arg(dir.path().join("nothing"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("config.toml"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
