//! Writing a whole model back as an HF checkpoint folder (`config.json` + `model.safetensors`),
//! and giving parameters ids derived from their names (so optimizer state survives a restart).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::DType;

use super::load::ModulePath;
use super::tensor_file::{write_atomically, write_tensors, HostTensor};
use crate::error::{Error, Result};
use crate::model::config::Qwen3VlConfig;
use crate::model::Qwen3VlModel;

/// Collects every float parameter as an f32 host tensor under its HF name (the patch
/// embedding, a linear layer here, gets back its Conv3d shape).
struct Collect {
    path: ModulePath,
    tensors: BTreeMap<String, HostTensor>,
    patch_shape: Vec<usize>,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }

    fn exit_module(&mut self, _name: &str, container: &str) {
        self.path.exit(container);
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = self.path.hf_name();
        let mut host = to_host_f32(param.val());
        if name.ends_with("patch_embed.proj.weight") {
            if let HostTensor::F32(_, shape) = &mut host {
                shape.clone_from(&self.patch_shape);
            }
        }
        self.tensors.insert(name, host);
    }
}

/// A tensor's values as an f32 host tensor (any float dtype on the device).
pub fn to_host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let values = t
        .cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data");
    HostTensor::F32(values, shape)
}

/// Writes `model`'s weights (f32) and `config_json` to `dir` in HF layout; loadable by
/// `load_model` and by transformers.
pub fn save_model<B: Backend>(
    model: &Qwen3VlModel<B>,
    config_json: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = Qwen3VlConfig::from_json(config_json, &dir.join("config.json"))?;
    let v = &cfg.vision_config;
    let mut c = Collect {
        path: ModulePath::default(),
        tensors: BTreeMap::new(),
        patch_shape: vec![
            v.hidden_size,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    };
    model.visit(&mut c);
    write_tensors(&dir.join("model.safetensors"), &c.tensors)?;
    write_atomically(&dir.join("config.json"), config_json.as_bytes())
}

/// FNV-1a of a name: the parameter's stable id.
fn name_id(name: &str) -> ParamId {
    ParamId::from(name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }))
}

struct StableIds {
    path: ModulePath,
    only: fn(&str) -> bool,
}

impl<B: Backend> ModuleMapper<B> for StableIds {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }

    fn exit_module(&mut self, _name: &str, container: &str) {
        self.path.exit(container);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.hf_name();
        if !(self.only)(&name) {
            return param;
        }
        Param::initialized(name_id(&name), param.val())
    }
}

/// Gives the parameters whose HF name passes `only` an id derived from that name (burn's ids
/// are random per process; optimizer state is keyed by them).
pub fn stable_param_ids<B: Backend, M: Module<B>>(module: M, only: fn(&str) -> bool) -> M {
    module.map(&mut StableIds {
        path: ModulePath::default(),
        only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::load::{load_model, random_model, WeightDType};

    type B = burn::backend::Flex;

    #[test]
    fn saved_model_loads_back_identically_and_ids_are_stable() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/tiny-qwen3-vl/config.json");
        let text = std::fs::read_to_string(&fixture).unwrap();
        let cfg = Qwen3VlConfig::from_path(&fixture).unwrap();
        let dev = Default::default();
        let model = random_model::<B>(&cfg, &dev, WeightDType::F32);
        let dir = tempfile::tempdir().unwrap();
        save_model(&model, &text, dir.path()).unwrap();
        let (_, back) = load_model::<B>(dir.path(), &dev, WeightDType::F32).unwrap();
        let w = |m: &Qwen3VlModel<B>| m.language_model.embed_tokens.weight.val().into_data();
        w(&model).assert_eq(&w(&back), true);
        let p = |m: &Qwen3VlModel<B>| m.visual.patch_embed.proj.weight.val().into_data();
        p(&model).assert_eq(&p(&back), true);
        let ids = |m: Qwen3VlModel<B>| {
            let m = stable_param_ids(m, |_| true);
            m.language_model.embed_tokens.weight.id
        };
        assert_eq!(ids(model), ids(back));
    }
}
