//! Chat template, image-pad expansion and tokenisation against HF's Qwen3VLProcessor
//! (`tests/reference/make_template_fixture.py`), and the training labels built on them.

use qwen3_vl_moelora::data::template::{render_chat, ChatEncoder, Part, Role, Turn, IGNORE_INDEX};
use qwen3_vl_moelora::data::tokenizer::load_tokenizer;

use crate::common::*;

fn encoder() -> ChatEncoder {
    let path = reference("qwen-tokenizer/tokenizer.json");
    ChatEncoder::new(load_tokenizer(&path).unwrap(), "fixture").unwrap()
}

fn turns(messages: &serde_json::Value) -> Vec<Turn> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Turn {
            role: match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            },
            parts: m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| match c["type"].as_str().unwrap() {
                    "image" => Part::Image,
                    _ => Part::Text(c["text"].as_str().unwrap().to_string()),
                })
                .collect(),
        })
        .collect()
}

fn ids(case: &serde_json::Value) -> Vec<u32> {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(reference("template-reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn template_and_ids_match_hf_processor() {
    let enc = encoder();
    let cases = cases();
    assert_eq!(cases.len(), 4);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let t = turns(&case["messages"]);
        assert_eq!(
            render_chat(&t, gen),
            case["text"].as_str().unwrap(),
            "{name}: text"
        );
        let image_tokens: Vec<usize> = case["image_grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .product::<usize>()
                    / 4
            })
            .collect();
        let got = enc.encode_chat(&t, gen, &image_tokens).unwrap();
        assert_eq!(got, ids(case), "{name}: input_ids");
    }
}

#[test]
fn caption_sample_labels_the_caption_and_end_of_turn() {
    let enc = encoder();
    let case = &cases()[0];
    let want = ids(case);
    let s = enc
        .caption_sample(
            "COCO Yes:",
            6,
            "a red circle to the left of a blue square",
            8192,
        )
        .unwrap();
    // HF's rendering ends the turn with "<|im_end|>\n"; the sample stops at <|im_end|>.
    assert_eq!(s.input_ids, want[..want.len() - 1]);
    assert!(!s.truncated);
    let prompt = enc.caption_prompt("COCO Yes:", 6).unwrap();
    assert_eq!(&s.input_ids[..prompt.len()], &prompt[..]);
    assert!(s.labels[..prompt.len()].iter().all(|&l| l == IGNORE_INDEX));
    let targets: Vec<i64> = s.input_ids[prompt.len()..]
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(&s.labels[prompt.len()..], &targets[..]);
    assert_eq!(*s.labels.last().unwrap(), enc.tokens.im_end as i64);

    // Truncation cuts the caption, never the prompt; a prompt that does not fit is an error.
    let cut = enc
        .caption_sample(
            "COCO Yes:",
            6,
            "a red circle to the left of a blue square",
            prompt.len() + 3,
        )
        .unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.input_ids.len(), prompt.len() + 3);
    let err = enc
        .caption_sample("COCO Yes:", 6, "x", prompt.len())
        .unwrap_err();
    assert!(err.to_string().contains("max_length"), "{err}");
    // Placeholder count must match the images.
    let user = Turn {
        role: Role::User,
        parts: vec![Part::Image],
    };
    assert!(enc.encode_chat(&[user], true, &[6, 6]).is_err());
}
