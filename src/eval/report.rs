//! `report.html`: every evaluated image (embedded as a thumbnail), its reference captions and the
//! generated one, with the corpus scores on top — the reference workflow's dashboard image log,
//! as one self-contained file.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use base64::Engine;

use super::CaptionScores;
use crate::checkpoint::tensor_file::write_atomically;
use crate::error::Result;

/// One row of the report.
#[derive(Debug, Clone)]
pub struct ReportItem {
    /// The image file.
    pub image: PathBuf,
    /// Reference captions.
    pub references: Vec<String>,
    /// Generated caption.
    pub prediction: String,
    /// Whether the prediction equals a reference (after whitespace and case folding).
    pub exact: bool,
}

/// Lower-case with single spaces: the exact-match comparison.
fn normalized(t: &str) -> String {
    t.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

impl ReportItem {
    /// A row; `exact` when the prediction equals a reference up to case and whitespace.
    pub fn new(image: PathBuf, references: Vec<String>, prediction: String) -> Self {
        let p = normalized(&prediction);
        let exact = references.iter().any(|r| normalized(r) == p);
        Self {
            image,
            references,
            prediction,
            exact,
        }
    }
}

/// Scores `items` as pycocoevalcap does and writes them with the scores to `path`.
pub fn score_and_report(
    path: &Path,
    title: &str,
    items: &[ReportItem],
) -> Result<Option<CaptionScores>> {
    let scores = super::score_captions(
        items
            .iter()
            .map(|i| (i.prediction.as_str(), i.references.as_slice())),
    );
    write_report(path, title, items, scores.as_ref())?;
    Ok(scores)
}

/// Longest side of the embedded thumbnails, in pixels.
const THUMBNAIL: u32 = 256;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The image as a JPEG thumbnail data URI, or why it could not be read.
fn thumbnail_uri(path: &Path) -> std::result::Result<String, String> {
    let img = image::open(path).map_err(|e| e.to_string())?;
    let thumb = img.thumbnail(THUMBNAIL, THUMBNAIL).to_rgb8();
    let mut bytes = Cursor::new(Vec::new());
    thumb
        .write_to(&mut bytes, image::ImageFormat::Jpeg)
        .map_err(|e| e.to_string())?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes.into_inner());
    Ok(format!("data:image/jpeg;base64,{b64}"))
}

/// Writes the report to `path` (temp file, then rename). Unreadable images are shown as a
/// message in their cell, not an error: the report is still useful.
pub fn write_report(
    path: &Path,
    title: &str,
    items: &[ReportItem],
    scores: Option<&CaptionScores>,
) -> Result<()> {
    let mut html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}\
         .hit{{color:#070}}.miss{{color:#a00}}img{{max-width:{THUMBNAIL}px}}</style></head><body>\
         \n<h1>{t}</h1>\n",
        t = escape(title)
    );
    let hits = items.iter().filter(|i| i.exact).count();
    html.push_str(&format!(
        "<p>{} images; exact match {:.2} ({hits}/{})</p>\n",
        items.len(),
        hits as f64 / items.len().max(1) as f64,
        items.len()
    ));
    if let Some(s) = scores {
        html.push_str(&format!(
            "<p>BLEU-1 {:.4} &middot; BLEU-2 {:.4} &middot; BLEU-3 {:.4} &middot; BLEU-4 {:.4} \
             &middot; ROUGE-L {:.4} &middot; CIDEr-D {:.4}</p>\n",
            s.bleu[0], s.bleu[1], s.bleu[2], s.bleu[3], s.rouge_l, s.cider_d
        ));
    }
    html.push_str("<table>\n<tr><th>image</th><th>generated</th><th>references</th></tr>\n");
    for item in items {
        let cell = match thumbnail_uri(&item.image) {
            Ok(uri) => format!(
                "<img src=\"{uri}\" alt=\"{}\">",
                escape(&item.image.display().to_string())
            ),
            Err(e) => format!(
                "<em>{}: {}</em>",
                escape(&item.image.display().to_string()),
                escape(&e)
            ),
        };
        let refs: Vec<String> = item
            .references
            .iter()
            .map(|r| format!("<li>{}</li>", escape(r)))
            .collect();
        html.push_str(&format!(
            "<tr><td>{cell}<br><small>{}</small></td><td class=\"{}\">{}</td><td><ul>{}</ul></td></tr>\n",
            escape(&item.image.display().to_string()),
            if item.exact { "hit" } else { "miss" },
            escape(&item.prediction),
            refs.join("")
        ));
    }
    html.push_str("</table>\n</body></html>\n");
    write_atomically(path, html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_embeds_images_and_escapes_text() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.png");
        image::RgbImage::from_pixel(300, 200, image::Rgb([200, 10, 10]))
            .save(&img)
            .unwrap();
        let items = vec![
            ReportItem {
                image: img,
                references: vec!["a <red> box".into()],
                prediction: "a <red> box".into(),
                exact: true,
            },
            ReportItem {
                image: dir.path().join("missing.png"),
                references: vec!["x".into()],
                prediction: "y".into(),
                exact: false,
            },
        ];
        let out = dir.path().join("report.html");
        write_report(&out, "run & co", &items, None).unwrap();
        let html = std::fs::read_to_string(&out).unwrap();
        assert!(html.contains("data:image/jpeg;base64,"));
        assert!(html.contains("a &lt;red&gt; box"));
        assert!(html.contains("run &amp; co"));
        assert!(html.contains("missing.png"));
        assert!(html.contains("exact match 0.50 (1/2)"));
    }
}
