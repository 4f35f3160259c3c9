//! Adapter settings, as in the reference's config (and peft's `LoraConfig`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// LoRA or mixture-of-LoRA-experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Plain LoRA (peft-compatible).
    Lora,
    /// Token-routed mixture of LoRA experts.
    Moelora,
}

/// Which layers get an adapter and how it is shaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// `lora` or `moelora`.
    #[serde(rename = "type")]
    pub kind: AdapterKind,
    /// Rank.
    pub r: usize,
    /// Scaling numerator (scaling = alpha / r).
    pub alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub dropout: f64,
    /// MoE-LoRA: experts per layer.
    #[serde(default = "default_experts")]
    pub experts: usize,
    /// MoE-LoRA: experts per token (k = experts is the dense mixture).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// MoE-LoRA: renormalise the kept router weights to sum to 1.
    #[serde(default)]
    pub renormalize: bool,
    /// MoE-LoRA: dropout on the router input.
    #[serde(default)]
    pub router_dropout: f64,
    /// MoE-LoRA: weight of the load-balancing loss (mean over layers) in the training loss.
    #[serde(default = "default_aux")]
    pub aux_loss_coef: f64,
    /// Module names to adapt (matched as peft does: the last component of the module path).
    pub targets: Vec<String>,
    /// Only these decoder layers / vision blocks (None = all; mergers only when None).
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
}

fn default_experts() -> usize {
    2
}
fn default_top_k() -> usize {
    1
}
fn default_aux() -> f64 {
    0.01
}

/// Names adapters can target, text then vision.
pub const VALID_TARGETS: [&str; 11] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv",
    "proj",
    "linear_fc1",
    "linear_fc2",
];

impl AdapterConfig {
    /// Checks values and target names; errors name the field and the allowed values.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &str, message: String| Error::Argument {
            arg: arg.into(),
            message,
        };
        if self.r == 0 {
            return Err(bad("r", "must be > 0".into()));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(bad(
                "alpha",
                format!("must be a positive number (found {})", self.alpha),
            ));
        }
        for (name, p) in [
            ("dropout", self.dropout),
            ("router_dropout", self.router_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(bad(name, format!("must be in [0, 1) (found {p})")));
            }
        }
        if self.kind == AdapterKind::Moelora {
            if self.experts < 1 {
                return Err(bad("experts", "must be >= 1".into()));
            }
            if self.top_k < 1 || self.top_k > self.experts {
                return Err(bad(
                    "top_k",
                    format!("must be in 1..={} (found {})", self.experts, self.top_k),
                ));
            }
        }
        if self.targets.is_empty() {
            return Err(bad(
                "targets",
                format!("list at least one of {}", VALID_TARGETS.join(", ")),
            ));
        }
        for t in &self.targets {
            if !VALID_TARGETS.contains(&t.as_str()) {
                return Err(bad(
                    "targets",
                    format!(
                        "`{t}` matches no module of Qwen3-VL; valid names: {}",
                        VALID_TARGETS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}
