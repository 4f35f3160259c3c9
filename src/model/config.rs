//! Qwen3-VL configuration, read from a Hugging Face `config.json` and validated at load.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Rotary settings as HF writes them (`rope_parameters` in 5.x, `rope_scaling` in 4.x).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct RopeParameters {
    /// `default` for the text model, `axial` for the vision tower.
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Base of the frequencies (5.x only; 4.x has it at the top of `text_config`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// How many frequency slots go to the (t, h, w) axes; must sum to head_dim / 2.
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
    /// Always true for Qwen3-VL (the interleaved layout is the only one HF implements).
    #[serde(default)]
    pub mrope_interleaved: Option<bool>,
}

/// `text_config`: the Qwen3 decoder.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TextConfig {
    /// Std of the normal initialisation of weight matrices and embeddings.
    #[serde(default = "default_init_std")]
    pub initializer_range: f64,
    /// Rows of the embedding table (and of the LM head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (only `silu` exists in Qwen3-VL).
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Longest position the model was trained for (informational).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// 4.x place of the rotary base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// 4.x place of the M-RoPE settings.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// 5.x place of the rotary settings.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
}

/// `vision_config`: the ViT with DeepStack taps.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct VisionConfig {
    /// Std of the normal initialisation of weight matrices and embeddings.
    #[serde(default = "default_init_std")]
    pub initializer_range: f64,
    /// Number of vision blocks.
    pub depth: usize,
    /// Width of the vision residual stream.
    pub hidden_size: usize,
    /// Width of the vision MLP.
    pub intermediate_size: usize,
    /// Attention heads in the vision blocks.
    pub num_heads: usize,
    /// Image channels (3).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Patch side in pixels.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Frames per temporal patch.
    #[serde(default = "default_temporal")]
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one LLM token.
    #[serde(default = "default_merge")]
    pub spatial_merge_size: usize,
    /// Width of the merged tokens (= text hidden size).
    pub out_hidden_size: usize,
    /// Rows of the learned position table (a square grid).
    pub num_position_embeddings: usize,
    /// Blocks after which a DeepStack merger taps the hidden state.
    #[serde(default)]
    pub deepstack_visual_indexes: Vec<usize>,
    /// Activation of the block MLPs.
    #[serde(default = "default_gelu_tanh")]
    pub hidden_act: String,
    /// Vision rotary settings (absent in 4.x files: theta 10000).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
}

/// The whole `config.json` of a `Qwen3VLForConditionalGeneration` checkpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Qwen3VlConfig {
    /// `qwen3_vl` for the dense family.
    #[serde(default)]
    pub model_type: Option<String>,
    /// The decoder.
    pub text_config: TextConfig,
    /// The vision tower.
    pub vision_config: VisionConfig,
    /// `<|image_pad|>`.
    #[serde(default = "default_image_token")]
    pub image_token_id: u32,
    /// `<|video_pad|>`.
    #[serde(default = "default_video_token")]
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    #[serde(default = "default_vision_start")]
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    #[serde(default = "default_vision_end")]
    pub vision_end_token_id: u32,
    /// Whether the LM head shares the embedding table (top-level flag, as HF 5.x reads it).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_init_std() -> f64 {
    0.02
}

fn default_silu() -> String {
    "silu".into()
}
fn default_gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_in_channels() -> usize {
    3
}
fn default_patch() -> usize {
    16
}
fn default_temporal() -> usize {
    2
}
fn default_merge() -> usize {
    2
}
fn default_image_token() -> u32 {
    151655
}
fn default_video_token() -> u32 {
    151656
}
fn default_vision_start() -> u32 {
    151652
}
fn default_vision_end() -> u32 {
    151653
}

/// Activation functions used by the vision MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionAct {
    /// `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
}

impl TextConfig {
    /// Key/value heads (GQA groups).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn rope(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    /// Rotary base: `rope_parameters.rope_theta`, else the 4.x `rope_theta`, else HF's class default.
    pub fn rope_theta(&self) -> f64 {
        self.rope()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(500_000.0)
    }

    /// M-RoPE section (t, h, w); HF falls back to [24, 20, 20].
    pub fn mrope_section(&self) -> [usize; 3] {
        match self.rope().and_then(|r| r.mrope_section.clone()) {
            Some(s) if s.len() == 3 => [s[0], s[1], s[2]],
            _ => [24, 20, 20],
        }
    }
}

impl VisionConfig {
    /// Per-head width of the vision attention.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Values in one flattened patch row: channels x frames x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Side of the learned position grid.
    pub fn pos_grid_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }

    /// Width of a merged token before the merger MLP (hidden x merge²).
    pub fn merged_dim(&self) -> usize {
        self.hidden_size * self.spatial_merge_size * self.spatial_merge_size
    }

    /// Vision rotary base.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// The MLP activation.
    pub fn act(&self) -> VisionAct {
        if self.hidden_act == "gelu" {
            VisionAct::Gelu
        } else {
            VisionAct::GeluTanh
        }
    }
}

impl Qwen3VlConfig {
    /// Reads and validates `config.json`; `path` is the file or the model folder holding it.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = config_file(path);
        if !file.exists() {
            return Err(Error::MissingFile {
                path: file,
                hint:
                    "Pass a model folder holding config.json (for Qwen3-VL-4B-Instruct: download \
                       Qwen/Qwen3-VL-4B-Instruct from the Hugging Face hub into \
                       model/Qwen3-VL-4B-Instruct/) or a config.json file such as \
                       model/configs/qwen3-vl-4b-instruct.json."
                        .into(),
            });
        }
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json(&text, &file)
    }

    /// Parses and validates a config from JSON text; `path` is only used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks every constraint the model code relies on; the error names the offending field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        if let Some(t) = &self.model_type {
            if t != "qwen3_vl" {
                return Err(bad(
                    "model_type",
                    format!("expected \"qwen3_vl\" (the dense Qwen3-VL family), found \"{t}\""),
                ));
            }
        }
        let t = &self.text_config;
        for (name, v) in [
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.kv_heads()),
            ("head_dim", t.head_dim()),
        ] {
            if v == 0 {
                return Err(bad(&format!("text_config.{name}"), "must be > 0".into()));
            }
        }
        if t.head_dim.is_none() && !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err(bad(
                "text_config.num_attention_heads",
                format!(
                    "must divide hidden_size {} when head_dim is not given (found {})",
                    t.hidden_size, t.num_attention_heads
                ),
            ));
        }
        if !t.num_attention_heads.is_multiple_of(t.kv_heads()) {
            return Err(bad(
                "text_config.num_key_value_heads",
                format!(
                    "must divide num_attention_heads {} (found {})",
                    t.num_attention_heads,
                    t.kv_heads()
                ),
            ));
        }
        if !t.head_dim().is_multiple_of(2) {
            return Err(bad(
                "text_config.head_dim",
                format!(
                    "must be even for rotary embeddings (found {})",
                    t.head_dim()
                ),
            ));
        }
        if t.hidden_act != "silu" {
            return Err(bad(
                "text_config.hidden_act",
                format!("only \"silu\" is supported (found \"{}\")", t.hidden_act),
            ));
        }
        if !(t.rms_norm_eps > 0.0 && t.rms_norm_eps.is_finite()) {
            return Err(bad(
                "text_config.rms_norm_eps",
                format!("must be a positive number (found {})", t.rms_norm_eps),
            ));
        }
        if let Some(rt) = t.rope().and_then(|r| r.rope_type.as_deref()) {
            if rt != "default" && rt != "mrope" {
                return Err(bad(
                    "text_config.rope_parameters.rope_type",
                    format!("only \"default\" is supported (found \"{rt}\")"),
                ));
            }
        }
        let theta = t.rope_theta();
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(bad(
                "text_config.rope_parameters.rope_theta",
                format!("must be a positive number (found {theta})"),
            ));
        }
        if let Some(s) = t.rope().and_then(|r| r.mrope_section.as_ref()) {
            if s.len() != 3 {
                return Err(bad(
                    "text_config.rope_parameters.mrope_section",
                    format!("must have 3 entries (t, h, w), found {}", s.len()),
                ));
            }
        }
        let sec = t.mrope_section();
        let half = t.head_dim() / 2;
        if sec.iter().sum::<usize>() != half {
            return Err(bad(
                "text_config.rope_parameters.mrope_section",
                format!(
                    "must sum to head_dim / 2 = {half} (found {:?}, sum {})",
                    sec,
                    sec.iter().sum::<usize>()
                ),
            ));
        }
        if 3 * sec[1].max(sec[2]) > half {
            return Err(bad(
                "text_config.rope_parameters.mrope_section",
                format!(
                    "3 x max(h, w) = {} exceeds head_dim / 2 = {half}: the interleaved layout \
                     would silently drop slots",
                    3 * sec[1].max(sec[2])
                ),
            ));
        }

        let v = &self.vision_config;
        for (name, val) in [
            ("depth", v.depth),
            ("hidden_size", v.hidden_size),
            ("intermediate_size", v.intermediate_size),
            ("num_heads", v.num_heads),
            ("in_channels", v.in_channels),
            ("patch_size", v.patch_size),
            ("temporal_patch_size", v.temporal_patch_size),
            ("spatial_merge_size", v.spatial_merge_size),
            ("out_hidden_size", v.out_hidden_size),
            ("num_position_embeddings", v.num_position_embeddings),
        ] {
            if val == 0 {
                return Err(bad(&format!("vision_config.{name}"), "must be > 0".into()));
            }
        }
        if !v.hidden_size.is_multiple_of(v.num_heads) {
            return Err(bad(
                "vision_config.num_heads",
                format!(
                    "must divide hidden_size {} (found {})",
                    v.hidden_size, v.num_heads
                ),
            ));
        }
        if !v.head_dim().is_multiple_of(4) {
            return Err(bad(
                "vision_config.num_heads",
                format!(
                    "vision head_dim = hidden_size / num_heads = {} must be a multiple of 4 \
                     (2-D rotary uses head_dim / 4 frequencies per axis)",
                    v.head_dim()
                ),
            ));
        }
        let g = v.pos_grid_side();
        if g * g != v.num_position_embeddings || g < 2 {
            return Err(bad(
                "vision_config.num_position_embeddings",
                format!(
                    "must be a square of a side >= 2 (found {})",
                    v.num_position_embeddings
                ),
            ));
        }
        if v.out_hidden_size != t.hidden_size {
            return Err(bad(
                "vision_config.out_hidden_size",
                format!(
                    "must equal text_config.hidden_size {} (found {})",
                    t.hidden_size, v.out_hidden_size
                ),
            ));
        }
        if v.hidden_act != "gelu_pytorch_tanh" && v.hidden_act != "gelu" {
            return Err(bad(
                "vision_config.hidden_act",
                format!(
                    "expected \"gelu_pytorch_tanh\" or \"gelu\" (found \"{}\")",
                    v.hidden_act
                ),
            ));
        }
        let ds = &v.deepstack_visual_indexes;
        if ds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(
                "vision_config.deepstack_visual_indexes",
                format!("must be strictly increasing (found {ds:?})"),
            ));
        }
        if let Some(&last) = ds.last() {
            if last >= v.depth {
                return Err(bad(
                    "vision_config.deepstack_visual_indexes",
                    format!("entries must be < depth {} (found {ds:?})", v.depth),
                ));
            }
        }
        if ds.len() > t.num_hidden_layers {
            return Err(bad(
                "vision_config.deepstack_visual_indexes",
                format!(
                    "{} taps but only {} decoder layers to inject them into",
                    ds.len(),
                    t.num_hidden_layers
                ),
            ));
        }
        for (name, id) in [
            ("image_token_id", self.image_token_id),
            ("video_token_id", self.video_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
            ("vision_end_token_id", self.vision_end_token_id),
        ] {
            if id as usize >= t.vocab_size {
                return Err(bad(
                    name,
                    format!(
                        "must be < text_config.vocab_size {} (found {id})",
                        t.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `config.json` inside a folder, or the path itself when it is a file.
pub fn config_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> Qwen3VlConfig {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("model/configs")
            .join(name);
        Qwen3VlConfig::from_path(&p).unwrap()
    }

    #[test]
    fn shipped_configs_parse() {
        let c2 = shipped("qwen3-vl-2b-instruct.json");
        assert_eq!(c2.text_config.hidden_size, 2048);
        assert!(c2.tie_word_embeddings);
        let c4 = shipped("qwen3-vl-4b-instruct.json");
        assert_eq!(c4.text_config.head_dim(), 128);
        assert_eq!(c4.text_config.rope_theta(), 5_000_000.0);
        assert_eq!(c4.text_config.mrope_section(), [24, 20, 20]);
        assert_eq!(c4.vision_config.deepstack_visual_indexes, vec![5, 11, 17]);
        assert_eq!(c4.vision_config.rope_theta(), 10_000.0);
        let c8 = shipped("qwen3-vl-8b-instruct.json");
        assert!(!c8.tie_word_embeddings);
        assert_eq!(c8.vision_config.head_dim(), 72);
    }

    fn with_change(edit: impl Fn(&mut serde_json::Value)) -> Error {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("model/configs/qwen3-vl-4b-instruct.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        Qwen3VlConfig::from_json(&v.to_string(), Path::new("edited.json")).unwrap_err()
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = with_change(|v| v["text_config"]["num_key_value_heads"] = 5.into());
        assert!(
            e.to_string().contains("text_config.num_key_value_heads"),
            "{e}"
        );
        let e = with_change(|v| {
            v["text_config"]["rope_scaling"]["mrope_section"] = serde_json::json!([24, 20, 16])
        });
        assert!(e.to_string().contains("mrope_section"), "{e}");
        let e = with_change(|v| v["vision_config"]["num_heads"] = 12.into());
        assert!(e.to_string().contains("vision_config.num_heads"), "{e}");
        let e = with_change(|v| v["vision_config"]["out_hidden_size"] = 1000.into());
        assert!(
            e.to_string().contains("vision_config.out_hidden_size"),
            "{e}"
        );
        let e = with_change(|v| {
            v["text_config"].as_object_mut().unwrap().remove("head_dim");
            v["text_config"]["num_attention_heads"] = 30.into();
        });
        assert!(
            e.to_string().contains("text_config.num_attention_heads"),
            "{e}"
        );
        let e = with_change(|v| {
            v["vision_config"]["deepstack_visual_indexes"] = serde_json::json!([5, 30])
        });
        assert!(e.to_string().contains("deepstack_visual_indexes"), "{e}");
        let e = with_change(|v| {
            v["text_config"]
                .as_object_mut()
                .unwrap()
                .remove("hidden_size");
        });
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn missing_config_says_what_to_download() {
        let e = Qwen3VlConfig::from_path(Path::new("model/Nope")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("model/Nope") && s.contains("download"), "{s}");
    }
}
