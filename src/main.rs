//! Command-line entry point: parses arguments, picks the backend (CUDA when usable, else the
//! Flex CPU backend; see `device.rs`) and dispatches. The binary is the only place that names
//! concrete backends.

use std::process::ExitCode;

mod bench_commands;
mod device;

use burn::backend::cuda::{Cuda, CudaDevice};
use burn::backend::flex::FlexDevice;
use burn::backend::Flex;
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use device::{choose_device, on_infer_backend, on_train_backend, DeviceChoice, InferJob, TrainJob};
use qwen3_vl_moelora::cli::args::{
    BenchCommand, CaptionArgs, ChatArgs, Cli, Command, DataCommand, EvalArgs, TrainArgs,
};
use qwen3_vl_moelora::cli::caption::run_caption;
use qwen3_vl_moelora::cli::chat::run_chat;
use qwen3_vl_moelora::cli::eval::run_eval;

use qwen3_vl_moelora::adapter::merge::{merge_lora, MergeDType};
use qwen3_vl_moelora::adapter::peft::read_adapter_config;
use qwen3_vl_moelora::adapter::{AdapterConfig, AdapterKind};
use qwen3_vl_moelora::checkpoint::WeightDType;
use qwen3_vl_moelora::cli::data::{
    check_dataset, default_tokenizer, parse_special_ids, write_synthetic_set, CheckOptions,
};
use qwen3_vl_moelora::cli::forward::{run_forward, ForwardOptions};
use qwen3_vl_moelora::cli::info::info_report;
use qwen3_vl_moelora::cli::preprocess::{parse_size, preprocess_to_file};
use qwen3_vl_moelora::data::sources::Source;
use qwen3_vl_moelora::data::ImageOptions;
use qwen3_vl_moelora::experiment::Experiment;
use qwen3_vl_moelora::quant::convert::{quantize_checkpoint, QuantizeOptions};
use qwen3_vl_moelora::train::sweep::run_sweep;
use qwen3_vl_moelora::train::{train, TrainDevices, TrainOptions};
use qwen3_vl_moelora::{Error, Result};

fn run_train(args: TrainArgs) -> Result<()> {
    use std::io::IsTerminal;
    let exp = args.experiment()?;
    let opts = TrainOptions {
        resume: args.resume.is_some(),
        dashboard: std::io::stdout().is_terminal() && !args.plain,
    };
    struct Job(Experiment, TrainOptions);
    impl TrainJob for Job {
        type Out = ();
        fn run<B: AutodiffBackend>(self, devices: &TrainDevices<B>) -> Result<()> {
            train::<B>(&self.0, &self.1, devices).map(|_| ())
        }
    }
    let checkpointing = exp.train.gradient_checkpointing;
    on_train_backend(&args.devices()?, checkpointing, Job(exp, opts))
}

fn run_inference(command: Command) -> Result<()> {
    enum Job {
        Caption(CaptionArgs),
        Chat(ChatArgs),
        Eval(EvalArgs),
    }
    impl InferJob for Job {
        fn run<B: Backend>(self, dtype: WeightDType, device: &B::Device) -> Result<()> {
            match self {
                Job::Caption(a) => run_caption::<B>(&a, dtype, device),
                Job::Chat(a) => run_chat::<B>(&a, dtype, device),
                Job::Eval(a) => run_eval::<B>(&a, device).map(|_| ()),
            }
        }
    }
    let (device, job) = match command {
        Command::Caption(a) => (a.model.device.clone(), Job::Caption(a)),
        Command::Chat(a) => (a.model.device.clone(), Job::Chat(a)),
        Command::Eval(a) => (a.device.clone(), Job::Eval(a)),
        _ => unreachable!("only inference commands"),
    };
    on_infer_backend(&device, job)
}

fn forward_on<B: Backend>(opts: &ForwardOptions, device: &B::Device, name: &str) -> Result<()> {
    eprintln!("forward: {name}, dtype {:?}", opts.dtype);
    let r = run_forward::<B>(opts, device)?;
    eprint!(
        "model ready in {:.2} s; first forward {:.1} ms (includes kernel compilation on GPU)",
        r.load_s,
        r.first_s * 1e3
    );
    match r.median_s {
        Some(m) => eprintln!(
            "; median of {} timed forwards {:.2} ms (min {:.2} ms)",
            r.runs_s.len(),
            m * 1e3,
            r.runs_s.iter().cloned().fold(f64::INFINITY, f64::min) * 1e3
        ),
        None => eprintln!(),
    }
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info {
            model,
            experiment: Some(file),
            set,
            ..
        } => {
            let mut exp = Experiment::load(&file, &set)?;
            if let Some(m) = model {
                exp.model.path = m;
            }
            println!("# {} (resolved)\n{}", file.display(), exp.to_toml());
            print!(
                "{}",
                info_report::<Flex>(&exp.model.path, Some(&exp.adapter), &FlexDevice)?
            );
            Ok(())
        }
        Command::Info {
            model,
            experiment: None,
            set: _,
            adapter,
            r,
            alpha,
            targets,
            experts,
            top_k,
        } => {
            let adapter = match adapter.as_deref() {
                None => None,
                Some(kind @ ("lora" | "moelora")) => Some(AdapterConfig {
                    kind: if kind == "lora" {
                        AdapterKind::Lora
                    } else {
                        AdapterKind::Moelora
                    },
                    r,
                    alpha,
                    dropout: 0.0,
                    experts,
                    top_k,
                    renormalize: false,
                    router_dropout: 0.0,
                    aux_loss_coef: 0.01,
                    targets: targets.split(',').map(|t| t.trim().to_string()).collect(),
                    layers: None,
                }),
                Some(dir) => Some(read_adapter_config(std::path::Path::new(dir))?),
            };
            let model = model.expect("clap requires --model without --experiment");
            print!(
                "{}",
                info_report::<Flex>(&model, adapter.as_ref(), &FlexDevice)?
            );
            Ok(())
        }
        Command::Forward {
            model,
            inputs,
            out,
            device,
            dtype,
            random_init,
            adapter,
            nf4,
            all,
            repeat,
        } => {
            let opts = ForwardOptions {
                model,
                inputs,
                out,
                dtype: WeightDType::parse(&dtype)?,
                random_init,
                adapter,
                nf4,
                all,
                repeat,
            };
            match choose_device(&device)? {
                DeviceChoice::Cpu => forward_on::<Flex>(&opts, &FlexDevice, "cpu (flex)"),
                DeviceChoice::Cuda(i) => {
                    forward_on::<Cuda>(&opts, &CudaDevice::new(i), &format!("cuda:{i}"))
                }
            }
        }
        Command::Preprocess {
            image,
            min_pixels,
            max_pixels,
            resize,
            out,
        } => {
            let opts = ImageOptions {
                min_pixels,
                max_pixels,
                resize: resize.as_deref().map(parse_size).transpose()?,
                ..Default::default()
            };
            let p = preprocess_to_file(&image, &opts, &out)?;
            eprintln!(
                "{}: grid (t, h, w) = {:?}, {} patch rows, {} image tokens; wrote {}",
                image.display(),
                p.grid_thw,
                p.pixel_values.len() / opts.patch_dim(),
                p.num_tokens(opts.merge_size),
                out.display()
            );
            Ok(())
        }
        Command::Data { action } => run_data(action),
        Command::Merge {
            model,
            adapter,
            out,
            dtype,
        } => {
            let dtype = match dtype.as_str() {
                "keep" => MergeDType::Keep,
                "f32" => MergeDType::F32,
                other => {
                    return Err(Error::Argument {
                        arg: "--dtype".into(),
                        message: format!("expected keep or f32, found `{other}`"),
                    })
                }
            };
            let n = merge_lora(&model, &adapter, &out, dtype)?;
            eprintln!(
                "merged the adapter into {n} weights; wrote {}",
                out.display()
            );
            Ok(())
        }
        Command::Train(args) => run_train(args),
        c @ (Command::Caption(_) | Command::Chat(_) | Command::Eval(_)) => run_inference(c),
        Command::Quantize {
            model,
            out,
            blocksize,
            no_double_quant,
            compute_dtype,
        } => {
            if !["float16", "bfloat16"].contains(&compute_dtype.as_str()) {
                return Err(Error::Argument {
                    arg: "--compute-dtype".into(),
                    message: format!("expected float16 or bfloat16, found `{compute_dtype}`"),
                });
            }
            let opts = QuantizeOptions {
                blocksize,
                double_quant: !no_double_quant,
                compute_dtype,
            };
            let r = quantize_checkpoint(&model, &out, &opts)?;
            println!(
                "quantized {} linear weights ({} values) to NF4{}, kept {} tensors ({} values); \
                 bitsandbytes parameter count {}; {:.1} MB written to {}",
                r.quantized,
                r.quantized_values,
                if opts.double_quant {
                    " + double quant"
                } else {
                    ""
                },
                r.kept,
                r.kept_values,
                r.bnb_parameters(),
                r.bytes as f64 / 1e6,
                out.display()
            );
            Ok(())
        }
        Command::Bench {
            what: BenchCommand::Generate(args),
        } => bench_commands::run_bench_generate(args),
        Command::Bench {
            what: BenchCommand::Train(args),
        } => bench_commands::run_bench_train(args),
        Command::Bench {
            what: BenchCommand::Nf4(args),
        } => bench_commands::run_bench_nf4(args),
        Command::Sweep { file, device } => {
            let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
            let results = run_sweep(&file, &exe, &device)?;
            match results.iter().filter(|r| r.error.is_some()).count() {
                0 => Ok(()),
                n => Err(Error::Input(format!(
                    "{n} of {} sweep runs failed",
                    results.len()
                ))),
            }
        }
    }
}

fn run_data(action: DataCommand) -> Result<()> {
    match action {
        DataCommand::Prepare {
            synthetic,
            out,
            seed,
            special_ids,
        } => {
            let ids = parse_special_ids(&special_ids)?;
            write_synthetic_set(&out, synthetic, seed, ids)?;
            eprintln!(
                "wrote {synthetic} samples: {0}/images/, {0}/captions.csv, {0}/tokenizer.json",
                out.display()
            );
            Ok(())
        }
        DataCommand::Check {
            config: Some(file),
            tokenizer,
            skip_bad,
            ..
        } => {
            let exp = Experiment::load(&file, &[])?;
            let tok = tokenizer
                .or_else(|| default_tokenizer(&exp.data.train))
                .or_else(|| Some(exp.model.path.join("tokenizer.json")).filter(|p| p.exists()));
            let opts = CheckOptions {
                source: exp.source(),
                tokenizer: tok,
                image: exp.image_options(),
                prompt: exp.data.prompt.clone(),
                max_length: exp.data.max_length,
                skip_bad: skip_bad || exp.data.skip_bad,
            };
            finish_check(&opts)
        }
        DataCommand::Check {
            config: None,
            csv,
            json,
            coco,
            images,
            per_image,
            tokenizer,
            prompt,
            max_length,
            resize,
            skip_bad,
        } => {
            let (source, file) = match (csv, json, coco) {
                (Some(c), _, _) => (Source::Csv(c.clone()), c),
                (_, Some(j), _) => (Source::Conversations(j.clone()), j),
                (_, _, Some(a)) => (
                    Source::Coco {
                        annotations: a.clone(),
                        images: images.unwrap_or_default(),
                        per_image,
                    },
                    a,
                ),
                _ => {
                    return Err(Error::Argument {
                        arg: "data check".into(),
                        message: "pass --csv FILE, --json FILE or --coco FILE --images DIR".into(),
                    })
                }
            };
            let opts = CheckOptions {
                tokenizer: tokenizer.or_else(|| default_tokenizer(&file)),
                source,
                image: ImageOptions {
                    resize: resize.as_deref().map(parse_size).transpose()?,
                    ..Default::default()
                },
                prompt,
                max_length,
                skip_bad,
            };
            finish_check(&opts)
        }
        DataCommand::Bench {
            images,
            resize,
            repeat,
        } => bench_commands::run_bench_preprocess(images, resize, repeat),
    }
}

/// Runs `data check` and fails when a bad row was found without `--skip-bad`.
fn finish_check(opts: &CheckOptions) -> Result<()> {
    let report = check_dataset(opts)?;
    print!("{}", report.text);
    if !report.bad.is_empty() && !opts.skip_bad {
        return Err(Error::Input(format!(
            "{} bad rows (first: {}: {}); fix them or pass --skip-bad",
            report.bad.len(),
            report.bad[0].origin,
            report.bad[0].reason
        )));
    }
    Ok(())
}

/// The CUDA driver keeps the machine code it compiles from our kernels' PTX in a disk cache
/// (`~/.nv/ComputeCache`) whose size `CUDA_CACHE_MAXSIZE` caps (256 MiB by default in NVIDIA's
/// documentation); the 4B training step's kernels take ~400 MiB there (tests/NOTES.md), so under
/// the default cap every run would recompile part of them (minutes). Raise the cap to the
/// driver's maximum, 4 GiB, unless the user set one. Runs before any thread or CUDA starts.
fn enlarge_cuda_jit_cache() {
    if std::env::var_os("CUDA_CACHE_MAXSIZE").is_none() {
        std::env::set_var("CUDA_CACHE_MAXSIZE", "4294967296");
    }
}

fn main() -> ExitCode {
    enlarge_cuda_jit_cache();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
