//! `caption`: a base model (+ a trained adapter) captions image files, a folder or a CSV. One
//! image streams its caption to stdout; many go in batches behind a progress bar, one line per
//! image, optionally into a JSONL file (and scored when the CSV carries reference captions).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;

use super::args::{CaptionArgs, GenerationArgs, ImageArgs, ModelArgs};
use super::preprocess::parse_size;
use crate::checkpoint::tensor_file::write_atomically;
use crate::checkpoint::WeightDType;
use crate::data::batch::{CaptionBatcher, SamplePreparer};
use crate::data::sources::read_csv;
use crate::data::template::{ChatEncoder, DEFAULT_PROMPT};
use crate::data::tokenizer::load_tokenizer;
use crate::data::ImageOptions;
use crate::error::{Error, Result};
use crate::eval::score_captions;
use crate::experiment::Experiment;
use crate::infer::generate::{caption_samples, generate, GenerateOptions};
use crate::infer::load::{load_for_inference, resolve_trained, BaseOptions, Trained};
use crate::infer::sampling::GenerationConfig;
use crate::model::{KvCache, Qwen3VlModel};
use crate::train::prepare::tokenizer_path;

/// A loaded model ready to generate: weights, tokenizer, image settings, token choice.
pub struct Session<B: Backend> {
    /// The model (adapter applied).
    pub model: Qwen3VlModel<B>,
    /// Tokenizer and chat template.
    pub encoder: ChatEncoder,
    /// Image preprocessing (with the model's patch geometry).
    pub images: ImageOptions,
    /// Captioning prompt.
    pub prompt: String,
    /// Token choice and stop tokens.
    pub generation: GenerateOptions,
    /// Where the tensors live.
    pub device: B::Device,
}

/// Token choice from the flags over `config` (the model's generation_config.json), with
/// `<|im_end|>` always a stop token.
pub fn generate_options(
    args: &GenerationArgs,
    config: Option<GenerationConfig>,
    im_end: u32,
) -> Result<GenerateOptions> {
    let (mut sampling, mut stop) = match config {
        Some(c) => (c.sampling, c.stop_tokens),
        None => (Default::default(), Vec::new()),
    };
    if !stop.contains(&im_end) {
        stop.push(im_end);
    }
    if args.greedy {
        sampling.do_sample = false;
    }
    if args.sample {
        sampling.do_sample = true;
    }
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = args.top_p {
        sampling.top_p = p;
    }
    if let Some(k) = args.top_k {
        sampling.top_k = k;
    }
    if let Some(r) = args.repetition_penalty {
        sampling.repetition_penalty = r;
    }
    sampling.seed = args.seed;
    sampling.validate()?;
    Ok(GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_tokens: stop,
    })
}

/// Image settings: the run's (or the processor defaults), then the flags.
fn image_options(args: &ImageArgs, run: Option<&Experiment>) -> Result<ImageOptions> {
    let mut o = run.map(Experiment::image_options).unwrap_or_default();
    if let Some(r) = &args.resize {
        o.resize = Some(parse_size(r)?);
    }
    if let Some(v) = args.min_pixels {
        o.min_pixels = v;
    }
    if let Some(v) = args.max_pixels {
        o.max_pixels = v;
    }
    if o.min_pixels > o.max_pixels {
        return Err(Error::Argument {
            arg: "--min-pixels".into(),
            message: format!("{} is above max_pixels {}", o.min_pixels, o.max_pixels),
        });
    }
    Ok(o)
}

impl<B: Backend> Session<B> {
    /// Resolves the adapter, the base, the tokenizer and the settings, and loads the model.
    /// `default_dtype` applies when neither the flag nor a training run names one.
    pub fn open(
        m: &ModelArgs,
        images: &ImageArgs,
        generation: &GenerationArgs,
        default_dtype: WeightDType,
        device: &B::Device,
    ) -> Result<Self> {
        let resolved = m.adapter.as_deref().map(resolve_trained).transpose()?;
        let run = resolved.as_ref().and_then(|r| r.run.as_ref());
        let trained = resolved.as_ref().map(|r| &r.trained);
        let model_dir = match (&m.model, run, trained) {
            (Some(p), _, _) => p.clone(),
            (None, Some(exp), _) if exp.model.path.is_dir() => exp.model.path.clone(),
            (None, _, Some(Trained::Model(dir))) => dir.clone(),
            _ => {
                return Err(Error::Argument {
                    arg: "--model".into(),
                    message: "the base checkpoint folder is needed (no training run beside the \
                              adapter names one)"
                        .into(),
                })
            }
        };
        let dtype = match (&m.dtype, run) {
            (Some(d), _) => WeightDType::parse(d)?,
            (None, Some(exp)) => WeightDType::parse(&exp.model.dtype)?,
            (None, None) => default_dtype,
        };
        let nf4 = m.nf4 || run.is_some_and(|e| e.model.quant == "nf4");
        let tok = match (&m.tokenizer, run) {
            (Some(t), _) => t.clone(),
            (None, Some(exp)) => tokenizer_path(exp),
            (None, None) => model_dir.join("tokenizer.json"),
        };
        let encoder = ChatEncoder::new(load_tokenizer(&tok)?, &tok.display().to_string())?;
        let (cfg, model) =
            load_for_inference::<B>(&model_dir, trained, BaseOptions { dtype, nf4 }, device)?;
        let v = &cfg.vision_config;
        let image_settings = ImageOptions {
            patch_size: v.patch_size,
            temporal_patch_size: v.temporal_patch_size,
            merge_size: v.spatial_merge_size,
            ..image_options(images, run)?
        };
        let prompt = images
            .prompt
            .clone()
            .unwrap_or_else(|| run.map_or(DEFAULT_PROMPT.to_string(), |e| e.data.prompt.clone()));
        let generation = generate_options(
            generation,
            GenerationConfig::from_model_dir(&model_dir)?,
            encoder.tokens.im_end,
        )?;
        eprintln!(
            "model: {}{}{}, dtype {dtype:?}; {}",
            model_dir.display(),
            if nf4 { " (NF4)" } else { "" },
            match trained {
                Some(Trained::Adapter(d)) => format!(" + adapter {}", d.display()),
                Some(Trained::Model(d)) => format!(" (trained model {})", d.display()),
                None => String::new(),
            },
            describe(&generation)
        );
        Ok(Self {
            model,
            encoder,
            images: image_settings,
            prompt,
            generation,
            device: device.clone(),
        })
    }

    /// Batches of left-padded prompts.
    pub fn batcher(&self) -> CaptionBatcher {
        CaptionBatcher::for_generation(
            self.encoder.tokens.endoftext,
            self.images.temporal_patch_size,
        )
    }

    /// Prepares caption prompts for image files.
    pub fn preparer(&self) -> SamplePreparer {
        SamplePreparer {
            images: self.images.clone(),
            encoder: self.encoder.clone(),
            prompt: self.prompt.clone(),
            max_length: usize::MAX,
            cache_dir: None,
        }
    }
}

/// "greedy" or "sampling (temperature ..., top-p ..., top-k ...)", plus the penalty.
fn describe(g: &GenerateOptions) -> String {
    let s = &g.sampling;
    let mut d = if s.do_sample {
        format!(
            "sampling (temperature {}, top-p {}, top-k {}, seed {})",
            s.temperature, s.top_p, s.top_k, s.seed
        )
    } else {
        "greedy".to_string()
    };
    if s.repetition_penalty != 1.0 {
        d.push_str(&format!(", repetition penalty {}", s.repetition_penalty));
    }
    d
}

/// Prints the text of a growing token list as it becomes whole characters.
pub struct TextStream<'a> {
    encoder: &'a ChatEncoder,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    /// A stream with nothing printed yet.
    pub fn new(encoder: &'a ChatEncoder) -> Self {
        Self {
            encoder,
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Adds `token` and prints any newly complete text.
    pub fn push(&mut self, token: u32) {
        self.ids.push(token);
        let Ok(text) = self.encoder.tokenizer.decode(&self.ids, true) else {
            return;
        };
        // An unfinished multi-byte character decodes as U+FFFD; wait for the rest.
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed {
            return;
        }
        if let Some(new) = text.get(self.printed..) {
            print!("{new}");
            let _ = std::io::stdout().flush();
        }
        self.printed = text.len();
    }
}

/// The images of a `caption` call, each with its reference captions (from a CSV).
fn image_list(args: &CaptionArgs) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let mut out: Vec<(PathBuf, Vec<String>)> =
        args.image.iter().map(|p| (p.clone(), Vec::new())).collect();
    if let Some(dir) = &args.folder {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    ["jpg", "jpeg", "png", "webp"].contains(&e.to_lowercase().as_str())
                })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Input(format!(
                "{}: no .jpg, .jpeg, .png or .webp files",
                dir.display()
            )));
        }
        out.extend(files.into_iter().map(|p| (p, Vec::new())));
    }
    if let Some(csv) = &args.csv {
        let loaded = read_csv(csv, false)?;
        out.extend(loaded.samples.into_iter().map(|s| (s.image, s.references)));
    }
    Ok(out)
}

/// Runs `caption`.
pub fn run_caption<B: Backend>(
    args: &CaptionArgs,
    default_dtype: WeightDType,
    device: &B::Device,
) -> Result<()> {
    let images = image_list(args)?;
    let session = Session::<B>::open(
        &args.model,
        &args.images,
        &args.generation,
        default_dtype,
        device,
    )?;
    let preparer = session.preparer();
    if let [(image, _)] = images.as_slice() {
        if args.out.is_none() {
            return stream_one(&session, &preparer, image);
        }
    }
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(images.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} images, {per_sec}, eta {eta} {msg}",
        )
        .expect("template"),
    );
    let mut lines = String::new();
    let mut scored = Vec::new();
    for part in images.chunks(args.batch_size.max(1)) {
        let prompts = part
            .iter()
            .map(|(p, _)| preparer.prepare_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        let done = bar.position();
        let captions = caption_samples(
            &session.model,
            &session.batcher(),
            &session.encoder,
            &prompts,
            &session.generation,
            prompts.len(),
            &session.device,
            |_| {},
        )?;
        bar.set_position(done + part.len() as u64);
        for ((image, refs), c) in part.iter().zip(captions) {
            bar.suspend(|| println!("{}\t{}", image.display(), c.text));
            let mut row = serde_json::json!({
                "image": image.display().to_string(),
                "caption": c.text,
                "tokens": c.ids.len(),
            });
            if !refs.is_empty() {
                row["references"] = refs.clone().into();
            }
            lines.push_str(&row.to_string());
            lines.push('\n');
            if !refs.is_empty() {
                scored.push((c.text, refs.clone()));
            }
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "captioned {} images in {secs:.1} s ({:.2} images/s)",
        images.len(),
        images.len() as f64 / secs
    );
    if let Some(s) = score_captions(scored.iter().map(|(p, r)| (p.as_str(), r.as_slice()))) {
        println!("{s} ({} images with references)", scored.len());
    }
    if let Some(out) = &args.out {
        write_atomically(out, lines.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// Captions one image, streaming the tokens to stdout.
fn stream_one<B: Backend>(
    session: &Session<B>,
    preparer: &SamplePreparer,
    image: &Path,
) -> Result<()> {
    use burn::data::dataloader::batcher::Batcher;
    let prompt = preparer.prepare_prompt(image)?;
    let batch: crate::data::batch::CaptionBatch<B> =
        session.batcher().batch(vec![prompt], &session.device);
    let mut cache = KvCache::new(session.model.language_model.layers.len(), 1);
    let mut stream = TextStream::new(&session.encoder);
    let started = Instant::now();
    let rows = generate(
        &session.model,
        &mut cache,
        &batch.inputs,
        &mut [Vec::new()],
        &session.generation,
        |_, t| stream.push(t),
    )?;
    println!();
    let n = rows[0].ids.len();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{n} tokens in {secs:.2} s{}",
        if rows[0].stopped {
            ""
        } else {
            " (stopped at --max-new-tokens)"
        }
    );
    Ok(())
}
