//! Dataset sources: the reference's CSV (`image_path,caption`), its conversation JSON, and the
//! official COCO captions JSON. Every bad row is an error naming the file and row, or, with
//! `skip_bad`, is skipped and counted — never silently dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::synthetic::Rng;
use crate::error::{Error, Result};

/// One captioned image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Image file (absolute, or relative to the working directory).
    pub image: PathBuf,
    /// Target caption.
    pub caption: String,
    /// Every known caption of the image (evaluation references); contains `caption`.
    pub references: Vec<String>,
    /// Where it came from, e.g. `data/captions.csv row 12`.
    pub origin: String,
}

/// A row that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// File and row.
    pub origin: String,
    /// What is wrong.
    pub reason: String,
}

/// Samples read from a source, plus the rows skipped with `skip_bad`.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Usable samples in file order.
    pub samples: Vec<Sample>,
    /// Skipped rows (empty unless `skip_bad`).
    pub skipped: Vec<BadRow>,
}

/// Which file format a dataset is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `image_path,caption` CSV; paths absolute or relative to the CSV.
    Csv(PathBuf),
    /// The reference's conversation JSON.
    Conversations(PathBuf),
    /// `captions_*.json` + the image folder; one sample per caption or per image.
    Coco {
        /// Annotation file.
        annotations: PathBuf,
        /// Folder holding `file_name`s.
        images: PathBuf,
        /// One sample per image (first caption as target, all as references).
        per_image: bool,
    },
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Records a bad row: an error, or a skip when `skip_bad`.
fn bad(skip_bad: bool, skipped: &mut Vec<BadRow>, origin: String, reason: String) -> Result<()> {
    if skip_bad {
        skipped.push(BadRow { origin, reason });
        Ok(())
    } else {
        Err(Error::Input(format!("{origin}: {reason}")))
    }
}

fn check_sample(image: &Path, caption: &str) -> std::result::Result<(), String> {
    if caption.trim().is_empty() {
        return Err("empty caption".into());
    }
    if !image.is_file() {
        return Err(format!("image {} does not exist", image.display()));
    }
    Ok(())
}

/// Adds a sample with one caption, or records why it is bad.
fn accept(
    out: &mut Loaded,
    skip_bad: bool,
    origin: String,
    image: PathBuf,
    caption: String,
) -> Result<()> {
    match check_sample(&image, &caption) {
        Ok(()) => {
            out.samples.push(Sample {
                image,
                references: vec![caption.clone()],
                caption,
                origin,
            });
            Ok(())
        }
        Err(reason) => bad(skip_bad, &mut out.skipped, origin, reason),
    }
}

fn missing(path: &Path) -> Error {
    Error::MissingFile {
        path: path.to_path_buf(),
        hint: "Point the dataset option at an existing file (data prepare --synthetic N --out DIR \
               makes a sample set)."
            .into(),
    }
}

/// Reads an `image_path,caption` CSV.
pub fn read_csv(path: &Path, skip_bad: bool) -> Result<Loaded> {
    if !path.is_file() {
        return Err(missing(path));
    }
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let headers = rdr
        .headers()
        .map_err(|e| Error::Input(format!("{}: header: {e}", path.display())))?
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                Error::Input(format!(
                    "{}: missing column `{name}` (expected columns image_path,caption; found {})",
                    path.display(),
                    headers.iter().collect::<Vec<_>>().join(",")
                ))
            })
    };
    let (ci, cc) = (col("image_path")?, col("caption")?);
    let mut out = Loaded::default();
    for rec in rdr.records() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                bad(
                    skip_bad,
                    &mut out.skipped,
                    format!("{} row {line}", path.display()),
                    format!("malformed CSV: {e}"),
                )?;
                continue;
            }
        };
        let line = rec.position().map_or(0, |p| p.line());
        let origin = format!("{} row {line}", path.display());
        let (Some(img), Some(cap)) = (rec.get(ci), rec.get(cc)) else {
            bad(
                skip_bad,
                &mut out.skipped,
                origin,
                format!("expected {} fields, found {}", headers.len(), rec.len()),
            )?;
            continue;
        };
        let image = resolve(path, img.trim());
        let caption = cap.trim().to_string();
        accept(&mut out, skip_bad, origin, image, caption)?;
    }
    Ok(out)
}

#[derive(Deserialize)]
struct ConvTurn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
struct ConvRecord {
    conversations: Vec<ConvTurn>,
}

/// Reads the reference's conversation JSON (a list of `{"id", "conversations": [user, assistant]}`
/// with the image path between `<|vision_start|>` and `<|vision_end|>`).
pub fn read_conversations(path: &Path, skip_bad: bool) -> Result<Loaded> {
    if !path.is_file() {
        return Err(missing(path));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("{e} (expected a list of {{\"id\", \"conversations\"}} records)"),
    })?;
    let mut out = Loaded::default();
    for (i, raw) in records.into_iter().enumerate() {
        let origin = match raw.get("id") {
            Some(id) => format!("{} record {i} (id {id})", path.display()),
            None => format!("{} record {i}", path.display()),
        };
        let rec: ConvRecord = match serde_json::from_value(raw) {
            Ok(r) => r,
            Err(e) => {
                bad(
                    skip_bad,
                    &mut out.skipped,
                    origin,
                    format!("malformed record: {e}"),
                )?;
                continue;
            }
        };
        let user = rec
            .conversations
            .iter()
            .find(|t| t.from == "user" || t.from == "human");
        let assistant = rec
            .conversations
            .iter()
            .find(|t| t.from == "assistant" || t.from == "gpt");
        let (Some(user), Some(assistant)) = (user, assistant) else {
            bad(
                skip_bad,
                &mut out.skipped,
                origin,
                "needs a user and an assistant turn".into(),
            )?;
            continue;
        };
        let image = user
            .value
            .split_once("<|vision_start|>")
            .and_then(|(_, rest)| rest.split_once("<|vision_end|>"))
            .map(|(p, _)| p.trim().to_string());
        let Some(image) = image.filter(|p| !p.is_empty()) else {
            bad(
                skip_bad,
                &mut out.skipped,
                origin,
                "the user turn has no <|vision_start|>PATH<|vision_end|>".into(),
            )?;
            continue;
        };
        let image = resolve(path, &image);
        let caption = assistant.value.trim().to_string();
        accept(&mut out, skip_bad, origin, image, caption)?;
    }
    Ok(out)
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: u64,
    caption: String,
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

/// Reads the official COCO captions JSON.
pub fn read_coco(
    annotations: &Path,
    images: &Path,
    per_image: bool,
    skip_bad: bool,
) -> Result<Loaded> {
    if !annotations.is_file() {
        return Err(missing(annotations));
    }
    let text = std::fs::read_to_string(annotations).map_err(|e| Error::io(annotations, e))?;
    let file: CocoFile = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: annotations.to_path_buf(),
        message: format!("{e} (expected COCO captions with `images` and `annotations`)"),
    })?;
    let names: BTreeMap<u64, &str> = file
        .images
        .iter()
        .map(|i| (i.id, i.file_name.as_str()))
        .collect();
    let mut refs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for a in &file.annotations {
        refs.entry(a.image_id)
            .or_default()
            .push(a.caption.trim().to_string());
    }
    let mut out = Loaded::default();
    let push = |origin: String, id: u64, caption: String, out: &mut Loaded| -> Result<()> {
        let Some(name) = names.get(&id) else {
            return bad(
                skip_bad,
                &mut out.skipped,
                origin,
                format!("image_id {id} is not in `images`"),
            );
        };
        let image = images.join(name);
        if let Err(reason) = check_sample(&image, &caption) {
            return bad(skip_bad, &mut out.skipped, origin, reason);
        }
        out.samples.push(Sample {
            image,
            caption,
            references: refs.get(&id).cloned().unwrap_or_default(),
            origin,
        });
        Ok(())
    };
    if per_image {
        for (i, img) in file.images.iter().enumerate() {
            let origin = format!("{} image {i} (id {})", annotations.display(), img.id);
            let caption = refs
                .get(&img.id)
                .and_then(|r| r.first().cloned())
                .unwrap_or_default();
            push(origin, img.id, caption, &mut out)?;
        }
    } else {
        for (i, a) in file.annotations.iter().enumerate() {
            let origin = format!("{} annotation {i}", annotations.display());
            push(origin, a.image_id, a.caption.trim().to_string(), &mut out)?;
        }
    }
    Ok(out)
}

impl Source {
    /// Reads the source.
    pub fn read(&self, skip_bad: bool) -> Result<Loaded> {
        match self {
            Source::Csv(p) => read_csv(p, skip_bad),
            Source::Conversations(p) => read_conversations(p, skip_bad),
            Source::Coco {
                annotations,
                images,
                per_image,
            } => read_coco(annotations, images, *per_image, skip_bad),
        }
    }
}

/// Train/test split of a loaded source.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Training samples.
    pub train: Vec<Sample>,
    /// Held-out samples (the last `test_samples` of the selection).
    pub test: Vec<Sample>,
}

/// Takes the first `max_samples` (after an optional seeded shuffle), and holds out the last
/// `test_samples` of them, as the reference workflow does.
pub fn split(
    mut samples: Vec<Sample>,
    max_samples: Option<usize>,
    test_samples: usize,
    shuffle_seed: Option<u64>,
) -> Result<Split> {
    if let Some(seed) = shuffle_seed {
        let mut rng = Rng::new(seed);
        for i in (1..samples.len()).rev() {
            samples.swap(i, rng.below(i + 1));
        }
    }
    if let Some(n) = max_samples {
        samples.truncate(n);
    }
    if test_samples >= samples.len() && test_samples > 0 {
        return Err(Error::Input(format!(
            "test_samples = {test_samples} leaves nothing to train on ({} samples selected)",
            samples.len()
        )));
    }
    let test = samples.split_off(samples.len() - test_samples);
    Ok(Split {
        train: samples,
        test,
    })
}
