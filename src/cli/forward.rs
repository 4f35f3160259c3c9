//! `forward`: runs the model on inputs from a safetensors file and writes the logits, the
//! position ids and (optionally) every intermediate, for checking a port against Python.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;

use crate::adapter::peft::load_adapter;
use crate::checkpoint::{HostTensor, TensorFile, WeightDType};
use crate::error::{Error, Result};
use crate::model::config::config_file;
use crate::model::{ModelInputs, ModelOutput, Qwen3VlConfig, Qwen3VlModel};
use crate::quant::load::{load_base_model, random_model_nf4, Nf4Options};

/// Options of the `forward` command.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// Checkpoint folder (or a config.json with `random_init`).
    pub model: PathBuf,
    /// Input tensors.
    pub inputs: PathBuf,
    /// Output file.
    pub out: PathBuf,
    /// Weight and activation dtype.
    pub dtype: WeightDType,
    /// Random weights instead of a checkpoint (benchmarks).
    pub random_init: bool,
    /// Adapter folder (peft LoRA or ours) applied on top of the base.
    pub adapter: Option<PathBuf>,
    /// NF4 base: quantize while loading (a bitsandbytes 4-bit checkpoint is always NF4).
    pub nf4: bool,
    /// Also write vision outputs and every layer's hidden state.
    pub all: bool,
    /// Timed repetitions after one warm-up run (0 = a single untimed-warm-up run).
    pub repeat: usize,
}

/// Timings of a `forward` run, in seconds.
#[derive(Debug, Clone)]
pub struct ForwardReport {
    /// Loading or initialising the model.
    pub load_s: f64,
    /// First forward (includes kernel compilation on GPU).
    pub first_s: f64,
    /// Median of the timed repetitions, if any.
    pub median_s: Option<f64>,
    /// All timed repetitions.
    pub runs_s: Vec<f64>,
}

/// Reads the model inputs of `path` onto `device`.
pub fn read_inputs<B: Backend>(path: &Path, device: &B::Device) -> Result<ModelInputs<B>> {
    let f = TensorFile::read(path)?;
    let (input_ids, shape) = f.i64("input_ids", 2)?;
    let (batch, len) = (shape[0], shape[1]);
    let attention_mask = if f.contains("attention_mask") {
        let (m, s) = f.i64("attention_mask", 2)?;
        if s != shape {
            return Err(Error::Input(format!(
                "{}: attention_mask has shape {s:?}, input_ids {shape:?}",
                f.location
            )));
        }
        Some(m)
    } else {
        None
    };
    let (pixel_values, image_grid_thw) =
        match (f.contains("pixel_values"), f.contains("image_grid_thw")) {
            (false, false) => (None, Vec::new()),
            (true, true) => {
                let (pv, ps) = f.f32("pixel_values", 2)?;
                let (g, gs) = f.i64("image_grid_thw", 2)?;
                if gs[1] != 3 || g.iter().any(|&v| v <= 0) {
                    return Err(Error::Input(format!(
                    "{}: image_grid_thw must be [images, 3] of positive (t, h, w), found shape \
                     {gs:?} values {g:?}",
                    f.location
                )));
                }
                let grids = g
                    .chunks(3)
                    .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
                    .collect();
                let pv = Tensor::<B, 2>::from_data(
                    TensorData::new(pv, [ps[0], ps[1]]),
                    (device, DType::F32),
                );
                (Some(pv), grids)
            }
            (has_pv, _) => {
                return Err(Error::Input(format!(
                    "{}: {} is present without {}",
                    f.location,
                    if has_pv {
                        "pixel_values"
                    } else {
                        "image_grid_thw"
                    },
                    if has_pv {
                        "image_grid_thw"
                    } else {
                        "pixel_values"
                    }
                )))
            }
        };
    Ok(ModelInputs {
        input_ids,
        batch,
        len,
        attention_mask,
        pixel_values,
        image_grid_thw,
        image_features: None,
    })
}

fn host_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> HostTensor {
    let t = t.clone().cast(DType::F32);
    let shape = t.dims().to_vec();
    let data = t.into_data().convert::<f32>();
    HostTensor::F32(data.to_vec::<f32>().expect("f32 data"), shape)
}

/// The tensors `forward` writes: logits, position_ids, rope_deltas and, with `all`, the
/// intermediates under the names of the reference fixture.
pub fn output_tensors<B: Backend>(out: &ModelOutput<B>, all: bool) -> BTreeMap<String, HostTensor> {
    let mut m = BTreeMap::new();
    let p = &out.position_ids;
    m.insert("logits".to_string(), host_f32(&out.logits));
    m.insert(
        "position_ids".to_string(),
        HostTensor::I64(p.data.clone(), vec![3, p.batch, p.len]),
    );
    m.insert(
        "rope_deltas".to_string(),
        HostTensor::I64(p.deltas.clone(), vec![p.batch, 1]),
    );
    if all {
        if let Some(v) = &out.vision {
            m.insert("vision_last_hidden".into(), host_f32(&v.last_hidden));
            m.insert("vision_merged".into(), host_f32(&v.merged));
            for (i, f) in v.deepstack.iter().enumerate() {
                m.insert(format!("deepstack_{i}"), host_f32(f));
            }
        }
        m.insert("hidden_states_0".into(), host_f32(&out.inputs_embeds));
        for (i, h) in out.layer_outputs.iter().enumerate() {
            m.insert(format!("hidden_states_{}", i + 1), host_f32(h));
        }
        let n = out.layer_outputs.len() + 1;
        m.insert(format!("hidden_states_{n}"), host_f32(&out.last_hidden));
    }
    m
}

/// Loads (or randomly initialises) the model for `forward`.
pub fn prepare_model<B: Backend>(
    opts: &ForwardOptions,
    device: &B::Device,
) -> Result<(Qwen3VlConfig, Qwen3VlModel<B>)> {
    let nf4 = opts.nf4.then(|| Nf4Options::standard(opts.dtype.dtype()));
    let (cfg, model) = if opts.random_init {
        let cfg = Qwen3VlConfig::from_path(&config_file(&opts.model))?;
        let (model, _) = random_model_nf4(&cfg, device, opts.dtype, nf4.as_ref())?;
        (cfg, model)
    } else {
        load_base_model(&opts.model, device, opts.dtype, nf4)?
    };
    match &opts.adapter {
        Some(dir) => Ok((cfg, load_adapter(model, dir)?.0)),
        None => Ok((cfg, model)),
    }
}

/// Runs `forward` end to end on `device` and writes `opts.out`.
pub fn run_forward<B: Backend>(opts: &ForwardOptions, device: &B::Device) -> Result<ForwardReport> {
    let t0 = Instant::now();
    let (_cfg, model) = prepare_model::<B>(opts, device)?;
    let inputs = read_inputs::<B>(&opts.inputs, device)?;
    // Loaded and random weights are already materialised (random_model casts each one); wait
    // for the device to finish creating them so the load time is not billed to the forward.
    B::sync(device).map_err(|e| Error::Input(format!("device sync failed: {e:?}")))?;
    let load_s = t0.elapsed().as_secs_f64();

    let timed = |model: &Qwen3VlModel<B>| -> Result<(ModelOutput<B>, f64)> {
        let t = Instant::now();
        let out = model.forward(&inputs, opts.all)?;
        // Reading one value waits for the whole forward to finish on the device.
        let _ = out.logits.clone().slice([0..1, 0..1, 0..1]).into_data();
        Ok((out, t.elapsed().as_secs_f64()))
    };
    let (mut out, first_s) = timed(&model)?;
    let mut runs_s = Vec::with_capacity(opts.repeat);
    for _ in 0..opts.repeat {
        let (o, s) = timed(&model)?;
        out = o;
        runs_s.push(s);
    }
    let median_s = median(&runs_s);
    crate::checkpoint::tensor_file::write_tensors(&opts.out, &output_tensors(&out, opts.all))?;
    Ok(ForwardReport {
        load_s,
        first_s,
        median_s,
        runs_s,
    })
}

/// Median of `v` (None when empty).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    })
}
