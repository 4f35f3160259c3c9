//! Choosing the next token from a row of logits, as HF `generate` does: repetition penalty,
//! then (when sampling) temperature, top-k and top-p, then a draw from a seeded RNG; greedy is
//! the argmax after the penalty. Defaults come from the model's `generation_config.json`.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    /// Draw from the distribution (`false` = greedy argmax).
    pub do_sample: bool,
    /// Logits are divided by this before top-k / top-p (sampling only; > 0).
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = off; sampling only).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    pub top_p: f64,
    /// HF's CTRL-style penalty on every token already in the sequence (1 = off): a positive
    /// logit is divided by it, a negative one multiplied.
    pub repetition_penalty: f64,
    /// RNG seed (sampling only).
    pub seed: u64,
}

impl Default for SamplingOptions {
    /// Greedy, no penalty.
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Refuses values HF refuses too (temperature <= 0 while sampling, p outside (0, 1], ...).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64, want: &str| {
            Err(Error::Argument {
                arg: format!("--{}", what.replace('_', "-")),
                message: format!("{v} is not allowed: expected {want}"),
            })
        };
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, "a finite value > 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "a value in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite value > 0",
            );
        }
        Ok(())
    }
}

/// The parts of a model's `generation_config.json` that generation uses.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Sampling settings (HF defaults where a key is absent: greedy unless `do_sample`).
    pub sampling: SamplingOptions,
    /// Token ids that end a sequence (`eos_token_id`, a number or a list).
    pub stop_tokens: Vec<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; `Ok(None)` when the file is absent.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text, &path).map(Some)
    }

    /// Parses the JSON text of a `generation_config.json` (`path` names it in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let bad = |key: &str, want: &str| Error::Json {
            path: path.to_path_buf(),
            message: format!("`{key}` must be {want}, found {}", json[key]),
        };
        let number = |key: &str, default: f64| -> Result<f64> {
            match &json[key] {
                serde_json::Value::Null => Ok(default),
                v => v.as_f64().ok_or_else(|| bad(key, "a number")),
            }
        };
        let d = SamplingOptions::default();
        let sampling = SamplingOptions {
            do_sample: match &json["do_sample"] {
                serde_json::Value::Null => false,
                v => v
                    .as_bool()
                    .ok_or_else(|| bad("do_sample", "true or false"))?,
            },
            temperature: number("temperature", d.temperature)?,
            top_k: number("top_k", 50.0)? as usize,
            top_p: number("top_p", d.top_p)?,
            repetition_penalty: number("repetition_penalty", d.repetition_penalty)?,
            seed: 0,
        };
        let stop_tokens = match &json["eos_token_id"] {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("eos_token_id", "a token id or a list of ids"))?,
            v => vec![v
                .as_u64()
                .ok_or_else(|| bad("eos_token_id", "a token id or a list of ids"))?
                as u32],
        };
        sampling.validate().map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self {
            sampling,
            stop_tokens,
        })
    }
}

/// Picks tokens for one row; owns the row's RNG so batches are reproducible per seed.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// Settings.
    pub options: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded with `options.seed + row` (rows of a batch draw independently).
    pub fn new(options: SamplingOptions, row: usize) -> Self {
        let rng = StdRng::seed_from_u64(options.seed.wrapping_add(row as u64));
        Self { options, rng }
    }

    /// The next token for `logits` (modified in place) given the tokens so far (`history`,
    /// prompt included, as HF penalises the whole sequence).
    pub fn pick(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let o = &self.options;
        if o.repetition_penalty != 1.0 {
            let p = o.repetition_penalty as f32;
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l < 0.0 { *l * p } else { *l / p };
                    }
                }
            }
        }
        if !o.do_sample {
            return argmax(logits);
        }
        let inv_t = 1.0 / o.temperature as f32;
        // Candidates by descending logit; top-k keeps ties with the k-th value, as HF does.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        if o.top_k > 0 && o.top_k < order.len() {
            order.select_nth_unstable_by(o.top_k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            let kth = logits[order[o.top_k - 1] as usize];
            order.retain(|&i| logits[i as usize] >= kth);
        }
        order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top = logits[order[0] as usize] * inv_t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] * inv_t - top) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if o.top_p < 1.0 {
            // HF drops the tokens whose ascending cumulative mass is <= 1 − p; from the top,
            // that keeps tokens until the mass before them reaches p.
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .take_while(|&&p| {
                    let before = mass;
                    mass += p;
                    before < o.top_p
                })
                .count()
                .max(1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (k, p) in probs.iter().enumerate() {
            if u < *p {
                return order[k];
            }
            u -= p;
        }
        order[probs.len() - 1]
    }
}

/// Index of the largest value (the first on ties, as torch's argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(top_k: usize, top_p: f64) -> SamplingOptions {
        SamplingOptions {
            do_sample: true,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut s = Sampler::new(
            SamplingOptions {
                repetition_penalty: 2.0,
                ..Default::default()
            },
            0,
        );
        let mut l = vec![4.0, 3.0, -1.0];
        // Token 0 seen twice is penalised once: 4 / 2 = 2 < 3.
        assert_eq!(s.pick(&mut l, &[0, 0, 2]), 1);
        assert_eq!(l, vec![2.0, 3.0, -2.0]);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draw() {
        // probs ∝ e^3, e^2, e^1, e^0: 0.644, 0.237, 0.087, 0.032.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let draws = |o: SamplingOptions| {
            let mut s = Sampler::new(o, 0);
            let mut seen = [0usize; 4];
            for _ in 0..2000 {
                seen[s.pick(&mut logits.to_vec(), &[]) as usize] += 1;
            }
            seen
        };
        let k2 = draws(sampling(2, 1.0));
        assert!(k2[0] > 0 && k2[1] > 0 && k2[2] == 0 && k2[3] == 0, "{k2:?}");
        // p = 0.85: 0.644 < 0.85 so token 1 is kept; 0.881 >= 0.85 so token 2 is not.
        let p = draws(sampling(0, 0.85));
        assert!(p[1] > 0 && p[2] == 0 && p[3] == 0, "{p:?}");
        // Token 0's share is about 0.644 / 0.881 = 0.73.
        assert!((p[0] as f64 / 2000.0 - 0.73).abs() < 0.05, "{p:?}");
        let all = draws(sampling(0, 1.0));
        assert!(all.iter().all(|&c| c > 0), "{all:?}");
    }

    #[test]
    fn seeds_reproduce_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingOptions {
                    seed,
                    ..sampling(0, 1.0)
                },
                0,
            );
            (0..20)
                .map(|_| s.pick(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn reads_the_4b_generation_config() {
        let json = r#"{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
            "eos_token_id": [151645, 151643], "top_k": 20, "top_p": 0.8,
            "repetition_penalty": 1.0, "temperature": 0.7, "transformers_version": "4.56.0"}"#;
        let c = GenerationConfig::from_json(json, Path::new("g.json")).unwrap();
        assert_eq!(c.stop_tokens, vec![151645, 151643]);
        assert!(c.sampling.do_sample);
        assert_eq!(
            (c.sampling.top_k, c.sampling.top_p, c.sampling.temperature),
            (20, 0.8, 0.7)
        );
        let bad = GenerationConfig::from_json(r#"{"top_p": "x"}"#, Path::new("g.json"));
        assert!(bad.unwrap_err().to_string().contains("top_p"));
    }
}
