//! Image preprocessing against HF's Qwen3-VL image processor (torchvision backend), on the
//! files and outputs of `tests/reference/make_image_fixtures.py`.

use qwen3_vl_moelora::checkpoint::TensorFile;
use qwen3_vl_moelora::data::ImageOptions;

use crate::common::*;

/// Max |level difference| between our pixel values and HF's for one fixture case.
/// Returns (max level difference, mean level difference, our grid, HF's grid).
fn compare(fixture: &TensorFile, case: &str) -> (usize, f64, [usize; 3], [usize; 3]) {
    let (levels, shape) = fixture.i64(&format!("{case}.levels"), 2).unwrap();
    let (grid, _) = fixture.i64(&format!("{case}.grid"), 2).unwrap();
    let (min_pixels, _) = fixture.i64(&format!("{case}.min_pixels"), 1).unwrap();
    let (resize, _) = fixture.i64(&format!("{case}.resize"), 1).unwrap();
    let opts = ImageOptions {
        min_pixels: min_pixels[0] as usize,
        resize: (resize[0] > 0).then(|| (resize[0] as usize, resize[1] as usize)),
        ..Default::default()
    };
    let dir = reference("images");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_stem().unwrap().to_str() == Some(case))
        .unwrap();
    let got = opts.process_file(&file).unwrap();
    let want_grid = [grid[0] as usize, grid[1] as usize, grid[2] as usize];
    assert_eq!(got.pixel_values.len(), shape[0] * 1536, "{case}: rows");
    let mut worst = 0usize;
    let mut total = 0f64;
    for (r, row) in got.pixel_values.chunks(1536).enumerate() {
        for ch in 0..3 {
            let frame0 = &row[ch * 512..ch * 512 + 256];
            let frame1 = &row[ch * 512 + 256..ch * 512 + 512];
            assert_eq!(frame0, frame1, "{case}: temporal copies differ");
            for (i, &v) in frame0.iter().enumerate() {
                let want = levels[r * 768 + ch * 256 + i];
                let want_v = (want as f32 - 127.5) / 127.5;
                let diff = (v - want_v).abs() * 127.5;
                worst = worst.max(diff.round() as usize);
                total += diff.round() as f64;
                if diff == 0.0 {
                    assert_eq!(v.to_bits(), want_v.to_bits());
                }
            }
        }
    }
    (worst, total / levels.len() as f64, got.grid_thw, want_grid)
}

#[test]
fn matches_hf_image_processor() {
    let reference = TensorFile::read(&reference("image-processor-reference.safetensors")).unwrap();
    let cases: Vec<String> = reference
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".grid").map(str::to_string))
        .collect();
    assert_eq!(cases.len(), 10);
    let mut report = String::new();
    let mut results = Vec::new();
    for case in &cases {
        let (worst, mean, got, want) = compare(&reference, case);
        report += &format!(
            "{case}: grid {got:?} (HF {want:?}), max level difference {worst}, mean {mean:.3}\n"
        );
        results.push((case.clone(), worst, mean, got == want));
    }
    eprintln!("{report}");
    for (case, worst, mean, grid_ok) in results {
        assert!(grid_ok, "{case}: image_grid_thw differs\n{report}");
        if case.starts_with("jpeg") || case.starts_with("exif") {
            // JPEG: the image crate's decoder (zune-jpeg) and PIL's libjpeg-turbo differ by a few
            // levels (IDCT rounding, chroma upsampling); the processor itself is exact (PNG
            // cases). A wrong orientation would move nearly every value by far more.
            assert!(worst <= 4 && mean <= 0.5, "{case}\n{report}");
        } else if case.ends_with("_exact") {
            // Lossless, sides multiples of 32: no resize, bit-identical.
            assert_eq!(worst, 0, "{case}\n{report}");
        } else {
            assert!(worst <= 1, "{case}\n{report}");
        }
    }
}
