//! `data prepare` (synthetic sample set) and `data check` (validate a dataset, print counts,
//! token-length percentiles and image-size statistics).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::data::image::load_rgb;
use crate::data::sources::{BadRow, Source};
use crate::data::template::ChatEncoder;
use crate::data::tokenizer::{load_tokenizer, SpecialIds};
use crate::data::ImageOptions;
use crate::error::{Error, Result};

pub use crate::data::synthetic::write_synthetic_set;

/// Options of `data check`.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The dataset.
    pub source: Source,
    /// tokenizer.json (file or folder) for token lengths; none = skip them.
    pub tokenizer: Option<PathBuf>,
    /// Image preprocessing (for token counts).
    pub image: ImageOptions,
    /// Captioning prompt.
    pub prompt: String,
    /// Truncation length.
    pub max_length: usize,
    /// Count bad rows instead of failing on the first.
    pub skip_bad: bool,
}

/// What `data check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Human-readable summary.
    pub text: String,
    /// Every unusable row (file, row, reason).
    pub bad: Vec<BadRow>,
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Parses `compact` or `qwen`.
pub fn parse_special_ids(s: &str) -> Result<SpecialIds> {
    match s {
        "compact" => Ok(SpecialIds::Compact),
        "qwen" => Ok(SpecialIds::Qwen),
        other => Err(Error::Argument {
            arg: "--special-ids".into(),
            message: format!("expected compact or qwen, found `{other}`"),
        }),
    }
}

/// Validates every row and image of a dataset. Bad rows are collected (all of them, so one run
/// lists every problem); the caller fails when any exist and `skip_bad` is off.
pub fn check_dataset(opts: &CheckOptions) -> Result<CheckReport> {
    let loaded = opts.source.read(true)?;
    let mut bad = loaded.skipped;
    let decoded: Vec<_> = loaded
        .samples
        .par_iter()
        .map(|s| {
            load_rgb(&s.image).and_then(|img| {
                let grid = opts
                    .image
                    .process_dims(&img, &s.image.display().to_string())?;
                Ok((img.width, img.height, grid))
            })
        })
        .collect();
    let encoder = match &opts.tokenizer {
        Some(p) => Some(ChatEncoder::new(
            load_tokenizer(p)?,
            &p.display().to_string(),
        )?),
        None => None,
    };
    let mut sizes = Vec::new();
    let mut lengths = Vec::new();
    let mut truncated = 0;
    for (s, d) in loaded.samples.iter().zip(decoded) {
        match d {
            Ok((w, h, tokens)) => {
                sizes.push((w, h));
                if let Some(enc) = &encoder {
                    match enc.caption_sample(&opts.prompt, tokens, &s.caption, opts.max_length) {
                        Ok(e) => {
                            lengths.push(e.input_ids.len());
                            truncated += e.truncated as usize;
                        }
                        Err(e) => bad.push(BadRow {
                            origin: s.origin.clone(),
                            reason: e.to_string(),
                        }),
                    }
                }
            }
            Err(e) => bad.push(BadRow {
                origin: s.origin.clone(),
                reason: e.to_string(),
            }),
        }
    }
    let mut t = String::new();
    let good = sizes.len();
    let _ = writeln!(t, "samples: {good} usable, {} bad", bad.len());
    for b in &bad {
        let _ = writeln!(t, "  bad: {}: {}", b.origin, b.reason);
    }
    if !sizes.is_empty() {
        let mut ws: Vec<usize> = sizes.iter().map(|s| s.0).collect();
        let mut hs: Vec<usize> = sizes.iter().map(|s| s.1).collect();
        ws.sort_unstable();
        hs.sort_unstable();
        let _ = writeln!(
            t,
            "image width: min {} median {} max {}; height: min {} median {} max {}",
            ws[0],
            percentile(&ws, 0.5),
            ws[ws.len() - 1],
            hs[0],
            percentile(&hs, 0.5),
            hs[hs.len() - 1]
        );
    }
    if encoder.is_some() && !lengths.is_empty() {
        lengths.sort_unstable();
        let _ = writeln!(
            t,
            "tokens per sample: p50 {} p90 {} p99 {} max {}; truncated to max_length {}: {truncated}",
            percentile(&lengths, 0.5),
            percentile(&lengths, 0.9),
            percentile(&lengths, 0.99),
            lengths[lengths.len() - 1],
            opts.max_length
        );
    } else if encoder.is_none() {
        let _ = writeln!(t, "tokens per sample: not computed (pass --tokenizer)");
    }
    Ok(CheckReport { text: t, bad })
}

/// The tokenizer next to a dataset file, if any (`data prepare` writes one).
pub fn default_tokenizer(dataset_file: &Path) -> Option<PathBuf> {
    let p = dataset_file.parent()?.join("tokenizer.json");
    p.exists().then_some(p)
}

/// Throughput of image preprocessing (decode, resize, normalise, patchify), in images/s.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Images per pass.
    pub images: usize,
    /// Best single-thread rate over the passes.
    pub single_thread: f64,
    /// Best rate using every core (rayon).
    pub all_threads: f64,
    /// Worker threads used for `all_threads`.
    pub threads: usize,
}

/// Times preprocessing of `files` with `opts`: `repeat` passes on one thread, then on all cores.
pub fn bench_preprocess(
    files: &[PathBuf],
    opts: &ImageOptions,
    repeat: usize,
) -> Result<BenchReport> {
    let run_one = |f: &PathBuf| opts.process_file(f).map(|p| p.pixel_values.len());
    for f in files {
        run_one(f)?; // warm-up, and fail early on a bad file
    }
    let mut single = 0f64;
    let mut all = 0f64;
    for _ in 0..repeat.max(1) {
        let t = std::time::Instant::now();
        for f in files {
            std::hint::black_box(run_one(f)?);
        }
        single = single.max(files.len() as f64 / t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let n: Result<Vec<usize>> = files.par_iter().map(run_one).collect();
        std::hint::black_box(n?);
        all = all.max(files.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(BenchReport {
        images: files.len(),
        single_thread: single,
        all_threads: all,
        threads: rayon::current_num_threads(),
    })
}
