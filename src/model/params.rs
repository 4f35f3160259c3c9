//! Parameter counts by component, computed by walking the modules (no allocation: lazy
//! parameters report their shape without being initialised).

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

use super::qwen3_vl::Qwen3VlModel;

struct Counter(usize);

impl<B: Backend> ModuleVisitor<B> for Counter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0 += param.lazy_shape().num_elements();
    }
}

/// Number of float parameters in `module` (each tensor counted once).
pub fn count_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    let mut c = Counter(0);
    module.visit(&mut c);
    c.0
}

struct TrainableCounter(usize);

impl<B: Backend> ModuleVisitor<B> for TrainableCounter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.val().is_require_grad() {
            self.0 += param.lazy_shape().num_elements();
        }
    }
}

/// Number of float parameters of `module` that require a gradient (0 off autodiff backends).
pub fn count_trainable<B: Backend, M: Module<B>>(module: &M) -> usize {
    let mut c = TrainableCounter(0);
    module.visit(&mut c);
    c.0
}

/// Parameter counts of the model's parts.
#[derive(Debug, Clone)]
pub struct ParamBreakdown {
    /// (component, count) rows for the text decoder.
    pub text: Vec<(String, usize)>,
    /// (component, count) rows for the vision tower.
    pub vision: Vec<(String, usize)>,
}

impl ParamBreakdown {
    /// Text decoder total.
    pub fn text_total(&self) -> usize {
        self.text.iter().map(|r| r.1).sum()
    }

    /// Vision tower total.
    pub fn vision_total(&self) -> usize {
        self.vision.iter().map(|r| r.1).sum()
    }

    /// Unique parameters of the whole model (a tied LM head is not counted twice).
    pub fn total(&self) -> usize {
        self.text_total() + self.vision_total()
    }
}

/// Counts the parameters of every component of `model`.
pub fn param_breakdown<B: Backend>(model: &Qwen3VlModel<B>) -> ParamBreakdown {
    let lm = &model.language_model;
    let vis = &model.visual;
    let layers = lm.layers.len();
    let text = vec![
        ("embed_tokens".to_string(), count_params(&lm.embed_tokens)),
        (
            format!(
                "decoder layers ({layers} x {})",
                group(lm.layers.first().map_or(0, count_params))
            ),
            count_params(&lm.layers),
        ),
        ("final norm".to_string(), count_params(&lm.norm)),
        (
            match model.lm_head {
                Some(_) => "lm_head".to_string(),
                None => "lm_head (tied to embed_tokens)".to_string(),
            },
            model.lm_head.as_ref().map_or(0, count_params),
        ),
    ];
    let blocks = vis.blocks.len();
    let taps = vis.deepstack_merger_list.len();
    let vision = vec![
        ("patch_embed".to_string(), count_params(&vis.patch_embed)),
        ("pos_embed".to_string(), count_params(&vis.pos_embed)),
        (
            format!(
                "blocks ({blocks} x {})",
                group(vis.blocks.first().map_or(0, count_params))
            ),
            count_params(&vis.blocks),
        ),
        ("merger".to_string(), count_params(&vis.merger)),
        (
            format!("deepstack mergers ({taps})"),
            count_params(&vis.deepstack_merger_list),
        ),
    ];
    ParamBreakdown { text, vision }
}

/// `4437815808` -> `4,437,815,808`.
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Qwen3VlConfig;
    use std::path::Path;

    fn breakdown(name: &str) -> ParamBreakdown {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("model/configs")
            .join(name);
        let cfg = Qwen3VlConfig::from_path(&p).unwrap();
        let model = Qwen3VlModel::<burn::backend::Flex>::init(&cfg, &Default::default());
        param_breakdown(&model)
    }

    #[test]
    fn family_counts_match_the_published_totals() {
        let b4 = breakdown("qwen3-vl-4b-instruct.json");
        assert_eq!(b4.text_total(), 4_022_468_096);
        assert_eq!(b4.vision_total(), 415_347_712);
        assert_eq!(b4.total(), 4_437_815_808);
        assert_eq!(
            breakdown("qwen3-vl-2b-instruct.json").total(),
            2_127_532_032
        );
        assert_eq!(
            breakdown("qwen3-vl-8b-instruct.json").total(),
            8_767_123_696
        );
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(4_437_815_808), "4,437,815,808");
    }
}
