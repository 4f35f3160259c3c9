//! Caption metrics against pycocoevalcap 1.2 on a committed fixture
//! (tests/reference/make_caption_metrics_fixture.py: its PTB tokenizer, BLEU, ROUGE-L, CIDEr-D).

use qwen3_vl_moelora::eval::metrics::{bleu, cider_d_per_image, rouge_l_image};
use qwen3_vl_moelora::eval::{caption_scores, ptb_tokenize, Scored};

use crate::common::reference;

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(reference("caption-metrics.json")).unwrap())
        .unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tokenisation_matches_the_ptb_tokenizer() {
    let f = fixture();
    for (id, refs) in f["references"].as_object().unwrap() {
        let want = strings(&f["tokenized_references"][id]);
        let got: Vec<String> = strings(refs).iter().map(|s| ptb_tokenize(s)).collect();
        assert_eq!(got, want, "image {id}");
        let cand = f["candidates"][id].as_str().unwrap();
        assert_eq!(
            ptb_tokenize(cand),
            f["tokenized_candidates"][id],
            "image {id}"
        );
    }
}

#[test]
fn scores_match_pycocoevalcap() {
    let f = fixture();
    let ids: Vec<&String> = f["references"].as_object().unwrap().keys().collect();
    let refs: Vec<Vec<String>> = ids
        .iter()
        .map(|id| {
            strings(&f["references"][id.as_str()])
                .iter()
                .map(|s| ptb_tokenize(s))
                .collect()
        })
        .collect();
    let cands: Vec<String> = ids
        .iter()
        .map(|id| ptb_tokenize(f["candidates"][id.as_str()].as_str().unwrap()))
        .collect();
    let images: Vec<Scored<'_>> = cands
        .iter()
        .zip(&refs)
        .map(|(c, r)| Scored {
            candidate: c,
            references: r.iter().map(String::as_str).collect(),
        })
        .collect();
    let close = |a: f64, b: &serde_json::Value, what: &str| {
        let b = b.as_f64().unwrap();
        assert!((a - b).abs() < 1e-9, "{what}: {a} vs pycocoevalcap {b}");
    };
    let s = caption_scores(&images);
    for k in 0..4 {
        close(s.bleu[k], &f["bleu"][k], &format!("BLEU-{}", k + 1));
    }
    close(s.rouge_l, &f["rouge_l"], "ROUGE-L");
    close(s.cider_d, &f["cider_d"], "CIDEr-D");
    for (i, im) in images.iter().enumerate() {
        close(
            rouge_l_image(im),
            &f["rouge_l_per_image"][i],
            "ROUGE-L per image",
        );
    }
    for (i, v) in cider_d_per_image(&images).iter().enumerate() {
        close(*v, &f["cider_d_per_image"][i], "CIDEr-D per image");
    }
    // A perfect candidate set scores BLEU 1 on every order.
    let perfect: Vec<Scored<'_>> = refs
        .iter()
        .map(|r| Scored {
            candidate: &r[0],
            references: r.iter().map(String::as_str).collect(),
        })
        .collect();
    assert!(bleu(&perfect).iter().all(|&b| (b - 1.0).abs() < 1e-6));
}
