//! The `bench` subcommands: each parses its options, picks the backend through `device.rs`
//! and prints a human line plus one JSON line per measurement.

use std::path::PathBuf;

use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use qwen3_vl_moelora::checkpoint::WeightDType;
use qwen3_vl_moelora::cli::args::{BenchGenerateArgs, BenchNf4Args, BenchTrainArgs};
use qwen3_vl_moelora::cli::data::bench_preprocess;
use qwen3_vl_moelora::cli::preprocess::parse_size;
use qwen3_vl_moelora::data::ImageOptions;
use qwen3_vl_moelora::experiment::{Checkpointing, Experiment};
use qwen3_vl_moelora::infer::bench::{bench_generate, GenerateBenchOptions};
use qwen3_vl_moelora::model::config::config_file;
use qwen3_vl_moelora::model::Qwen3VlConfig;
use qwen3_vl_moelora::quant::bench::{
    bench_nf4, check_adamw_kernel, check_grad_norm_kernel, check_kernels, check_layer_grads,
    check_layer_ops, check_routing_kernels, check_selection, print_checks, tolerance, CheckCase,
    Nf4BenchOptions, QWEN3_VL_4B_SHAPES,
};
use qwen3_vl_moelora::train::bench::{bench_train, BenchOptions, BenchReport};
use qwen3_vl_moelora::train::TrainDevices;
use qwen3_vl_moelora::{Error, Result};

use crate::device::{self, on_infer_backend, on_train_backend, InferJob, TrainJob};

/// `bench generate`: prefill and decode speed at each batch size of `--batch`.
pub fn run_bench_generate(args: BenchGenerateArgs) -> Result<()> {
    let cfg = Qwen3VlConfig::from_path(&config_file(&args.model))?;
    let dtype = WeightDType::parse(&args.dtype)?;
    struct Job(Qwen3VlConfig, GenerateBenchOptions);
    impl InferJob for Job {
        fn run<B: Backend>(self, _: WeightDType, device: &B::Device) -> Result<()> {
            let r = bench_generate::<B>(&self.0, &self.1, device)?;
            println!(
                "bench generate: batch {}, prompt {} tokens: prefill {:.1} ms, decode {:.1} \
                 tokens/s ({:.2} ms per step), {} new tokens per row",
                r.batch,
                r.prompt_tokens,
                r.prefill_s * 1e3,
                r.decode_tokens_per_s,
                r.step_s * 1e3,
                r.new_tokens
            );
            println!("{}", serde_json::to_string(&r).expect("json"));
            Ok(())
        }
    }
    for batch in positive_list("--batch", &args.batch)? {
        let opts = GenerateBenchOptions {
            batch,
            prompt_tokens: args.prompt_tokens,
            image_patches_per_side: 18,
            new_tokens: args.new_tokens,
            repeats: args.repeats,
            dtype,
            nf4: args.nf4,
        };
        on_infer_backend(&args.device, Job(cfg.clone(), opts))?;
    }
    Ok(())
}

/// `bench train`: optimizer steps per second, tokens per second and MFU of one experiment.
pub fn run_bench_train(args: BenchTrainArgs) -> Result<()> {
    let exp = args.experiment()?;
    let opts = BenchOptions {
        steps: args.steps,
        warmup: args.warmup,
        random_weights: args.random_weights,
        tokens: args.tokens,
        peak_tflops: args.peak_tflops,
        memory: Some(device::cuda_pool_memory),
    };
    struct Job(Experiment, BenchOptions);
    impl TrainJob for Job {
        type Out = BenchReport;
        fn run<B: AutodiffBackend>(self, devices: &TrainDevices<B>) -> Result<BenchReport> {
            bench_train::<B>(&self.0, &self.1, devices.main())
        }
    }
    let checkpointing = exp.train.gradient_checkpointing;
    let report = on_train_backend(&args.device, checkpointing, Job(exp, opts))?;
    println!(
        "bench train: {:.3} samples/s, {:.0} tokens/s, {:.3} s per optimizer step (median of {}, \
         min {:.3}), MFU {:.2}% of {} TFLOP/s",
        report.samples_per_s,
        report.tokens_per_s,
        report.step_s_median,
        args.steps,
        report.step_s_min,
        report.mfu * 100.0,
        args.peak_tflops
    );
    if let (Some(w), Some(u), Some(r)) =
        (report.weights_mib, report.in_use_mib, report.reserved_mib)
    {
        println!(
            "device memory: weights {w:.0} MiB; live tensors up to {u:.0} MiB between \
             micro-batches; allocator reserved up to {r:.0} MiB; timed steps' allocations: {}",
            report.step_allocations
        );
    }
    println!("{}", serde_json::to_string(&report).expect("json"));
    Ok(())
}

/// Positive numbers separated by commas (`1,8`), or an error naming the flag.
fn positive_list(arg: &str, v: &str) -> Result<Vec<usize>> {
    v.split(',')
        .map(|r| r.trim().parse::<usize>().ok().filter(|&r| r > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Argument {
            arg: arg.into(),
            message: format!("expected positive numbers separated by commas, found `{v}`"),
        })
}

/// `bench nf4`: the NF4 kernels' GPU checks, then GEMV/GEMM timings on the 4B shapes.
pub fn run_bench_nf4(args: BenchNf4Args) -> Result<()> {
    let opts = Nf4BenchOptions {
        shapes: QWEN3_VL_4B_SHAPES.to_vec(),
        gemv_rows: positive_list("--gemv-rows", &args.gemv_rows)?,
        gemm_rows: match args.gemm_rows.as_str() {
            "none" => Vec::new(),
            v => positive_list("--gemm-rows", v)?,
        },
        dtype: WeightDType::parse(&args.dtype)?.dtype(),
        iters: args.iters,
        repeats: args.repeats,
    };
    let (nf4_cases, other_checks) =
        check_selection(&args.checks).ok_or_else(|| Error::Argument {
            arg: "--checks".into(),
            message: format!(
                "expected all, nf4, gemv, gemm, others or none, found `{}`",
                args.checks
            ),
        })?;
    struct Job(Nf4BenchOptions, bool, Vec<CheckCase>, bool);
    impl TrainJob for Job {
        type Out = ();
        fn run<B: AutodiffBackend>(self, devices: &TrainDevices<B>) -> Result<()> {
            let (o, check_only, device) = (self.0, self.1, devices.main());
            let checks = check_kernels::<B>(&self.2, o.dtype, device)?;
            let mut failed = print_checks(&checks, o.dtype);
            if self.3 {
                match check_layer_ops::<B::InnerBackend>(o.dtype, device) {
                    Some(rows) => failed += print_checks(&rows, o.dtype),
                    None => println!("check layer kernels: none on this backend"),
                }
                match check_routing_kernels::<B::InnerBackend>(device) {
                    Some(rows) => failed += print_checks(&rows, o.dtype),
                    None => {
                        println!("check routing kernels: none (CUDA without QWEN3VL_ROUTING_KERNELS=0 has them)")
                    }
                }
                match check_adamw_kernel::<B::InnerBackend>(device) {
                    Some(rows) => failed += print_checks(&rows, o.dtype),
                    None => println!(
                        "check AdamW kernel: none (CUDA without QWEN3VL_ADAMW_KERNEL=0 has it)"
                    ),
                }
                match check_layer_grads::<B::InnerBackend>(o.dtype, device) {
                    Some(rows) => failed += print_checks(&rows, o.dtype),
                    None => println!(
                        "check layer backward kernels: none (CUDA without \
                         QWEN3VL_LAYER_STEPS=0 has them)"
                    ),
                }
                match check_grad_norm_kernel::<B::InnerBackend>(device) {
                    Some(rows) => failed += print_checks(&rows, o.dtype),
                    None => println!(
                        "check gradient norm kernel: none (CUDA without \
                         QWEN3VL_GRAD_NORM_KERNEL=0 has it)"
                    ),
                }
            }
            if !check_only {
                let report = bench_nf4::<B::InnerBackend>(&o, checks, device)?;
                println!("{}", serde_json::to_string(&report).expect("json"));
            }
            match failed {
                0 => Ok(()),
                n => Err(Error::Input(format!(
                    "{n} kernel checks above the {:.0e} tolerance",
                    tolerance(o.dtype)
                ))),
            }
        }
    }
    on_train_backend(
        &args.device,
        Checkpointing::Off,
        Job(opts, args.check_only, nf4_cases, other_checks),
    )
}

/// `bench preprocess`: our image preprocessing over a folder of images, one thread and all.
pub fn run_bench_preprocess(images: PathBuf, resize: Option<String>, repeat: usize) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
        .map_err(|e| Error::io(&images, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let opts = ImageOptions {
        resize: resize.as_deref().map(parse_size).transpose()?,
        ..Default::default()
    };
    let r = bench_preprocess(&files, &opts, repeat)?;
    println!(
        "ours: {} images, best of {repeat}: {:.1} images/s on 1 thread, {:.1} images/s on {} threads",
        r.images, r.single_thread, r.all_threads, r.threads
    );
    Ok(())
}
