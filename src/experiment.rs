//! Experiment files (`experiments/*.toml`): the model, data, adapter and training settings of a
//! run, with `--set section.key=value` overrides. Unknown keys and bad values are errors that
//! name the key and what is allowed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapter::AdapterConfig;
use crate::error::{Error, Result};

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Checkpoint folder (or a config.json for random-weight runs).
    pub path: PathBuf,
    /// Compute dtype: `f32`, `f16` or `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Base weight format: `none` (dense) or `nf4`.
    #[serde(default = "default_quant")]
    pub quant: String,
    /// NF4: double-quantise the absmax values.
    #[serde(default)]
    pub double_quant: bool,
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Dataset file (CSV, conversation JSON, or COCO captions JSON).
    pub train: PathBuf,
    /// `csv`, `conversations` or `coco`.
    #[serde(default = "default_format")]
    pub format: String,
    /// COCO: the image folder.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// COCO: one sample per image instead of per caption.
    #[serde(default)]
    pub per_image: bool,
    /// Use the first N samples.
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Hold out the last N of them.
    #[serde(default)]
    pub test_samples: usize,
    /// Shuffle before selecting (None = file order, as the reference).
    #[serde(default)]
    pub shuffle_seed: Option<u64>,
    /// Explicit image size [height, width] (rounded by smart_resize).
    #[serde(default)]
    pub resize: Option<[usize; 2]>,
    /// Smallest image area.
    #[serde(default = "default_min_pixels")]
    pub min_pixels: usize,
    /// Largest image area.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: usize,
    /// Captioning prompt after the image.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// Truncation length in tokens.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Skip and count bad rows instead of failing.
    #[serde(default)]
    pub skip_bad: bool,
    /// tokenizer.json (default: the one in the model folder).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Generate this many synthetic samples into the folder of `train` when it is missing.
    #[serde(default)]
    pub synthetic: Option<usize>,
    /// Seed of the generated synthetic set.
    #[serde(default)]
    pub synthetic_seed: u64,
}

/// `[pretrain]`: for the built-in demo, trains every weight of a randomly initialised small
/// model first (on a different task) and saves it as the base checkpoint `model.path`, which
/// the adapter run then loads like any downloaded checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSection {
    /// Architecture (config.json); vocabulary size and special-token ids are taken from the
    /// tokenizer.
    pub config: PathBuf,
    /// Its training captions (CSV), same images.
    pub train: PathBuf,
    /// Its prompt.
    pub prompt: String,
    /// Passes over the data.
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Samples per micro-batch.
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Warmup optimizer steps.
    #[serde(default)]
    pub warmup_steps: usize,
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per micro-batch.
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// `cosine` or `linear` decay after warmup.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// How a micro-batch's caption loss averages: `tokens` (every target token of the batch
    /// weighs the same, HF's batch loss) or `samples` (each sample's mean, then the mean over
    /// samples: batch B x accumulation A then optimizes what batch 1 x accumulation B·A does).
    #[serde(default = "default_loss_average")]
    pub loss_average: String,
    /// Warmup optimizer steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = none).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Random seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// What the backward pass recomputes instead of keeping: `true`/`"layers"` (each decoder
    /// layer, as HF does), `"ops"` (element-wise activations; burn's balanced checkpointing,
    /// GPU only) or `false`/`"off"`.
    #[serde(default)]
    pub gradient_checkpointing: Checkpointing,
    /// Keep each training image's vision-tower features (host memory) after its first pass
    /// and reuse them in later epochs; applies only when the vision tower is frozen and holds
    /// no adapter (it then gives the same features every time).
    #[serde(default = "yes")]
    pub cache_vision: bool,
    /// Loss scaling for f16: `dynamic` or `none`.
    #[serde(default = "default_loss_scale")]
    pub loss_scale: String,
    /// Log every N optimizer steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Checkpoint every N optimizer steps.
    #[serde(default = "default_save_every")]
    pub save_every: usize,
    /// Checkpoints kept.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Output folder.
    pub output_dir: PathBuf,
}

/// A whole experiment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// `[model]`
    pub model: ModelSection,
    /// `[data]`
    pub data: DataSection,
    /// `[adapter]`
    pub adapter: AdapterConfig,
    /// `[train]`
    pub train: TrainSection,
    /// `[pretrain]` (demo only)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<PretrainSection>,
}

/// `train.gradient_checkpointing`: what the backward pass recomputes instead of keeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// Every activation is kept.
    #[default]
    Off,
    /// Element-wise activations are recomputed (burn's balanced checkpointing, GPU only).
    Ops,
    /// Each decoder layer runs again in the backward pass; only its input is kept.
    Layers,
}

impl Checkpointing {
    /// The name written in experiment files.
    pub fn name(self) -> &'static str {
        match self {
            Checkpointing::Off => "off",
            Checkpointing::Ops => "ops",
            Checkpointing::Layers => "layers",
        }
    }
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Flag(bool),
            Name(String),
        }
        match Given::deserialize(d)? {
            Given::Flag(true) => Ok(Checkpointing::Layers),
            Given::Flag(false) => Ok(Checkpointing::Off),
            Given::Name(n) => match n.as_str() {
                "layers" => Ok(Checkpointing::Layers),
                "ops" => Ok(Checkpointing::Ops),
                "off" => Ok(Checkpointing::Off),
                _ => Err(serde::de::Error::custom(format!(
                    "gradient_checkpointing must be true, false, \"layers\", \"ops\" or \"off\", \
                     found \"{n}\""
                ))),
            },
        }
    }
}

fn default_dtype() -> String {
    "bf16".into()
}
fn default_quant() -> String {
    "none".into()
}
fn default_format() -> String {
    "csv".into()
}
fn default_min_pixels() -> usize {
    65_536
}
fn default_max_pixels() -> usize {
    16_777_216
}
fn default_prompt() -> String {
    crate::data::template::DEFAULT_PROMPT.into()
}
fn default_max_length() -> usize {
    8192
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_schedule() -> String {
    "cosine".into()
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}
fn default_loss_average() -> String {
    "tokens".into()
}

fn default_loss_scale() -> String {
    "dynamic".into()
}
fn default_log_every() -> usize {
    10
}
fn default_save_every() -> usize {
    100
}
fn default_keep_last() -> usize {
    3
}

/// Sets `section.key` in a parsed TOML document from `value` (TOML syntax, or a bare string).
fn set_key(doc: &mut toml::Table, assignment: &str, file: &Path) -> Result<()> {
    let bad = |message: String| Error::Config {
        path: file.to_path_buf(),
        field: assignment.to_string(),
        message,
    };
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| bad("expected --set section.key=value".into()))?;
    let (section, field) = key
        .trim()
        .split_once('.')
        .ok_or_else(|| bad("expected section.key, e.g. train.lr".into()))?;
    let value = value.trim();
    // A TOML value when it parses as one (numbers, booleans, arrays, quoted strings), else a string.
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let table = doc
        .get_mut(section)
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| {
            bad(format!(
                "no section [{section}]; sections: model, data, adapter, train, pretrain"
            ))
        })?;
    table.insert(field.to_string(), parsed);
    Ok(())
}

fn one_of(path: &Path, field: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::Config {
            path: path.to_path_buf(),
            field: field.into(),
            message: format!("`{value}` is not one of {}", allowed.join(", ")),
        })
    }
}

impl Experiment {
    /// Reads `path`, applies `overrides` (`section.key=value`), and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "Pass an experiment file such as experiments/qwen3-vl-4b-lora.toml.".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for o in overrides {
            set_key(&mut doc, o, path)?;
        }
        let exp: Experiment =
            toml::Value::Table(doc)
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config {
                    path: path.to_path_buf(),
                    field: "experiment".into(),
                    message: e.to_string(),
                })?;
        exp.validate(path)?;
        Ok(exp)
    }

    /// Dynamic loss scaling is on: f16 compute with `train.loss_scale = "dynamic"`.
    pub fn dynamic_loss_scale(&self) -> bool {
        self.model.dtype == "f16" && self.train.loss_scale == "dynamic"
    }

    /// Each sample's mean token loss weighs the same (`train.loss_average = "samples"`).
    pub fn loss_per_sample(&self) -> bool {
        self.train.loss_average == "samples"
    }

    /// Checks values that serde cannot: enumerations, ranges, combinations.
    pub fn validate(&self, path: &Path) -> Result<()> {
        one_of(
            path,
            "model.dtype",
            &self.model.dtype,
            &["f32", "f16", "bf16"],
        )?;
        one_of(path, "model.quant", &self.model.quant, &["none", "nf4"])?;
        one_of(
            path,
            "data.format",
            &self.data.format,
            &["csv", "conversations", "coco"],
        )?;
        one_of(
            path,
            "train.schedule",
            &self.train.schedule,
            &["cosine", "linear"],
        )?;
        one_of(
            path,
            "train.loss_average",
            &self.train.loss_average,
            &["tokens", "samples"],
        )?;
        one_of(
            path,
            "train.loss_scale",
            &self.train.loss_scale,
            &["dynamic", "none"],
        )?;
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::Config {
                    path: path.to_path_buf(),
                    field: field.into(),
                    message: "must be > 0".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("train.epochs", self.train.epochs)?;
        positive("train.batch_size", self.train.batch_size)?;
        positive("train.grad_accum", self.train.grad_accum)?;
        positive("data.max_length", self.data.max_length)?;
        if !(self.train.lr > 0.0 && self.train.lr < 1.0) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "train.lr".into(),
                message: format!("must be in (0, 1) (found {})", self.train.lr),
            });
        }
        if self.data.format == "coco" && self.data.images.is_none() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "data.images".into(),
                message: "format = \"coco\" needs the image folder".into(),
            });
        }
        self.adapter.validate().map_err(|e| Error::Config {
            path: path.to_path_buf(),
            field: "adapter".into(),
            message: e.to_string(),
        })
    }

    /// The dataset source of `[data]`.
    pub fn source(&self) -> crate::data::sources::Source {
        use crate::data::sources::Source;
        match self.data.format.as_str() {
            "conversations" => Source::Conversations(self.data.train.clone()),
            "coco" => Source::Coco {
                annotations: self.data.train.clone(),
                images: self.data.images.clone().unwrap_or_default(),
                per_image: self.data.per_image,
            },
            _ => Source::Csv(self.data.train.clone()),
        }
    }

    /// Image preprocessing settings of `[data]`.
    pub fn image_options(&self) -> crate::data::ImageOptions {
        crate::data::ImageOptions {
            min_pixels: self.data.min_pixels,
            max_pixels: self.data.max_pixels,
            resize: self.data.resize.map(|[h, w]| (h, w)),
            ..Default::default()
        }
    }

    /// The resolved settings as TOML (defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("experiments")
            .join(name)
    }

    #[test]
    fn reference_experiments_parse() {
        let lora = Experiment::load(&file("qwen3-vl-4b-lora.toml"), &[]).unwrap();
        assert_eq!(
            (lora.adapter.r, lora.adapter.alpha, lora.adapter.dropout),
            (8, 16.0, 0.05)
        );
        assert_eq!(
            lora.adapter.targets,
            ["q_proj", "k_proj", "v_proj", "o_proj"]
        );
        assert_eq!(
            (
                lora.train.batch_size,
                lora.train.grad_accum,
                lora.train.epochs
            ),
            (1, 8, 5)
        );
        assert_eq!(
            (lora.data.max_samples, lora.data.test_samples),
            (Some(500), 4)
        );
        assert_eq!(lora.data.resize, Some([280, 280]));
        let moe = Experiment::load(&file("qwen3-vl-4b-moelora.toml"), &[]).unwrap();
        assert_eq!(moe.adapter.kind, crate::adapter::AdapterKind::Moelora);
        assert_eq!((moe.adapter.experts, moe.adapter.router_dropout), (2, 0.1));
        assert_eq!(moe.adapter.targets.len(), 7);
    }

    #[test]
    fn overrides_and_errors_name_the_key() {
        let f = file("qwen3-vl-4b-lora.toml");
        let e = Experiment::load(&f, &["train.lr=3e-4".into(), "adapter.r=16".into()]).unwrap();
        assert_eq!((e.train.lr, e.adapter.r), (3e-4, 16));
        let e = Experiment::load(&f, &["train.output_dir=/tmp/x".into()]).unwrap();
        assert_eq!(e.train.output_dir, PathBuf::from("/tmp/x"));
        let err = Experiment::load(&f, &["train.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown field `lrr`") && err.contains("`lr`"),
            "{err}"
        );
        let err = Experiment::load(&f, &["train.schedule=step".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.schedule") && err.contains("cosine, linear"),
            "{err}"
        );
        let err = Experiment::load(&f, &["optim.lr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no section [optim]"), "{err}");
        let err = Experiment::load(&f, &["adapter.targets=[\"visual_q_proj\"]".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("valid names"), "{err}");
    }

    /// `true` means layer recomputation (HF's meaning); names pick a mode; anything else is
    /// an error naming the key and the allowed values.
    #[test]
    fn gradient_checkpointing_takes_flags_and_names() {
        let f = file("qwen3-vl-4b-lora.toml");
        let mode = |v: &str| {
            let set = format!("train.gradient_checkpointing={v}");
            Experiment::load(&f, &[set]).map(|e| e.train.gradient_checkpointing)
        };
        assert_eq!(mode("true").unwrap(), Checkpointing::Layers);
        assert_eq!(mode("false").unwrap(), Checkpointing::Off);
        assert_eq!(mode("layers").unwrap(), Checkpointing::Layers);
        assert_eq!(mode("ops").unwrap(), Checkpointing::Ops);
        assert_eq!(mode("off").unwrap(), Checkpointing::Off);
        let err = mode("sometimes").unwrap_err().to_string();
        assert!(
            err.contains("gradient_checkpointing")
                && err.contains("\"ops\"")
                && err.contains("sometimes"),
            "{err}"
        );
    }
}
