//! Sample preparation (parallel, cached) and batching into model inputs that the model runs on.

use burn::data::dataloader::batcher::Batcher;
use qwen3_vl_moelora::checkpoint::load::random_model;
use qwen3_vl_moelora::checkpoint::WeightDType;
use qwen3_vl_moelora::data::batch::{CaptionBatch, CaptionBatcher, PadSide, SamplePreparer};
use qwen3_vl_moelora::data::sources::read_csv;
use qwen3_vl_moelora::data::synthetic::write_synthetic_set;
use qwen3_vl_moelora::data::template::{ChatEncoder, IGNORE_INDEX};
use qwen3_vl_moelora::data::tokenizer::{load_tokenizer, SpecialIds};
use qwen3_vl_moelora::data::ImageOptions;
use qwen3_vl_moelora::model::Qwen3VlConfig;

use crate::common::*;

#[test]
fn prepared_batches_run_through_the_model() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_set(dir.path(), 4, 1, SpecialIds::Compact).unwrap();
    let samples = read_csv(&dir.path().join("captions.csv"), false)
        .unwrap()
        .samples;
    let enc = ChatEncoder::new(load_tokenizer(dir.path()).unwrap(), "synthetic").unwrap();
    let prep = SamplePreparer {
        images: ImageOptions {
            min_pixels: 4096,
            ..Default::default()
        },
        encoder: enc.clone(),
        prompt: "COCO Yes:".into(),
        max_length: 8192,
        cache_dir: Some(dir.path().join("cache")),
    };
    let (items, bad) = prep.prepare_all(&samples, false).unwrap();
    assert!(bad.is_empty());
    // The cache holds one file per image and gives back identical samples.
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
        4
    );
    assert_eq!(prep.prepare_all(&samples, false).unwrap().0, items);

    // Pixel values rebuilt from the levels equal the processor's output exactly.
    let batcher = CaptionBatcher {
        pad_id: enc.tokens.endoftext,
        side: PadSide::Right,
        temporal_patch_size: 2,
        pad_to_multiple: 1,
    };
    let (_, _, _, _, pixels, _) = batcher.collate(&items[..1]);
    assert_eq!(
        pixels,
        prep.images
            .process_file(&samples[0].image)
            .unwrap()
            .pixel_values
    );

    let dev = Default::default();
    for side in [PadSide::Right, PadSide::Left] {
        let batcher = CaptionBatcher {
            side,
            pad_to_multiple: if side == PadSide::Left { 16 } else { 1 },
            ..batcher.clone()
        };
        let batch: CaptionBatch<Cpu> = batcher.batch(items[..3].to_vec(), &dev);
        let longest = items[..3].iter().map(|s| s.input_ids.len()).max().unwrap();
        let t = batcher.padded_len(longest);
        assert!(t >= longest && t.is_multiple_of(batcher.pad_to_multiple));
        assert_eq!((batch.inputs.batch, batch.inputs.len), (3, t));
        let mask = batch.inputs.attention_mask.clone().unwrap();
        let labels: Vec<i64> = batch.labels.to_data().convert::<i64>().to_vec().unwrap();
        for (m, l) in mask.iter().zip(&labels) {
            if *m == 0 {
                assert_eq!(*l, IGNORE_INDEX);
            }
        }
        assert_eq!(mask.iter().sum::<i64>() as usize, batch.tokens);

        // A random model with the synthetic tokenizer's ids accepts the batch.
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tiny_model().join("config.json")).unwrap(),
        )
        .unwrap();
        let vocab = enc.tokenizer.get_vocab_size(true);
        cfg["text_config"]["vocab_size"] = vocab.into();
        cfg["image_token_id"] = enc.tokens.image_pad.into();
        cfg["video_token_id"] = enc.tokens.video_pad.into();
        cfg["vision_start_token_id"] = enc.tokens.vision_start.into();
        cfg["vision_end_token_id"] = enc.tokens.vision_end.into();
        let cfg =
            Qwen3VlConfig::from_json(&cfg.to_string(), std::path::Path::new("synthetic")).unwrap();
        let model = random_model::<Cpu>(&cfg, &dev, WeightDType::F32);
        let out = model.forward(&batch.inputs, false).unwrap();
        assert_eq!(out.logits.dims(), [3, t, vocab]);
    }
}
