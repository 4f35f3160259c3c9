//! Part of the binary, not the library: picks the backend at run time (Flex on the CPU, burn-cuda
//! with or without fusion and gradient checkpointing on a GPU) and never panics for lack of a GPU.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::cuda::{Cuda, CudaDevice};
use burn::backend::flex::FlexDevice;
use burn::backend::{Autodiff, Flex};
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use qwen3_vl_moelora::checkpoint::WeightDType;
use qwen3_vl_moelora::experiment::Checkpointing;
use qwen3_vl_moelora::quant::kernels::{self, Nf4Backend};
use qwen3_vl_moelora::train::bench::PoolMemory;
use qwen3_vl_moelora::train::memory::{register_memory_probe, DeviceMemory};
use qwen3_vl_moelora::train::TrainDevices;
use qwen3_vl_moelora::{Error, Result};

/// Work that runs on an autodiff backend chosen at run time.
pub trait TrainJob {
    /// What the work returns.
    type Out;
    /// Runs on backend `B` (one device, or data-parallel replicas).
    fn run<B: AutodiffBackend>(self, devices: &TrainDevices<B>) -> Result<Self::Out>;
}

/// burn-cuda without burn's fusion JIT (the default; `QWEN3VL_FUSION=1` adds it).
pub type CudaUnfused = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// Whether the custom NF4 kernels are used on CUDA: `QWEN3VL_NF4_KERNELS=0` falls back to the
/// portable dequantize-then-matmul path (for comparisons). Under burn's fusion they run as
/// custom fusion operations, which have not been checked on a GPU yet: there they are opt-in
/// (`QWEN3VL_NF4_KERNELS=1`).
pub fn nf4_kernels_enabled(fusion: bool) -> bool {
    match std::env::var("QWEN3VL_NF4_KERNELS").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => !fusion,
    }
}

/// Lets NF4 layers on CUDA backend `B` (and its inner backend) use the custom kernels.
fn use_nf4_kernels<B>(fusion: bool)
where
    B: AutodiffBackend + Nf4Backend,
    B::InnerBackend: Nf4Backend,
{
    if nf4_kernels_enabled(fusion) {
        kernels::register::<B>();
        kernels::register::<B::InnerBackend>();
    }
}

/// Whether the switch `name` is on: unset or anything but `0` (the comparison toggles below).
fn env_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// Whether the fused layer kernels (RMSNorm, q/k norm + rotary, softmax, SwiGLU) run on CUDA
/// without fusion: `QWEN3VL_LAYER_KERNELS=0` keeps the tensor ops (for comparisons). Under
/// burn's fusion the tensor ops are fused anyway.
pub fn layer_kernels_enabled() -> bool {
    env_on("QWEN3VL_LAYER_KERNELS")
}

/// Lets the decoder on burn-cuda without fusion use the fused layer kernels (see
/// [`layer_kernels_enabled`]).
fn use_layer_kernels() {
    if layer_kernels_enabled() {
        kernels::layer_ops::register::<cubecl::cuda::CudaRuntime, f32, i32, u8>();
    }
}

/// Whether training runs the fused layer kernels as autodiff steps with closed-form backward
/// kernels (`quant::kernels::layer_steps`) on CUDA without fusion: on unless
/// `QWEN3VL_LAYER_STEPS=0` or `QWEN3VL_LAYER_KERNELS=0` (tensor ops, for comparisons).
pub fn layer_steps_enabled() -> bool {
    layer_kernels_enabled() && env_on("QWEN3VL_LAYER_STEPS")
}

/// Lets the decoder on the autodiff backend `B` (CUDA without fusion) run the layer steps (see
/// [`layer_steps_enabled`]).
fn use_layer_steps<B: kernels::layer_steps::LayerStepsBackend>() {
    if layer_steps_enabled() {
        kernels::layer_steps::register::<B>();
        kernels::layer_grads::register::<cubecl::cuda::CudaRuntime, f32, i32, u8>();
    }
}

/// Whether MoE-LoRA layers route in one autodiff step (`quant::kernels::routing`) when
/// training: `QWEN3VL_ROUTING_STEP=0` records the routing's tensor ops instead (for comparisons).
pub fn routing_step_enabled() -> bool {
    env_on("QWEN3VL_ROUTING_STEP")
}

/// Whether MoE-LoRA layers run their router and expert products as one autodiff step each
/// (`quant::kernels::expert_step`) when training: `QWEN3VL_EXPERT_STEP=0` records the tensor
/// ops instead (for comparisons).
pub fn expert_step_enabled() -> bool {
    env_on("QWEN3VL_EXPERT_STEP")
}

/// Lets MoE-LoRA layers on the autodiff backend `B` route, and run their products, in one step
/// each (see [`routing_step_enabled`] and [`expert_step_enabled`]).
fn use_routing_step<B: kernels::routing::OneStepRouting + kernels::expert_step::OneStepExperts>() {
    if routing_step_enabled() {
        kernels::routing::register::<B>();
    }
    if expert_step_enabled() {
        kernels::expert_step::register::<B>();
    }
}

/// Whether the routing runs as CubeCL kernels on CUDA without fusion (one launch each for the
/// forward and the backward instead of ~15 tensor ops; the training step is bound by the host's
/// per-launch cost): on unless `QWEN3VL_ROUTING_KERNELS=0` (tensor ops, for comparisons).
pub fn routing_kernels_enabled() -> bool {
    env_on("QWEN3VL_ROUTING_KERNELS")
}

/// Whether the optimizer updates each parameter with one CubeCL kernel on CUDA without fusion
/// (instead of burn's ~14 tensor ops): on unless `QWEN3VL_ADAMW_KERNEL=0`.
pub fn adamw_kernel_enabled() -> bool {
    env_on("QWEN3VL_ADAMW_KERNEL")
}

/// Whether the gradient norm sums each gradient's squares with one CubeCL launch on CUDA
/// without fusion (instead of three tensor ops): on unless `QWEN3VL_GRAD_NORM_KERNEL=0`.
pub fn grad_norm_kernel_enabled() -> bool {
    env_on("QWEN3VL_GRAD_NORM_KERNEL")
}

/// Whether burn's kernel fusion is on for CUDA: off unless `QWEN3VL_FUSION=1`. Every GPU
/// number in tests/NOTES.md is without it; with it a fresh machine spent > 250 s compiling
/// before the demo's first step, and burn-cubecl-fusion 0.21's fused-matmul autotune panics.
pub fn fusion_enabled() -> bool {
    std::env::var("QWEN3VL_FUSION").is_ok_and(|v| v == "1")
}

/// Runs `job` on the device(s) `spec` names (see [`choose_devices`]): Flex on the CPU, CUDA
/// on GPUs, with burn's balanced gradient checkpointing when `checkpointing` is `ops`
/// (element-wise activations are recomputed in the backward pass instead of kept; layer
/// recomputation needs no backend of its own). Several CUDA devices train data-parallel
/// (builds with the `ddp` feature).
pub fn on_train_backend<J: TrainJob>(
    spec: &str,
    checkpointing: Checkpointing,
    job: J,
) -> Result<J::Out> {
    let fusion = fusion_enabled();
    let cuda = match choose_devices(spec)? {
        TrainOn::Cpu => return on_cpu(checkpointing, job),
        TrainOn::Cuda(list) => list,
    };
    let names: Vec<String> = cuda.iter().map(|i| format!("cuda:{i}")).collect();
    println!(
        "device: {}{}{}",
        names.join(", "),
        match checkpointing {
            Checkpointing::Off => String::new(),
            c => format!(" (gradient checkpointing: {})", c.name()),
        },
        if fusion { "" } else { " without fusion" }
    );
    let d: Vec<CudaDevice> = cuda.into_iter().map(CudaDevice::new).collect();
    let ops = checkpointing == Checkpointing::Ops;
    match (ops, fusion) {
        (true, true) => run_cuda::<Autodiff<Cuda, BalancedCheckpointing>, J>(job, d, true),
        (false, true) => run_cuda::<Autodiff<Cuda>, J>(job, d, true),
        (true, false) => run_cuda::<Autodiff<CudaUnfused, BalancedCheckpointing>, J>(job, d, false),
        (false, false) => run_cuda::<Autodiff<CudaUnfused>, J>(job, d, false),
    }
}

/// Training on Flex. Builds with the `ddp` feature have none: burn 0.21's `distributed`
/// feature requires every autodiff backend to be a distributed one, which Flex is not.
#[cfg(not(feature = "ddp"))]
fn on_cpu<J: TrainJob>(checkpointing: Checkpointing, job: J) -> Result<J::Out> {
    println!("device: cpu (flex)");
    match checkpointing {
        Checkpointing::Ops => {
            println!("note: gradient checkpointing \"ops\" is used on the GPU only")
        }
        Checkpointing::Layers => println!("gradient checkpointing: layers"),
        Checkpointing::Off => {}
    }
    use_routing_step::<Autodiff<Flex>>();
    job.run::<Autodiff<Flex>>(&TrainDevices::single(FlexDevice))
}

#[cfg(feature = "ddp")]
fn on_cpu<J: TrainJob>(_checkpointing: Checkpointing, _job: J) -> Result<J::Out> {
    Err(Error::Argument {
        arg: "--device".into(),
        message: "this build (feature `ddp`) trains on CUDA devices only: burn 0.21's \
                  distributed autodiff has no CPU backend; the default build trains on the CPU"
            .into(),
    })
}

/// Runs `job` on CUDA backend `B` over `devices`, with the NF4 kernels registered for it (see
/// [`nf4_kernels_enabled`]; `fusion`: whether `B` runs burn's fusion).
fn run_cuda<B, J: TrainJob>(job: J, devices: Vec<CudaDevice>, fusion: bool) -> Result<J::Out>
where
    B: AutodiffBackend<Device = CudaDevice> + Nf4Backend + MaybeDistributed,
    B: kernels::routing::OneStepRouting + kernels::expert_step::OneStepExperts,
    B: kernels::layer_steps::LayerStepsBackend,
    B::InnerBackend: Nf4Backend,
{
    use_nf4_kernels::<B>(fusion);
    use_routing_step::<B>();
    register_memory_probe(cuda_device_memory);
    if !fusion {
        use_layer_kernels();
        use_layer_steps::<B>();
        if routing_kernels_enabled() {
            kernels::routing::register_kernels::<cubecl::cuda::CudaRuntime, f32, i32, u8>();
        }
        if adamw_kernel_enabled() {
            kernels::adamw::register_kernel::<cubecl::cuda::CudaRuntime, f32, i32, u8>();
        }
        if grad_norm_kernel_enabled() {
            kernels::grad_norm::register_kernel::<cubecl::cuda::CudaRuntime, f32, i32, u8>();
        }
    }
    job.run::<B>(&B::train_devices(devices)?)
}

/// Backends that can train on several devices when the binary is built with `ddp`.
pub trait MaybeDistributed: AutodiffBackend {
    /// One device, or data-parallel replicas over several.
    fn train_devices(devices: Vec<Self::Device>) -> Result<TrainDevices<Self>>;
}

#[cfg(feature = "ddp")]
impl<B> MaybeDistributed for B
where
    B: AutodiffBackend + burn::tensor::backend::distributed::DistributedBackend,
{
    fn train_devices(devices: Vec<Self::Device>) -> Result<TrainDevices<Self>> {
        Ok(TrainDevices::data_parallel(devices))
    }
}

#[cfg(not(feature = "ddp"))]
impl<B: AutodiffBackend> MaybeDistributed for B {
    fn train_devices(mut devices: Vec<Self::Device>) -> Result<TrainDevices<Self>> {
        if devices.len() > 1 {
            return Err(Error::Argument {
                arg: "--devices".into(),
                message: format!(
                    "{} devices asked for, but this binary was built without data-parallel \
                     training: build it with `cargo build --release --features ddp`",
                    devices.len()
                ),
            });
        }
        Ok(TrainDevices::single(devices.remove(0)))
    }
}

/// Inference work on a backend chosen at run time.
pub trait InferJob {
    /// Runs on backend `B`; `dtype` is the default weight dtype for that device.
    fn run<B: Backend>(self, dtype: WeightDType, device: &B::Device) -> Result<()>;
}

/// Runs `job` on Flex (f32 by default) or CUDA (bf16 by default).
pub fn on_infer_backend<J: InferJob>(device: &str, job: J) -> Result<()> {
    match choose_device(device)? {
        DeviceChoice::Cpu => job.run::<Flex>(WeightDType::F32, &FlexDevice),
        DeviceChoice::Cuda(i) if fusion_enabled() => {
            use_nf4_kernels::<Autodiff<Cuda>>(true);
            job.run::<Cuda>(WeightDType::BF16, &CudaDevice::new(i))
        }
        DeviceChoice::Cuda(i) => {
            eprintln!("device: cuda:{i} without fusion");
            use_nf4_kernels::<Autodiff<CudaUnfused>>(false);
            use_layer_kernels();
            job.run::<CudaUnfused>(WeightDType::BF16, &CudaDevice::new(i))
        }
    }
}

/// The CUDA allocator's pools of the calling thread's stream on `device` (a [`CudaDevice`]);
/// None for other devices.
pub fn cuda_pool_memory(device: &dyn std::any::Any) -> Option<PoolMemory> {
    use cubecl::Runtime;
    let device = device.downcast_ref::<CudaDevice>()?;
    let usage = cubecl::cuda::CudaRuntime::client(device)
        .memory_usage()
        .ok()?;
    Some(PoolMemory {
        in_use: usage.bytes_in_use,
        reserved: usage.bytes_reserved,
    })
}

/// The CUDA allocator's reservation on `device` (a [`CudaDevice`]) and the device's total memory
/// (what `QWEN3VL_STEP_MEMORY=auto` compares); None for other devices.
pub fn cuda_device_memory(device: &dyn std::any::Any) -> Option<DeviceMemory> {
    let pools = cuda_pool_memory(device)?;
    let index = device.downcast_ref::<CudaDevice>()?.index;
    let dev = cudarc::driver::result::device::get(i32::try_from(index).ok()?).ok()?;
    // SAFETY: `dev` was returned by `device::get`.
    let total = unsafe { cudarc::driver::result::device::total_mem(dev) }.ok()?;
    Some(DeviceMemory {
        reserved: pools.reserved,
        total: total as u64,
    })
}

/// Where to run.
pub enum DeviceChoice {
    /// Flex on the CPU.
    Cpu,
    /// burn-cuda on device N.
    Cuda(usize),
}

/// Checks for a usable CUDA driver and NVRTC without touching burn-cuda (which panics).
fn cuda_devices() -> std::result::Result<usize, String> {
    // SAFETY: these only try to dlopen the libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err("libcuda.so not found".into());
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err("libnvrtc.so not found".into());
        }
    }
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let n = cudarc::driver::result::device::get_count().map_err(|e| format!("{e:?}"))?;
    if n <= 0 {
        return Err("no CUDA device".into());
    }
    Ok(n as usize)
}

/// Where a training run goes: the CPU, or one or more CUDA devices (several train data-parallel).
pub enum TrainOn {
    /// Flex on the CPU.
    Cpu,
    /// burn-cuda on these device indices (at least one, no repeats).
    Cuda(Vec<usize>),
}

/// The devices of a `--devices` list: `all` (every CUDA device), or comma-separated entries
/// each as [`choose_device`] reads them (`cuda:0,cuda:1`); a single entry may be anything
/// `--device` takes. Repeated devices, and the CPU in a list, are errors.
pub fn choose_devices(spec: &str) -> Result<TrainOn> {
    let bad = |m: String| Error::Argument {
        arg: "--devices".into(),
        message: m,
    };
    if spec == "all" {
        let n =
            cuda_devices().map_err(|why| bad(format!("`all`: CUDA is not usable here ({why})")))?;
        return Ok(TrainOn::Cuda((0..n).collect()));
    }
    let entries: Vec<&str> = spec.split(',').map(str::trim).collect();
    if entries.len() == 1 {
        return Ok(match choose_device(entries[0])? {
            DeviceChoice::Cpu => TrainOn::Cpu,
            DeviceChoice::Cuda(i) => TrainOn::Cuda(vec![i]),
        });
    }
    let mut seen = Vec::new();
    for e in entries {
        let i = match choose_device(e).map_err(|err| bad(format!("`{e}` in `{spec}`: {err}")))? {
            DeviceChoice::Cuda(i) => i,
            DeviceChoice::Cpu => {
                return Err(bad(format!(
                    "`{spec}`: data-parallel training runs on CUDA devices only"
                )))
            }
        };
        if seen.contains(&i) {
            return Err(bad(format!("`{spec}`: cuda:{i} is listed twice")));
        }
        seen.push(i);
    }
    Ok(TrainOn::Cuda(seen))
}

/// The device `--device` names: `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn choose_device(arg: &str) -> Result<DeviceChoice> {
    let bad = |m: String| Error::Argument {
        arg: "--device".into(),
        message: m,
    };
    match arg {
        "cpu" => Ok(DeviceChoice::Cpu),
        "auto" => Ok(match cuda_devices() {
            Ok(_) => DeviceChoice::Cuda(0),
            Err(why) => {
                eprintln!("no usable GPU ({why}); running on the CPU");
                DeviceChoice::Cpu
            }
        }),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index = match s.strip_prefix("cuda:") {
                Some(i) => i
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{s}`: expected cuda:N with N a number")))?,
                None => 0,
            };
            let n = cuda_devices()
                .map_err(|why| bad(format!("`{s}`: CUDA is not usable here ({why})")))?;
            if index >= n {
                return Err(bad(format!("`{s}`: this machine has {n} CUDA device(s)")));
            }
            Ok(DeviceChoice::Cuda(index))
        }
        other => Err(bad(format!(
            "expected auto, cpu, cuda or cuda:N, found `{other}`"
        ))),
    }
}
