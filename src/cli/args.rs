//! The command line: every subcommand and its arguments (clap). `src/main.rs` dispatches them.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};
use crate::experiment::Experiment;

#[derive(Parser)]
#[command(
    name = "qwen3-vl-moelora",
    version,
    about = "Qwen3-VL with LoRA / MoE-LoRA adapters, in Rust on burn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print the architecture, the parameter count by component and, with an adapter, the
    /// peft-style trainable-parameter line.
    Info {
        /// A model folder (holding config.json) or a config.json file; overrides the
        /// experiment's model.path.
        #[arg(long, required_unless_present = "experiment")]
        model: Option<PathBuf>,
        /// An experiment file: prints its resolved settings and its adapter's trainable line.
        #[arg(long)]
        experiment: Option<PathBuf>,
        /// Experiment overrides, `section.key=value` (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// `lora`, `moelora`, or an adapter folder (adapter_config.json).
        #[arg(long)]
        adapter: Option<String>,
        /// Adapter rank.
        #[arg(long, default_value_t = 8)]
        r: usize,
        /// LoRA alpha.
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Comma-separated module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,qkv,proj,linear_fc1,linear_fc2).
        #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
        targets: String,
        /// MoE-LoRA experts.
        #[arg(long, default_value_t = 2)]
        experts: usize,
        /// MoE-LoRA experts per token.
        #[arg(long, default_value_t = 1)]
        top_k: usize,
    },
    /// Run one forward pass on inputs from a safetensors file and write the logits.
    Forward {
        /// Checkpoint folder (config.json + safetensors); a config.json with --random-init.
        #[arg(long)]
        model: PathBuf,
        /// input_ids [B,T] (i64), optional attention_mask [B,T], pixel_values [N,1536], image_grid_thw [I,3].
        #[arg(long)]
        inputs: PathBuf,
        /// Output safetensors: logits [B,T,V] (f32), position_ids [3,B,T], rope_deltas [B,1].
        #[arg(long)]
        out: PathBuf,
        /// auto (CUDA if usable, else CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Weight and activation dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Use random weights (the config alone); for timing.
        #[arg(long)]
        random_init: bool,
        /// Adapter folder (a peft LoRA folder or one of ours) applied on the base.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// NF4 base (bitsandbytes layout, double quant): quantize while loading. A 4-bit
        /// checkpoint (see `quantize`) is read as NF4 without this flag.
        #[arg(long)]
        nf4: bool,
        /// Also write vision outputs, DeepStack features and every layer's hidden state.
        #[arg(long)]
        all: bool,
        /// Timed repetitions after the first run; prints their median.
        #[arg(long, default_value_t = 0)]
        repeat: usize,
    },
    /// Preprocess one image as Qwen3-VL's processor does and write pixel_values and image_grid_thw.
    Preprocess {
        /// JPEG, PNG or WebP file.
        #[arg(long)]
        image: PathBuf,
        /// Smallest area after resizing.
        #[arg(long, default_value_t = 65_536)]
        min_pixels: usize,
        /// Largest area after resizing.
        #[arg(long, default_value_t = 16_777_216)]
        max_pixels: usize,
        /// Explicit target HEIGHTxWIDTH (itself rounded by smart_resize, e.g. 280x280 -> 288x288).
        #[arg(long)]
        resize: Option<String>,
        /// Output safetensors.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make or validate datasets.
    Data {
        #[command(subcommand)]
        action: DataCommand,
    },
    /// Merge a LoRA adapter into the base weights and write a full HF checkpoint.
    Merge {
        /// Base checkpoint folder.
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapter folder (peft format).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// keep (each tensor's dtype in the base checkpoint) or f32.
        #[arg(long, default_value = "keep")]
        dtype: String,
    },
    /// Train an adapter (default: the built-in demo, experiments/default.toml).
    Train(TrainArgs),
    /// Rewrite an HF checkpoint as a bitsandbytes NF4 4-bit checkpoint (transformers loads it).
    Quantize {
        /// Checkpoint folder (config.json + safetensors, bf16/f16/f32).
        #[arg(long)]
        model: PathBuf,
        /// New folder for the 4-bit checkpoint (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Values per NF4 block: 32, 64 ... 4096.
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Keep the block scales in f32 instead of double-quantizing them.
        #[arg(long)]
        no_double_quant: bool,
        /// Compute dtype recorded in quantization_config: float16 or bfloat16.
        #[arg(long, default_value = "float16")]
        compute_dtype: String,
    },
    /// Caption images with a base model and (optionally) a trained adapter; one image streams
    /// its caption, many are captioned in batches with a progress bar.
    Caption(CaptionArgs),
    /// Multi-turn chat in the terminal (`/image PATH` attaches an image, `/reset`, `/quit`).
    Chat(ChatArgs),
    /// Caption an experiment's held-out samples with its trained adapter and score them
    /// (BLEU-1..4, ROUGE-L, CIDEr-D); writes eval.json and report.html.
    Eval(EvalArgs),
    /// Benchmarks of the hot paths.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Run every combination of a sweep file and print the results table.
    Sweep {
        /// Sweep file (experiments/sweep-*.toml).
        file: PathBuf,
        /// auto, cpu, cuda or cuda:N (passed to each run).
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

/// Where the model, the adapter and the tokenizer come from (caption, chat).
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Base checkpoint folder (default: the base the adapter's training run used).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A training output folder (its final adapter, else its newest checkpoint), one of its
    /// checkpoints, or a peft adapter folder. Local paths only.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// tokenizer.json (default: the training run's, else the one in the model folder).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// f32, f16 or bf16 (default: the run's model.dtype, else f32 on the CPU, bf16 on a GPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// NF4 base: quantize the linear layers while loading (default: the run's model.quant; a
    /// 4-bit checkpoint is always NF4).
    #[arg(long)]
    pub nf4: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// How tokens are chosen (defaults: the model's generation_config.json, else greedy).
#[derive(clap::Args, Clone, Debug)]
pub struct GenerationArgs {
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Greedy decoding, whatever generation_config.json says.
    #[arg(long, conflicts_with = "sample")]
    pub greedy: bool,
    /// Sample, whatever generation_config.json says.
    #[arg(long)]
    pub sample: bool,
    /// Sampling temperature (> 0).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (0, 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Penalty on tokens already in the sequence (1 = none; HF's repetition_penalty).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Image preprocessing and prompt (defaults: the training run's settings).
#[derive(clap::Args, Clone, Debug)]
pub struct ImageArgs {
    /// Text after the image (default: the run's data.prompt, else "COCO Yes:").
    #[arg(long)]
    pub prompt: Option<String>,
    /// Explicit resize HEIGHTxWIDTH (rounded by smart_resize).
    #[arg(long)]
    pub resize: Option<String>,
    /// Smallest image area after resizing.
    #[arg(long)]
    pub min_pixels: Option<usize>,
    /// Largest image area after resizing.
    #[arg(long)]
    pub max_pixels: Option<usize>,
}

/// Arguments of `caption`.
#[derive(clap::Args, Clone, Debug)]
pub struct CaptionArgs {
    /// Model, adapter, tokenizer, device.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token choice.
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Prompt and image settings.
    #[command(flatten)]
    pub images: ImageArgs,
    /// Image files.
    #[arg(long, num_args = 1.., required_unless_present_any = ["folder", "csv"])]
    pub image: Vec<PathBuf>,
    /// Every JPEG/PNG/WebP image in a folder.
    #[arg(long)]
    pub folder: Option<PathBuf>,
    /// An image_path,caption CSV (the captions are used as references and scored).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write one JSON line per image here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// Arguments of `chat`.
#[derive(clap::Args, Clone, Debug)]
pub struct ChatArgs {
    /// Model, adapter, tokenizer, device.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token choice.
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Image settings (the prompt flag is unused).
    #[command(flatten)]
    pub images: ImageArgs,
    /// A system message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
}

/// Arguments of `eval`.
#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// Experiment file (its model, data split, prompt and image settings are used).
    #[arg(long)]
    pub config: PathBuf,
    /// Trained adapter: an output folder, a checkpoint or an adapter folder (default: the
    /// experiment's train.output_dir).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Override any field: section.key=value (repeatable).
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Folder for eval.json and report.html (default: the checkpoint's output folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Samples per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Token choice (greedy unless --sample).
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time the training step of an experiment: samples/s, tokens/s, model FLOP utilisation.
    Train(BenchTrainArgs),
    /// Time generation (prefill, decode tokens/s) on random weights of a model config.
    Generate(BenchGenerateArgs),
    /// Check the NF4 GPU kernels against a host reference, then time them on the 4B shapes.
    Nf4(BenchNf4Args),
}

/// `bench nf4` arguments.
#[derive(clap::Args)]
pub struct BenchNf4Args {
    /// Compute dtype: f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Rows for the GEMV timings (comma-separated).
    #[arg(long, default_value = "1,8")]
    pub gemv_rows: String,
    /// Rows for the GEMM timings (comma-separated, or `none`).
    #[arg(long, default_value = "128,512,2048")]
    pub gemm_rows: String,
    /// Calls per timed repeat.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Timed repeats (median reported).
    #[arg(long, default_value_t = 7)]
    pub repeats: usize,
    /// Only run the correctness checks.
    #[arg(long)]
    pub check_only: bool,
    /// Which checks run first: all, nf4 (the NF4 layer, forward and dX), gemv (the NF4 cases
    /// with at most 8 rows), gemm (the other NF4 cases), others (the layer kernels and their backwards, routing, AdamW and
    /// gradient-norm kernels) or none.
    #[arg(long, default_value = "all")]
    pub checks: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Arguments of `bench generate`.
#[derive(clap::Args)]
pub struct BenchGenerateArgs {
    /// A config.json or a model folder holding one (weights are random).
    #[arg(long)]
    pub model: PathBuf,
    /// Rows generated together (comma-separated for several runs, e.g. 1,8).
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// Prompt tokens per row, the image's included.
    #[arg(long, default_value_t = 120)]
    pub prompt_tokens: usize,
    /// New tokens per row.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed generations (median reported) after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// NF4 base (double quant).
    #[arg(long)]
    pub nf4: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Arguments of `bench train`.
#[derive(clap::Args)]
pub struct BenchTrainArgs {
    /// Experiment file (its model, adapter, dtype, accumulation and checkpointing are used).
    #[arg(long)]
    pub config: PathBuf,
    /// Model folder or config.json (model.path).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Override any field: section.key=value (repeatable).
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Random weights from the config alone (speed does not depend on the values).
    #[arg(long)]
    pub random_weights: bool,
    /// Timed optimizer steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed optimizer steps first (compilation, autotuning).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Tokens per sample, image tokens included.
    #[arg(long, default_value_t = 120)]
    pub tokens: usize,
    /// The card's dense f16/bf16 peak in TFLOP/s (H100/H200 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Arguments of `train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Experiment file.
    #[arg(long, default_value = "experiments/default.toml")]
    pub config: PathBuf,
    /// Base checkpoint folder (model.path).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data file (data.train).
    #[arg(long)]
    pub train_data: Option<PathBuf>,
    /// Output folder (train.output_dir).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Override any field: section.key=value (repeatable).
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Continue the run in OUTPUT_DIR from its newest checkpoint (uses its config.toml).
    #[arg(long, value_name = "OUTPUT_DIR")]
    pub resume: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Data-parallel training on several GPUs: cuda:0,cuda:1,... or all (builds with the
    /// `ddp` feature; replaces --device).
    #[arg(long, conflicts_with = "device", value_name = "LIST")]
    pub devices: Option<String>,
    /// Hosts taking part (multi-host training is not available with burn 0.21; see README).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// This host's rank among --nodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// HOST:PORT of the rank-0 host.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Plain log lines even on a terminal (no dashboard).
    #[arg(long)]
    pub plain: bool,
}

/// A path as a TOML string value for a `--set` override.
fn quoted(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

impl BenchTrainArgs {
    /// The experiment with `--model` folded into the overrides.
    pub fn experiment(&self) -> Result<Experiment> {
        let mut set = self.set.clone();
        if let Some(m) = &self.model {
            set.push(format!("model.path={}", quoted(m)));
        }
        Experiment::load(&self.config, &set)
    }
}

impl TrainArgs {
    /// The device spec (`--devices`, else `--device`); multi-host flags are refused with the
    /// reason.
    pub fn devices(&self) -> Result<String> {
        if self.nodes > 1 || self.node_rank > 0 || self.coordinator.is_some() {
            return Err(Error::Argument {
                arg: "--nodes".into(),
                message: "multi-host training needs a collective backend across hosts, which \
                          burn 0.21.0 does not ship (its DDP all-reduces between the GPUs of one \
                          process: DistributedConfig holds only the reduce operation); train on \
                          one host with --devices"
                    .into(),
            });
        }
        Ok(self.devices.clone().unwrap_or_else(|| self.device.clone()))
    }

    /// The experiment with the path flags folded into the overrides.
    pub fn experiment(&self) -> Result<Experiment> {
        let mut set = self.set.clone();
        let file = match &self.resume {
            Some(dir) => {
                set.push(format!("train.output_dir={}", quoted(dir)));
                dir.join("config.toml")
            }
            None => self.config.clone(),
        };
        for (key, value) in [
            ("model.path", &self.model),
            ("data.train", &self.train_data),
            ("train.output_dir", &self.output_dir),
        ] {
            if let Some(v) = value {
                set.push(format!("{key}={}", quoted(v)));
            }
        }
        Experiment::load(&file, &set)
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write a deterministic synthetic captioning set (images, captions.csv, tokenizer.json).
    Prepare {
        /// Number of samples.
        #[arg(long)]
        synthetic: usize,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Special-token ids of the tokenizer: compact (after the vocabulary) or qwen (151643...).
        #[arg(long, default_value = "compact")]
        special_ids: String,
    },
    /// Validate a dataset: every row and image; counts, token lengths, image sizes.
    Check {
        /// An experiment file: checks its [data] with its settings.
        #[arg(long, conflicts_with_all = ["csv", "json", "coco"])]
        config: Option<PathBuf>,
        /// image_path,caption CSV.
        #[arg(long, conflicts_with_all = ["json", "coco"])]
        csv: Option<PathBuf>,
        /// The reference's conversation JSON.
        #[arg(long, conflicts_with = "coco")]
        json: Option<PathBuf>,
        /// COCO captions_*.json (with --images).
        #[arg(long, requires = "images")]
        coco: Option<PathBuf>,
        /// Image folder for --coco.
        #[arg(long)]
        images: Option<PathBuf>,
        /// COCO: one sample per image instead of per caption.
        #[arg(long)]
        per_image: bool,
        /// tokenizer.json (file or model folder); default: tokenizer.json beside the dataset.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Captioning prompt.
        #[arg(long, default_value = "COCO Yes:")]
        prompt: String,
        /// Truncation length in tokens.
        #[arg(long, default_value_t = 8192)]
        max_length: usize,
        /// Explicit image resize HEIGHTxWIDTH (e.g. 280x280).
        #[arg(long)]
        resize: Option<String>,
        /// Report bad rows and exit 0 instead of failing.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Benchmark image preprocessing (images/s) on the files of a folder.
    Bench {
        /// Folder of images.
        #[arg(long)]
        images: PathBuf,
        /// Explicit resize HEIGHTxWIDTH.
        #[arg(long)]
        resize: Option<String>,
        /// Timed passes (the best is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}
