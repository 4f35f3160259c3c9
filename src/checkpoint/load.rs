//! Streams HF safetensors weights into a lazily built [`Qwen3VlModel`], shard by shard.
//!
//! Each shard is memory-mapped and every parameter whose HF name it holds is converted and
//! uploaded on its own, so peak host memory stays near one tensor plus the page cache of one
//! shard. Parameter paths map to HF names by prefixing `model.` (our field names follow HF's).

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use safetensors::SafeTensors;

use super::shards::CheckpointFiles;
use super::tensor_file::{decode_f32, parse_safetensors};
use crate::error::{Error, Result};
use crate::model::config::config_file;
use crate::model::layers::INIT_STD as LAYER_INIT_STD;
use crate::model::{Qwen3VlConfig, Qwen3VlModel};

/// Float format of the weights (and activations) on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl WeightDType {
    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(Error::Argument {
                arg: "--dtype".into(),
                message: format!("expected f32, f16 or bf16, found `{other}`"),
            }),
        }
    }

    /// The burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }
}

/// HF state-dict name of a parameter path such as `visual.blocks.0.attn.qkv.weight`.
pub fn hf_name(path: &str) -> String {
    if path.starts_with("lm_head.") {
        path.to_string()
    } else {
        format!("model.{path}")
    }
}

/// Reads `config.json` and the weights of the checkpoint folder `dir` onto `device`.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: WeightDType,
) -> Result<(Qwen3VlConfig, Qwen3VlModel<B>)> {
    let cfg = Qwen3VlConfig::from_path(&config_file(dir))?;
    let files = CheckpointFiles::find(dir)?;
    let model = load_weights(
        Qwen3VlModel::init(&cfg, device),
        &cfg,
        &files,
        device,
        dtype,
    )?;
    Ok((cfg, model))
}

/// Materialises a randomly initialised model in `dtype`, as HF initialises one: weight
/// matrices and embeddings normal with the config's `initializer_range` (text and vision
/// towers separately), biases zero, norms one.
pub fn random_model<B: Backend>(
    cfg: &Qwen3VlConfig,
    device: &B::Device,
    dtype: WeightDType,
) -> Qwen3VlModel<B> {
    randomize(Qwen3VlModel::init(cfg, device), cfg, device, dtype)
}

/// The std HF initialises the weight matrix or embedding named `hf_name` with: the vision or
/// the text config's `initializer_range`.
pub fn init_std(cfg: &Qwen3VlConfig, hf_name: &str) -> f64 {
    if hf_name.starts_with("model.visual.") {
        cfg.vision_config.initializer_range
    } else {
        cfg.text_config.initializer_range
    }
}

/// Materialises the float parameters of a lazily built `model` as [`random_model`] does
/// (parameters already replaced, e.g. by NF4 layers, are left alone: they are constants).
pub fn randomize<B: Backend>(
    model: Qwen3VlModel<B>,
    cfg: &Qwen3VlConfig,
    device: &B::Device,
    dtype: WeightDType,
) -> Qwen3VlModel<B> {
    struct Init<'a, B: Backend> {
        dtype: DType,
        cfg: &'a Qwen3VlConfig,
        path: ModulePath,
        device: B::Device,
    }
    impl<B: Backend> ModuleMapper<B> for Init<'_, B> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.path.exit(container);
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let std = init_std(self.cfg, &self.path.hf_name());
            let dt = self.dtype;
            // Each weight is allocated in a persistent-allocation scope of its own (see
            // `own_allocation`); a lazy parameter is initialised first, in burn's own scope.
            if D < 2 || std == LAYER_INIT_STD {
                let _ = param.val();
                return own_allocation::<B, _, _>(&self.device, param, move |p| {
                    p.map(move |t| t.cast(dt))
                });
            }
            let shape = param.lazy_shape();
            let device = self.device.clone();
            let t = own_allocation::<B, _, _>(&self.device, (), move |()| {
                Tensor::<B, D>::random(shape.clone(), Distribution::Normal(0.0, std), &device)
                    .cast(dt)
            });
            Param::initialized(param.id, t.require_grad())
        }
    }
    model.map(&mut Init::<B> {
        dtype: dtype.dtype(),
        cfg,
        path: ModulePath::default(),
        device: device.clone(),
    })
}

/// Runs `make` (one weight's device allocation) in a persistent-allocation scope of its own: on
/// CUDA the weight gets an allocation of its size instead of a slice of a pool page sized from
/// the card. A scope around the whole model build is not enough: burn's lazy parameter
/// initialisation opens a scope of its own, and CubeCL's scope is not re-entrant (its end
/// switches the allocator back to pools; an H200 then put the 778 MB embedding alone in a
/// 9.4 GB page). No effect on the CPU.
pub fn own_allocation<B: Backend, I: Send, O: Send>(
    device: &B::Device,
    input: I,
    make: impl Fn(I) -> O + Send,
) -> O {
    B::memory_persistent_allocations(device, input, make)
}

/// Fills every parameter of `model` from the shards of `files`; errors name the tensor.
pub fn load_weights<B: Backend>(
    model: Qwen3VlModel<B>,
    cfg: &Qwen3VlConfig,
    files: &CheckpointFiles,
    device: &B::Device,
    dtype: WeightDType,
) -> Result<Qwen3VlModel<B>> {
    let v = &cfg.vision_config;
    let patch_shape = vec![
        v.hidden_size,
        v.in_channels,
        v.temporal_patch_size,
        v.patch_size,
        v.patch_size,
    ];
    let mut loaded = BTreeSet::new();
    let mut model = model;
    for shard in &files.shards {
        let file = std::fs::File::open(shard).map_err(|e| Error::io(shard, e))?;
        // SAFETY: the file is only read while mapped; a concurrent writer would be a user error
        // that at worst yields wrong weights, which the shape checks partly catch.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(shard, e))?;
        let st = parse_safetensors(shard, &mmap)?;
        let mut mapper = ShardLoader::<B> {
            shard: &st,
            location: shard.display().to_string(),
            device: device.clone(),
            dtype: dtype.dtype(),
            path: ModulePath::default(),
            loaded: &mut loaded,
            error: None,
            patch_shape: &patch_shape,
        };
        model = model.map(&mut mapper);
        if let Some(e) = mapper.error {
            return Err(e);
        }
    }
    let mut names = NameCollector::default();
    model.visit(&mut names);
    if let Some(missing) = names.names.iter().find(|n| !loaded.contains(*n)) {
        let count = names.names.iter().filter(|n| !loaded.contains(*n)).count();
        let location = match files.shards.as_slice() {
            [one] => one.display().to_string(),
            many => format!("the {} shards in {}", many.len(), files.dir.display()),
        };
        return Err(Error::MissingTensor {
            name: missing.clone(),
            location: if count > 1 {
                format!("{location} ({count} of the model's tensors are missing)")
            } else {
                location
            },
        });
    }
    Ok(model)
}

/// Replaces each parameter found in one shard by the converted checkpoint tensor.
struct ShardLoader<'a, B: Backend> {
    shard: &'a SafeTensors<'a>,
    location: String,
    device: B::Device,
    dtype: DType,
    path: ModulePath,
    loaded: &'a mut BTreeSet<String>,
    error: Option<Error>,
    patch_shape: &'a [usize],
}

impl<B: Backend> ShardLoader<'_, B> {
    fn tensor<const D: usize>(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<Tensor<B, D>>> {
        let Ok(view) = self.shard.tensor(name) else {
            return Ok(None);
        };
        let found = view.shape().to_vec();
        let file_shape: &[usize] = if name == "model.visual.patch_embed.proj.weight" {
            self.patch_shape // the conv weight [D, C, T, P, P], flattened to [D, C·T·P·P]
        } else {
            expected
        };
        if found != file_shape {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                location: self.location.clone(),
                expected: file_shape.to_vec(),
                found,
            });
        }
        let values = decode_f32(name, &self.location, &view)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "tensor `{name}` in {}: element {i} is {} (corrupt checkpoint?)",
                self.location, values[i]
            )));
        }
        let data = TensorData::new(values, expected.to_vec()).convert_dtype(self.dtype);
        let dtype = self.dtype;
        Ok(Some(own_allocation::<B, _, _>(
            &self.device,
            data,
            |data| Tensor::from_data(data, (&self.device, dtype)),
        )))
    }
}

/// The module path while burn walks a model; enum variants (`Projection::Plain`...) are not
/// part of HF names and are left out.
#[derive(Default)]
pub(crate) struct ModulePath(Vec<String>);

impl ModulePath {
    pub(crate) fn enter(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.0.push(name.to_string());
        }
    }

    pub(crate) fn exit(&mut self, container: &str) {
        if !container.starts_with("Enum:") {
            self.0.pop();
        }
    }

    pub(crate) fn hf_name(&self) -> String {
        hf_name(&self.0.join("."))
    }
}

impl<B: Backend> ModuleMapper<B> for ShardLoader<'_, B> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }

    fn exit_module(&mut self, _name: &str, container: &str) {
        self.path.exit(container);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let name = self.path.hf_name();
        let expected = param.lazy_shape().dims::<D>().to_vec();
        match self.tensor::<D>(&name, &expected) {
            Ok(Some(t)) => {
                self.loaded.insert(name);
                // Loaded weights are trainable like freshly initialised ones; adapters freeze them.
                Param::initialized(param.id, t.require_grad())
            }
            Ok(None) => param,
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

/// Collects the HF names of all float parameters.
#[derive(Default)]
struct NameCollector {
    path: ModulePath,
    names: Vec<String>,
}

impl<B: Backend> ModuleVisitor<B> for NameCollector {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }

    fn exit_module(&mut self, _name: &str, container: &str) {
        self.path.exit(container);
    }

    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<B, D>>) {
        self.names.push(self.path.hf_name());
    }
}

/// HF names of every parameter of `model`, in module order.
pub fn parameter_names<B: Backend>(model: &Qwen3VlModel<B>) -> Vec<String> {
    let mut names = NameCollector::default();
    model.visit(&mut names);
    names.names
}
