//! Putting the NF4 base into the model: every targetable linear layer (text q/k/v/o/gate/up/
//! down, vision qkv/proj/fc1/fc2, mergers) becomes an [`Nf4Linear`]; embeddings, `lm_head` and
//! norms stay dense, as bitsandbytes leaves them.
//!
//! From a checkpoint, shards are read one at a time: a bitsandbytes 4-bit weight is taken as it
//! is, a dense one is quantized as it is read, so the full-precision model never exists in
//! memory (host: one shard mapped plus one tensor in f32; device: the packed weights).

use std::collections::BTreeSet;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, Distribution};

use super::convert::{dtype_name, is_4bit_checkpoint};
use super::linear::Nf4Linear;
use super::tensor::{Nf4Tensor, STATE_SUFFIX};
use crate::adapter::inject::sites;
use crate::adapter::{BaseLinear, Projection};
use crate::checkpoint::load::{init_std, randomize};
use crate::checkpoint::save::to_host_f32;
use crate::checkpoint::tensor_file::{decode_f32, parse_safetensors};
use crate::checkpoint::{load_weights, CheckpointFiles, HostTensor, WeightDType};
use crate::error::{Error, Result};
use crate::model::config::{config_file, Qwen3VlConfig};
use crate::model::Qwen3VlModel;

/// How the base is quantized.
#[derive(Debug, Clone, Copy)]
pub struct Nf4Options {
    /// Values per block (64).
    pub blocksize: usize,
    /// Double-quantize the block scales.
    pub double_quant: bool,
    /// Dtype of the dequantized weights and of the products.
    pub compute: DType,
}

impl Nf4Options {
    /// bitsandbytes' defaults as the reference used them: blocks of 64, double quant, the
    /// products in `compute`.
    pub fn standard(compute: DType) -> Self {
        Self {
            blocksize: 64,
            double_quant: true,
            compute,
        }
    }
}

/// Loads the checkpoint in `dir` as a base: with an NF4 base when `nf4` is given or when the
/// checkpoint is a bitsandbytes 4-bit one (which can only load as NF4; standard options), else
/// dense in `dtype`. The weights get their own device allocations ([`weights_on_device`]).
pub fn load_base_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: WeightDType,
    nf4: Option<Nf4Options>,
) -> Result<(Qwen3VlConfig, Qwen3VlModel<B>)> {
    let nf4 = nf4.or_else(|| is_4bit_checkpoint(dir).then(|| Nf4Options::standard(dtype.dtype())));
    weights_on_device::<B, _>(device, || match &nf4 {
        Some(o) => load_model_nf4::<B>(dir, device, dtype, o),
        None => crate::checkpoint::load_model::<B>(dir, device, dtype),
    })
}

/// Loads the checkpoint in `dir` with an NF4 base (`dtype`: the dense tensors' dtype).
pub fn load_model_nf4<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: WeightDType,
    opts: &Nf4Options,
) -> Result<(Qwen3VlConfig, Qwen3VlModel<B>)> {
    let cfg = Qwen3VlConfig::from_path(&config_file(dir))?;
    let files = CheckpointFiles::find(dir)?;
    let mut model = Qwen3VlModel::init(&cfg, device);
    let mut done = BTreeSet::new();
    for shard in &files.shards {
        let file = std::fs::File::open(shard).map_err(|e| Error::io(shard, e))?;
        // SAFETY: read-only mapping of a file we do not modify (see checkpoint::load).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(shard, e))?;
        let st = parse_safetensors(shard, &mmap)?;
        let location = shard.display().to_string();
        for site in sites(&mut model) {
            let name = format!("{}.weight", site.name);
            if done.contains(&site.name) || st.tensor(&name).is_err() {
                continue;
            }
            let has_bias = site.proj.base().dense().is_some_and(|l| l.bias.is_some());
            let (d_in, d_out) = (site.proj.base().d_in(), site.proj.base().d_out());
            let weight = if st.tensor(&format!("{name}.{STATE_SUFFIX}")).is_ok() {
                Nf4Tensor::from_safetensors(&st, &name, &location)?
            } else {
                let view = st.tensor(&name).expect("checked");
                let values = decode_f32(&name, &location, &view)?;
                Nf4Tensor::quantize(
                    &values,
                    view.shape(),
                    dtype_name(view.dtype()),
                    opts.blocksize,
                    opts.double_quant,
                )?
            };
            if weight.shape != [d_out, d_in] {
                return Err(Error::ShapeMismatch {
                    name,
                    location,
                    expected: vec![d_out, d_in],
                    found: weight.shape.clone(),
                });
            }
            let bias = if has_bias {
                let bname = format!("{}.bias", site.name);
                let view = st.tensor(&bname).map_err(|_| Error::MissingTensor {
                    name: bname.clone(),
                    location: format!("{location} (the shard holding {name})"),
                })?;
                Some(decode_f32(&bname, &location, &view)?)
            } else {
                None
            };
            let layer = Nf4Linear::new(&weight, bias.as_deref(), opts.compute, device)
                .map_err(|e| Error::Input(format!("tensor `{name}` in {location}: {e}")))?;
            *site.proj = Projection::Plain(BaseLinear::Nf4(layer));
            done.insert(site.name);
        }
    }
    if let Some(site) = sites(&mut model)
        .into_iter()
        .find(|s| !done.contains(&s.name))
    {
        return Err(Error::MissingTensor {
            name: format!("{}.weight", site.name),
            location: files.dir.display().to_string(),
        });
    }
    let model = load_weights(model, &cfg, &files, device, dtype)?;
    Ok((cfg, model))
}

/// A model with random weights (as [`random_model`](crate::checkpoint::load::random_model))
/// and, with `nf4`, an NF4 base: each targetable layer's random weight is made, quantized and
/// dropped on its own, so the full-precision base never exists on the device (peak: one f32
/// weight beside the packed ones).
/// Returns the model and how many layers are NF4.
pub fn random_model_nf4<B: Backend>(
    cfg: &Qwen3VlConfig,
    device: &B::Device,
    dtype: WeightDType,
    nf4: Option<&Nf4Options>,
) -> Result<(Qwen3VlModel<B>, usize)> {
    weights_on_device::<B, _>(device, || {
        let mut model = Qwen3VlModel::init(cfg, device);
        let n = match nf4 {
            Some(opts) => quantize_sites(&mut model, opts, |name, l| {
                let std = init_std(cfg, name);
                to_host_f32(Tensor::<B, 2>::random(
                    l.weight.lazy_shape(),
                    Distribution::Normal(0.0, std),
                    device,
                ))
            })?,
            None => 0,
        };
        Ok((randomize(model, cfg, device, dtype), n))
    })
}

/// Runs `build` (loading or creating model weights) with the device allocator in persistent
/// mode, then frees what building left unused. The dense loaders also give each weight a scope
/// of its own ([`own_allocation`](crate::checkpoint::load::own_allocation)), since a lazy
/// parameter's initialisation ends this one early. The weights then sit in allocations of their own
/// size instead of pages of the pools that activations reuse — on CUDA those pages are sized from
/// the card's memory (an H200 puts every 69 MB–550 MB tensor in a 2.2 GB page), so a model
/// built into them keeps gigabytes reserved for the whole run. No effect on the CPU.
pub fn weights_on_device<B: Backend, T: Send>(
    device: &B::Device,
    build: impl Fn() -> Result<T> + Send + Sync,
) -> Result<T> {
    let built = B::memory_persistent_allocations(device, (), |()| {
        let built = build();
        // Fusion backends run queued work here, inside the persistent scope.
        let _ = B::sync(device);
        built
    });
    B::memory_cleanup(device);
    built
}

/// Replaces every dense targetable layer by an [`Nf4Linear`] of the f32 values `weight`
/// gives for it (HF name, layer); its bias is kept. Returns how many layers were converted.
fn quantize_sites<B: Backend>(
    model: &mut Qwen3VlModel<B>,
    opts: &Nf4Options,
    mut weight: impl FnMut(&str, &crate::model::layers::Linear<B>) -> HostTensor,
) -> Result<usize> {
    let mut n = 0;
    for site in sites(model) {
        let Projection::Plain(BaseLinear::Dense(l)) = &*site.proj else {
            continue;
        };
        let device = l.weight.lazy_device();
        let HostTensor::F32(values, shape) = weight(&site.name, l) else {
            unreachable!("to_host_f32 gives f32")
        };
        let bias = l.bias.as_ref().map(|b| match to_host_f32(b.val()) {
            HostTensor::F32(v, _) => v,
            HostTensor::I64(..) => unreachable!("to_host_f32 gives f32"),
        });
        let q = Nf4Tensor::quantize(
            &values,
            &shape,
            "float32",
            opts.blocksize,
            opts.double_quant,
        )?;
        let layer = Nf4Linear::new(&q, bias.as_deref(), opts.compute, &device)
            .map_err(|e| Error::Input(format!("{}: {e}", site.name)))?;
        *site.proj = Projection::Plain(BaseLinear::Nf4(layer));
        n += 1;
    }
    Ok(n)
}

/// Bytes of the model's weights on the device: NF4 layers packed, the rest at `dense_bytes`
/// per value (2 for f16/bf16).
pub fn device_bytes<B: Backend>(model: &mut Qwen3VlModel<B>, dense_bytes: usize) -> usize {
    let mut nf4 = 0;
    for site in sites(model) {
        if let BaseLinear::Nf4(l) = site.proj.base() {
            nf4 += l.device_bytes();
        }
    }
    nf4 + dense_bytes * crate::model::params::count_params(&*model)
}
