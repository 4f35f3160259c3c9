//! A deterministic synthetic captioning set: two coloured shapes per image with a positional
//! caption ("a red circle to the left of a blue square"), varied image sizes, real PNG files,
//! a `captions.csv` (image_path,caption) and a small tokenizer with Qwen's special tokens.

use std::path::Path;

use super::resize::Rgb8;
use super::tokenizer::{build_tokenizer_json, SpecialIds};
use crate::checkpoint::tensor_file::write_atomically;
use crate::error::{Error, Result};

const COLORS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [50, 70, 220]),
    ("yellow", [240, 210, 40]),
];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const RELATIONS: [&str; 4] = ["to the left of", "to the right of", "above", "below"];

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One generated sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticSample {
    /// The picture.
    pub image: Rgb8,
    /// Its caption ("a red circle to the left of a blue square").
    pub caption: String,
    /// The two objects in reading order, without the relation ("a blue square and a red
    /// circle" when the square is on the left or on top).
    pub objects: String,
}

fn draw(img: &mut Rgb8, shape: &str, cx: f64, cy: f64, r: f64, color: [u8; 3]) {
    let (w, h) = (img.width, img.height);
    let y0 = (cy - r).floor().max(0.0) as usize;
    let y1 = ((cy + r).ceil() as usize).min(h);
    let x0 = (cx - r).floor().max(0.0) as usize;
    let x1 = ((cx + r).ceil() as usize).min(w);
    for y in y0..y1 {
        for x in x0..x1 {
            let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
            let inside = match shape {
                "circle" => dx * dx + dy * dy <= r * r,
                "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                _ => dy >= -r && dy <= r * 0.8 && dx.abs() <= (dy + r) * 0.55,
            };
            if inside {
                img.data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&color);
            }
        }
    }
}

/// Sample `index` of the set with `seed`: square, 96 to 320 pixels per side.
pub fn synthetic_sample(seed: u64, index: usize) -> SyntheticSample {
    let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let width = 96 + 16 * rng.below(15);
    // Square pictures: a fixed-size resize then keeps circles round and squares square.
    let _unused_height_draw = rng.below(15);
    let height = width;
    let shade = 200 + rng.below(40) as u8;
    let mut image = Rgb8 {
        width,
        height,
        data: vec![shade; width * height * 3],
    };
    let c1 = rng.below(COLORS.len());
    let c2 = (c1 + 1 + rng.below(COLORS.len() - 1)) % COLORS.len();
    let (s1, s2) = (rng.below(SHAPES.len()), rng.below(SHAPES.len()));
    let rel = rng.below(RELATIONS.len());
    let (w, h) = (width as f64, height as f64);
    let r = w.min(h) * (0.14 + 0.04 * rng.below(3) as f64);
    let jitter = |rng: &mut Rng, span: f64| (rng.below(1000) as f64 / 1000.0 - 0.5) * span;
    // First shape's centre relative to the second's, per relation.
    let (a, b) = match rel {
        0 => ((0.27, 0.5), (0.73, 0.5)),
        1 => ((0.73, 0.5), (0.27, 0.5)),
        2 => ((0.5, 0.27), (0.5, 0.73)),
        _ => ((0.5, 0.73), (0.5, 0.27)),
    };
    let (ja, jb) = (jitter(&mut rng, 0.12), jitter(&mut rng, 0.12));
    draw(
        &mut image,
        SHAPES[s1],
        (a.0 + ja) * w,
        (a.1 + jb) * h,
        r,
        COLORS[c1].1,
    );
    draw(
        &mut image,
        SHAPES[s2],
        (b.0 - ja) * w,
        (b.1 - jb) * h,
        r,
        COLORS[c2].1,
    );
    // Name the left (or upper) object first, so each picture has exactly one right caption
    // (with the first-drawn object first, "a red circle to the left of a blue square" and "a
    // blue square to the right of a red circle" would both be right for the same picture).
    let (first, second) = ((COLORS[c1].0, SHAPES[s1]), (COLORS[c2].0, SHAPES[s2]));
    let (first, second) = if rel % 2 == 1 {
        (second, first)
    } else {
        (first, second)
    };
    let relation = if rel < 2 { RELATIONS[0] } else { RELATIONS[2] };
    let caption = format!(
        "a {} {} {relation} a {} {}",
        first.0, first.1, second.0, second.1
    );
    let objects = format!("a {} {} and a {} {}", first.0, first.1, second.0, second.1);
    SyntheticSample {
        image,
        caption,
        objects,
    }
}

/// Text the synthetic tokenizer is trained on: every word the captions and the template use.
pub fn synthetic_corpus() -> Vec<String> {
    let mut c = vec![
        "user".to_string(),
        "assistant".to_string(),
        "system".to_string(),
        "COCO Yes:".to_string(),
        "Describe this image.".to_string(),
        "Name the objects.".to_string(),
        "and".to_string(),
    ];
    for (color, _) in COLORS {
        for shape in SHAPES {
            for rel in RELATIONS {
                c.push(format!("a {color} {shape} {rel} a {color} {shape}"));
            }
        }
    }
    c
}

/// Writes `n` samples to `out/images/NNNNNN.png`, `out/captions.csv`, `out/objects.csv`
/// (the same images captioned with their objects only) and `out/tokenizer.json`.
pub fn write_synthetic_set(out: &Path, n: usize, seed: u64, ids: SpecialIds) -> Result<()> {
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let mut csv = String::from("image_path,caption\n");
    let mut objects = csv.clone();
    for i in 0..n {
        let s = synthetic_sample(seed, i);
        let name = format!("{i:06}.png");
        let path = images.join(&name);
        let buf =
            image::RgbImage::from_raw(s.image.width as u32, s.image.height as u32, s.image.data)
                .expect("buffer size matches");
        let mut bytes = Vec::new();
        buf.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        write_atomically(&path, &bytes)?;
        csv.push_str(&format!("images/{name},{}\n", s.caption));
        objects.push_str(&format!("images/{name},{}\n", s.objects));
    }
    write_atomically(&out.join("captions.csv"), csv.as_bytes())?;
    write_atomically(&out.join("objects.csv"), objects.as_bytes())?;
    let tok = build_tokenizer_json(&synthetic_corpus(), 400, ids)?;
    write_atomically(&out.join("tokenizer.json"), tok.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_varied() {
        let a = synthetic_sample(7, 3);
        assert_eq!(a, synthetic_sample(7, 3));
        assert_ne!(a.caption, synthetic_sample(7, 4).caption);
        let sizes: std::collections::BTreeSet<_> = (0..20)
            .map(|i| {
                let s = synthetic_sample(7, i);
                assert_eq!(s.image.width, s.image.height);
                s.image.width
            })
            .collect();
        assert!(sizes.len() > 8);
        assert!(a.caption.starts_with("a ") && a.caption.split(' ').count() >= 7);
        // Objects in reading order: the left/upper one first; only "to the left of" and
        // "above" are needed then.
        for i in 0..40 {
            let s = synthetic_sample(7, i);
            let w: Vec<&str> = s.caption.split(' ').collect();
            let first = format!("a {} {} and", w[1], w[2]);
            assert!(
                s.objects.starts_with(&first),
                "{} / {}",
                s.caption,
                s.objects
            );
            assert!(s.caption.contains("to the left of") || s.caption.contains("above"));
        }
    }
}
