//! Dataset sources, `data prepare` and `data check`: every bad row is named, `--skip-bad`
//! counts instead of failing, and the synthetic set is deterministic.

use std::path::Path;
use std::process::Command;

use qwen3_vl_moelora::data::sources::{read_coco, read_conversations, read_csv, split};
use qwen3_vl_moelora::data::synthetic::write_synthetic_set;
use qwen3_vl_moelora::data::tokenizer::SpecialIds;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qwen3-vl-moelora"))
}

fn synthetic(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_set(dir.path(), n, 3, SpecialIds::Compact).unwrap();
    dir
}

fn append(path: &Path, text: &str) {
    let mut s = std::fs::read_to_string(path).unwrap();
    s.push_str(text);
    std::fs::write(path, s).unwrap();
}

#[test]
fn synthetic_set_is_deterministic_and_readable() {
    let (a, b) = (synthetic(6), synthetic(6));
    for f in ["captions.csv", "tokenizer.json", "images/000005.png"] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f}"
        );
    }
    let loaded = read_csv(&a.path().join("captions.csv"), false).unwrap();
    assert_eq!(loaded.samples.len(), 6);
    assert!(loaded.samples[0].image.is_file());
    let s = split(loaded.samples.clone(), Some(5), 2, None).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (3, 2));
    assert_eq!(s.test[1], loaded.samples[4]); // held out from the end of the first 5
    let shuffled = split(loaded.samples, None, 1, Some(9)).unwrap();
    assert_eq!(shuffled.train.len() + shuffled.test.len(), 6);
}

#[test]
fn csv_errors_name_the_row_and_skip_bad_counts() {
    let d = synthetic(3);
    let csv = d.path().join("captions.csv");
    append(&csv, "images/missing.png,a caption\nimages/000001.png,\n");
    let err = read_csv(&csv, false).unwrap_err().to_string();
    assert!(
        err.contains("row 5") && err.contains("missing.png"),
        "{err}"
    );
    let loaded = read_csv(&csv, true).unwrap();
    assert_eq!(loaded.samples.len(), 3);
    assert_eq!(loaded.skipped.len(), 2);
    assert!(
        loaded.skipped[1].origin.ends_with("row 6") && loaded.skipped[1].reason == "empty caption"
    );

    let no_cols = d.path().join("nocols.csv");
    std::fs::write(&no_cols, "path,text\nimages/000000.png,x\n").unwrap();
    let err = read_csv(&no_cols, false).unwrap_err().to_string();
    assert!(err.contains("missing column `image_path`"), "{err}");
}

#[test]
fn conversation_and_coco_sources() {
    let d = synthetic(3);
    let img = d.path().join("images/000000.png");
    let json = d.path().join("conv.json");
    let rec = |id: u32, path: &str, cap: &str| {
        serde_json::json!({"id": id, "conversations": [
            {"from": "user", "value": format!("COCO Yes: <|vision_start|>{path}<|vision_end|>")},
            {"from": "assistant", "value": cap}]})
    };
    let list = serde_json::json!([rec(1, img.to_str().unwrap(), "a cap"), rec(2, "images/000001.png", "b cap"), {"id": 3}]);
    std::fs::write(&json, list.to_string()).unwrap();
    let err = read_conversations(&json, false).unwrap_err().to_string();
    assert!(err.contains("record 2") && err.contains("id 3"), "{err}");
    let ok = read_conversations(&json, true).unwrap();
    assert_eq!(ok.samples.len(), 2);
    assert_eq!(ok.samples[1].caption, "b cap");
    std::fs::write(&json, "[{\"id\": 1,").unwrap();
    assert!(read_conversations(&json, false)
        .unwrap_err()
        .to_string()
        .contains("invalid JSON"));

    let coco = d.path().join("captions_train2014.json");
    let c = serde_json::json!({
        "images": [{"id": 10, "file_name": "000000.png"}, {"id": 11, "file_name": "000001.png"}],
        "annotations": [{"image_id": 10, "caption": "one"}, {"image_id": 10, "caption": "two"},
                        {"image_id": 11, "caption": "three"}]});
    std::fs::write(&coco, c.to_string()).unwrap();
    let per_caption = read_coco(&coco, &d.path().join("images"), false, false).unwrap();
    assert_eq!(per_caption.samples.len(), 3);
    let per_image = read_coco(&coco, &d.path().join("images"), true, false).unwrap();
    assert_eq!(per_image.samples.len(), 2);
    assert_eq!(
        per_image.samples[0].references,
        vec!["one".to_string(), "two".to_string()]
    );
}

#[test]
fn data_cli_prepare_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("syn");
    let st = bin()
        .args(["data", "prepare", "--synthetic", "8", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let csv = out.join("captions.csv");
    let run = |args: &[&str]| {
        bin()
            .args(["data", "check", "--csv"])
            .arg(&csv)
            .args(args)
            .output()
            .unwrap()
    };
    let ok = run(&["--resize", "280x280"]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(
        text.contains("samples: 8 usable, 0 bad") && text.contains("tokens per sample: p50"),
        "{text}"
    );

    // A corrupt image and a malformed row make the check fail, naming both rows.
    std::fs::write(out.join("images/000002.png"), b"not a png").unwrap();
    append(&csv, "\"images/000003.png,unterminated\n");
    let bad = run(&[]);
    let text = String::from_utf8_lossy(&bad.stdout);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        text.contains("row 4") && text.contains("000002.png"),
        "{text}"
    );
    assert!(text.contains("row 10"), "{text}");
    assert!(err.contains("bad rows"), "{err}");
    assert!(run(&["--skip-bad"]).status.success());
}
