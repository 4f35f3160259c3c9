//! `sweep experiments/sweep-*.toml`: a base experiment plus a grid of `section.key` values.
//! Every combination runs as its own `train` process (so each has a clean peak-memory reading
//! and backend state) into `output_dir/<run name>/`; the results table is printed and written
//! as `results.csv` and `results.md`.
//!
//! ```toml
//! base = "experiments/default.toml"
//! output_dir = "output/sweep-demo"
//! [set]                       # fixed overrides for every run
//! "train.log_every" = 50
//! [grid]                      # one run per combination
//! "adapter.type" = ["lora", "moelora"]
//! "adapter.r" = [4, 8]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Deserialize;

use crate::checkpoint::tensor_file::write_atomically;
use crate::error::{Error, Result};
use crate::experiment::Experiment;

/// A sweep file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The experiment every run starts from.
    pub base: PathBuf,
    /// Folder of the runs and the results table.
    pub output_dir: PathBuf,
    /// Overrides applied to every run.
    #[serde(default)]
    pub set: BTreeMap<String, toml::Value>,
    /// Values to combine.
    pub grid: BTreeMap<String, Vec<toml::Value>>,
}

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRun {
    /// Folder name, e.g. `adapter.type=lora,adapter.r=4`.
    pub name: String,
    /// `section.key=value` overrides (fixed ones first).
    pub overrides: Vec<String>,
}

/// One row of the results table.
#[derive(Debug, Clone)]
pub struct SweepResult {
    /// The run.
    pub name: String,
    /// Mean loss of the last tenth of the steps.
    pub final_loss: Option<f64>,
    /// Held-out exact-match rate.
    pub exact_match: Option<f64>,
    /// Wall time of the whole process (seconds).
    pub wall_s: f64,
    /// Peak resident memory (bytes).
    pub peak_rss: Option<u64>,
    /// Trained parameters.
    pub trainable: Option<u64>,
    /// Failure, if the run failed.
    pub error: Option<String>,
}

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl SweepFile {
    /// Reads and checks `path`: every combination must make a valid experiment.
    pub fn load(path: &Path) -> Result<(Self, Vec<SweepRun>)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let sweep: SweepFile = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            field: "sweep".into(),
            message: e.to_string(),
        })?;
        if sweep.grid.is_empty() || sweep.grid.values().any(Vec::is_empty) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "grid".into(),
                message: "needs at least one key with at least one value".into(),
            });
        }
        let runs = sweep.runs();
        for run in &runs {
            Experiment::load(&sweep.base, &run.overrides)
                .map_err(|e| Error::Input(format!("{}: run {}: {e}", path.display(), run.name)))?;
        }
        Ok((sweep, runs))
    }

    /// Every combination of the grid, in key order (the last key varies fastest).
    pub fn runs(&self) -> Vec<SweepRun> {
        let fixed: Vec<String> = self.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut combos: Vec<Vec<(&String, &toml::Value)>> = vec![Vec::new()];
        for (key, values) in &self.grid {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((key, v));
                        c
                    })
                })
                .collect();
        }
        combos
            .into_iter()
            .map(|c| {
                let name = c
                    .iter()
                    .map(|(k, v)| format!("{k}={}", value_text(v)))
                    .collect::<Vec<_>>()
                    .join(",");
                let mut overrides = fixed.clone();
                overrides.extend(c.iter().map(|(k, v)| format!("{k}={v}")));
                let dir = self.output_dir.join(&name);
                overrides.push(format!(
                    "train.output_dir={}",
                    toml::Value::String(dir.display().to_string())
                ));
                SweepRun { name, overrides }
            })
            .collect()
    }
}

/// Runs every combination with `exe train` on `device`; returns and writes the table.
pub fn run_sweep(path: &Path, exe: &Path, device: &str) -> Result<Vec<SweepResult>> {
    let (sweep, runs) = SweepFile::load(path)?;
    let out = &sweep.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    println!(
        "sweep {}: {} runs into {}",
        path.display(),
        runs.len(),
        out.display()
    );
    let mut results = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        println!("[{}/{}] {}", i + 1, runs.len(), run.name);
        let log = out.join(format!("{}.log", run.name));
        let file = std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?;
        let err_file = file.try_clone().map_err(|e| Error::io(&log, e))?;
        let mut cmd = Command::new(exe);
        cmd.args(["train", "--plain", "--device", device, "--config"])
            .arg(&sweep.base);
        for o in &run.overrides {
            cmd.args(["--set", o]);
        }
        let started = Instant::now();
        let status = cmd
            .stdout(file)
            .stderr(err_file)
            .status()
            .map_err(|e| Error::io(exe, e))?;
        let wall_s = started.elapsed().as_secs_f64();
        let summary = out.join(&run.name).join("summary.json");
        let json: Option<serde_json::Value> = std::fs::read_to_string(&summary)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let get = |k: &str| json.as_ref().and_then(|j| j.get(k).cloned());
        let error = (!status.success()).then(|| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| l.starts_with("error"))
                .unwrap_or("failed");
            format!("{last} (see {})", log.display())
        });
        let result = SweepResult {
            name: run.name.clone(),
            final_loss: get("final_loss").and_then(|v| v.as_f64()),
            exact_match: match (get("exact_matches"), get("held_out")) {
                (Some(k), Some(n)) => {
                    Some(k.as_f64().unwrap_or(0.0) / n.as_f64().unwrap_or(1.0).max(1.0))
                }
                _ => None,
            },
            wall_s,
            peak_rss: get("peak_rss_bytes").and_then(|v| v.as_u64()),
            trainable: get("trainable_params").and_then(|v| v.as_u64()),
            error,
        };
        println!("    {}", row_text(&result).join("  "));
        results.push(result);
    }
    let table = markdown(&results);
    println!("\n{table}");
    write_atomically(&out.join("results.md"), table.as_bytes())?;
    write_atomically(&out.join("results.csv"), csv(&results).as_bytes())?;
    Ok(results)
}

fn row_text(r: &SweepResult) -> Vec<String> {
    let opt = |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or("-".into());
    vec![
        r.name.clone(),
        opt(r.final_loss, 4),
        opt(r.exact_match, 2),
        format!("{:.1}", r.wall_s),
        opt(r.peak_rss.map(|b| b as f64 / 1048576.0), 0),
        r.trainable.map(|t| t.to_string()).unwrap_or("-".into()),
        r.error.clone().unwrap_or_default(),
    ]
}

const COLUMNS: [&str; 7] = [
    "run",
    "final loss",
    "held-out exact match",
    "wall s",
    "peak RSS MiB",
    "trainable params",
    "error",
];

fn markdown(results: &[SweepResult]) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        COLUMNS.join(" | "),
        "---|".repeat(COLUMNS.len())
    );
    for r in results {
        s.push_str(&format!("| {} |\n", row_text(r).join(" | ")));
    }
    s
}

fn csv(results: &[SweepResult]) -> String {
    let mut s =
        "run,final_loss,exact_match,wall_s,peak_rss_mib,trainable_params,error\n".to_string();
    for r in results {
        let cells: Vec<String> = row_text(r)
            .into_iter()
            .map(|c| {
                if c.contains(',') || c.contains('"') {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c
                }
            })
            .collect();
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_expands_to_every_combination_with_checked_keys() {
        let dir = tempfile::tempdir().unwrap();
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/qwen3-vl-4b-lora.toml");
        let f = dir.path().join("s.toml");
        let text = format!(
            "base = {:?}\noutput_dir = \"out\"\n[set]\n\"train.epochs\" = 1\n[grid]\n\
             \"adapter.type\" = [\"lora\", \"moelora\"]\n\"adapter.r\" = [4, 8]\n",
            base.display().to_string()
        );
        std::fs::write(&f, &text).unwrap();
        let (_, runs) = SweepFile::load(&f).unwrap();
        assert_eq!(runs.len(), 4);
        assert_eq!(runs[0].name, "adapter.r=4,adapter.type=lora");
        assert!(runs[3]
            .overrides
            .contains(&"adapter.type=\"moelora\"".to_string()));
        assert!(runs[0].overrides.contains(&"train.epochs=1".to_string()));
        let bad = text.replace("adapter.r", "adapter.rank");
        std::fs::write(&f, bad).unwrap();
        let e = SweepFile::load(&f).unwrap_err().to_string();
        assert!(e.contains("unknown field `rank`"), "{e}");
    }
}
