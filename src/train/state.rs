//! What a run shares between its train steps and optimizer steps: settings, the dynamic loss
//! scaler, the running window of micro-batch losses, and the per-step rows of `metrics.csv`.
//!
//! Data-parallel replicas (one model copy per GPU) share one `RunState`: every replica's
//! micro-batches add to the window of their optimizer step, and the first replica to finish a
//! step decides it (gradient norm, clipping, skip, loss scale, metrics row, checkpoint) for all
//! of them; the others apply the same decision to their identical, all-reduced gradients.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::optim::GradScale;
use crate::adapter::AdapterConfig;
use crate::checkpoint::tensor_file::write_atomically;
use crate::error::{Error, Result};

/// Fixed settings of a run (what the step hooks need to know).
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Seed of data order and dropout.
    pub seed: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Dynamic loss scaling (f16 compute).
    pub dynamic_loss_scale: bool,
    /// Each sample's mean token loss weighs the same (`train.loss_average = "samples"`),
    /// instead of each target token.
    pub loss_per_sample: bool,
    /// Global gradient-norm clip (0 = none).
    pub max_grad_norm: f64,
    /// Plain log line every N steps (0 = never).
    pub log_every: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// Training samples per epoch.
    pub samples_per_epoch: usize,
    /// Output folder.
    pub out_dir: PathBuf,
    /// The adapter being trained (`None`: every weight of the model is trained).
    pub adapter: Option<AdapterConfig>,
    /// Base model name written into adapter configs.
    pub base_model: String,
    /// Consecutive skipped (non-finite) steps before the run gives up.
    pub max_consecutive_skips: usize,
    /// Data-parallel replicas (devices) that each run `grad_accum` micro-batches per step.
    pub replicas: usize,
    /// Re-run each decoder layer in the backward pass instead of keeping its activations
    /// (`train.gradient_checkpointing = "layers"`, see `train::recompute`).
    pub recompute_layers: bool,
}

impl RunSettings {
    /// Samples of one optimizer step over every replica (the global batch).
    pub fn samples_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.replicas
    }

    /// The optimizer step (1-based) that the sample at run `position` belongs to.
    pub fn step_of(&self, position: usize) -> usize {
        position / self.samples_per_step() + 1
    }
}

/// How the first replica to finish an optimizer step applied it; the others do the same.
#[derive(Debug, Clone, Copy)]
pub struct StepDecision {
    /// The gradients were finite (the step was taken, not skipped).
    pub finite: bool,
    /// Factor applied to the gradients (unscaling times clipping).
    pub factor: f64,
    /// Replicas that have not applied it yet.
    pub remaining: usize,
}

/// Dynamic loss scaling as PyTorch's GradScaler: halve on overflow, double after
/// `growth_interval` good steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Current scale (1 when scaling is off).
    pub scale: f64,
    /// Good steps since the last change.
    pub good_steps: usize,
    /// Good steps before the scale doubles.
    pub growth_interval: usize,
}

impl LossScaler {
    /// `2^16` with growth every 2000 steps (PyTorch's defaults), or a fixed 1.
    pub fn new(dynamic: bool) -> Self {
        Self {
            scale: if dynamic { 65536.0 } else { 1.0 },
            good_steps: 0,
            growth_interval: if dynamic { 2000 } else { usize::MAX },
        }
    }

    /// After a step with finite gradients.
    pub fn good(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }

    /// After a step whose gradients overflowed.
    pub fn overflow(&mut self) {
        if self.growth_interval != usize::MAX {
            self.scale = (self.scale * 0.5).max(1.0);
        }
        self.good_steps = 0;
    }
}

/// One row of `metrics.csv` (one optimizer step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRow {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Fractional data epoch at the end of the step.
    pub epoch: f64,
    /// Learning rate used.
    pub lr: f64,
    /// LM loss + aux loss, mean over the window's micro-batches.
    pub loss: f64,
    /// Caption cross-entropy.
    pub lm_loss: f64,
    /// MoE load-balancing loss (already weighted).
    pub aux_loss: f64,
    /// Global gradient norm before clipping (unscaled).
    pub grad_norm: f64,
    /// Loss scale in use.
    pub loss_scale: f64,
    /// Steps skipped so far (non-finite gradients).
    pub skipped: usize,
    /// Tokens in the window.
    pub tokens: usize,
    /// Samples in the window.
    pub samples: usize,
    /// Seconds since the run started (resumed runs continue the clock).
    pub seconds: f64,
    /// Tokens per second over the window.
    pub tokens_per_s: f64,
    /// Samples per second over the window.
    pub samples_per_s: f64,
    /// Share of routed tokens per expert (empty without MoE-LoRA).
    pub expert_share: Vec<f64>,
}

impl StepRow {
    fn header(experts: usize) -> String {
        let mut h = "step,epoch,lr,loss,lm_loss,aux_loss,grad_norm,loss_scale,skipped,tokens,\
                     samples,seconds,tokens_per_s,samples_per_s"
            .to_string();
        for e in 0..experts {
            h.push_str(&format!(",expert{e}_share"));
        }
        h
    }

    fn csv(&self) -> String {
        let mut s = format!(
            "{},{:.6},{:.9e},{:.9},{:.9},{:.9},{:.6},{},{},{},{},{:.3},{:.2},{:.3}",
            self.step,
            self.epoch,
            self.lr,
            self.loss,
            self.lm_loss,
            self.aux_loss,
            self.grad_norm,
            self.loss_scale,
            self.skipped,
            self.tokens,
            self.samples,
            self.seconds,
            self.tokens_per_s,
            self.samples_per_s
        );
        for v in &self.expert_share {
            s.push_str(&format!(",{v:.4}"));
        }
        s
    }
}

/// Sums over the micro-batches of the current accumulation window.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Σ LM loss.
    pub lm: f64,
    /// Σ aux loss.
    pub aux: f64,
    /// Micro-batches.
    pub micro: usize,
    /// Tokens.
    pub tokens: usize,
    /// Samples.
    pub samples: usize,
    /// Tokens per expert.
    pub expert_tokens: Vec<usize>,
    /// Training-set indexes seen (for error messages).
    pub indexes: Vec<usize>,
}

/// Mutable progress of a run.
#[derive(Debug)]
pub struct Progress {
    /// Optimizer steps done (skipped ones included).
    pub step: usize,
    /// The loss scaler.
    pub scaler: LossScaler,
    /// Steps skipped so far.
    pub skipped: usize,
    /// Skipped steps in a row.
    pub consecutive_skips: usize,
    /// The windows of the steps in progress, by step number.
    pub windows: BTreeMap<usize, Window>,
    /// Optimizer steps each replica (by device) has applied, counted from `first_step`.
    pub replica_steps: HashMap<String, usize>,
    /// The step this process started at (0, or the checkpoint's step on resume).
    pub first_step: usize,
    /// Decided steps that some replicas have still to apply.
    pub decisions: HashMap<usize, StepDecision>,
    /// Every step's row.
    pub rows: Vec<StepRow>,
    /// Clock start of this process's part of the run.
    pub started: Instant,
    /// Seconds run before a resume.
    pub seconds_before: f64,
    /// Time of the last optimizer step.
    pub last_step_at: Instant,
    /// Checkpoints written (step numbers).
    pub checkpoints: Vec<usize>,
}

/// What a replica that finished its next optimizer step has to do.
#[derive(Debug, Clone, Copy)]
pub enum StepClaim {
    /// It is the first to finish step N: decide it (and record the decision for the others
    /// with [`Progress::decided`]).
    Decide(usize),
    /// Another replica decided this step: do the same.
    Apply(StepDecision),
}

impl Progress {
    /// Replica `replica` (a device name) finished its next optimizer step.
    pub fn claim_step(&mut self, replica: &str) -> StepClaim {
        let first = self.first_step;
        let done = self
            .replica_steps
            .entry(replica.to_string())
            .or_insert(first);
        *done += 1;
        let step = *done;
        match self.decisions.get_mut(&step) {
            Some(d) => {
                d.remaining -= 1;
                let out = *d;
                if d.remaining == 0 {
                    self.decisions.remove(&step);
                }
                StepClaim::Apply(out)
            }
            None => StepClaim::Decide(step),
        }
    }

    /// Records how `step` was applied, for the `replicas - 1` other replicas.
    pub fn decided(&mut self, step: usize, finite: bool, factor: f64, replicas: usize) {
        if replicas > 1 {
            let remaining = replicas - 1;
            let d = StepDecision {
                finite,
                factor,
                remaining,
            };
            self.decisions.insert(step, d);
        }
    }
}

/// Shared state of a run (held by the model wrapper, so it reaches the step hooks).
#[derive(Debug)]
pub struct RunState {
    /// Settings.
    pub settings: RunSettings,
    /// Where each training sample came from (file and row), by index.
    pub origins: Vec<String>,
    /// Progress.
    pub progress: Mutex<Progress>,
    /// The error that stopped the run, if any.
    pub error: Mutex<Option<Error>>,
    /// Where the step hands the optimizer its gradient factor (clipping / loss scale); unset,
    /// the step multiplies the gradients itself.
    pub grad_scale: OnceLock<GradScale>,
}

impl RunState {
    /// A fresh (or resumed at `step`) run.
    pub fn new(settings: RunSettings, origins: Vec<String>) -> Self {
        let now = Instant::now();
        let scaler = LossScaler::new(settings.dynamic_loss_scale);
        Self {
            settings,
            origins,
            progress: Mutex::new(Progress {
                step: 0,
                scaler,
                skipped: 0,
                consecutive_skips: 0,
                windows: BTreeMap::new(),
                replica_steps: HashMap::new(),
                first_step: 0,
                decisions: HashMap::new(),
                rows: Vec::new(),
                started: now,
                seconds_before: 0.0,
                last_step_at: now,
                checkpoints: Vec::new(),
            }),
            error: Mutex::new(None),
            grad_scale: OnceLock::new(),
        }
    }

    /// Locks the progress.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `e` and stops the run: the Learner has no error channel, so this panics after
    /// storing the error for `train` to report. With data-parallel replicas the process exits
    /// at once (status 1): the other replicas would wait for this one's gradients forever.
    pub fn fail(&self, e: Error) -> ! {
        let msg = e.to_string();
        if self.settings.replicas > 1 {
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        panic!("{msg}");
    }

    /// The stored error, if the run failed.
    pub fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Origins of training-set `indexes`, for messages.
    pub fn describe(&self, indexes: &[usize]) -> String {
        indexes
            .iter()
            .map(|&i| {
                self.origins
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("#{i}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `metrics.csv` in `dir`.
pub fn metrics_file(dir: &Path) -> PathBuf {
    dir.join("metrics.csv")
}

/// Appends `row` to `metrics.csv`, writing the header first when the file is new.
pub fn append_row(dir: &Path, row: &StepRow) -> Result<()> {
    let path = metrics_file(dir);
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let mut text = String::new();
    if new {
        text.push_str(&StepRow::header(row.expert_share.len()));
        text.push('\n');
    }
    text.push_str(&row.csv());
    text.push('\n');
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(&path, e))
}

/// Reads `metrics.csv` back (for plots, reports and resume).
pub fn read_rows(dir: &Path) -> Result<Vec<StepRow>> {
    let path = metrics_file(dir);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let bad = || Error::Input(format!("{}: row {}: malformed", path.display(), n + 1));
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 14 {
            return Err(bad());
        }
        let num = |i: usize| f[i].parse::<f64>().map_err(|_| bad());
        let int = |i: usize| f[i].parse::<usize>().map_err(|_| bad());
        rows.push(StepRow {
            step: int(0)?,
            epoch: num(1)?,
            lr: num(2)?,
            loss: num(3)?,
            lm_loss: num(4)?,
            aux_loss: num(5)?,
            grad_norm: num(6)?,
            loss_scale: num(7)?,
            skipped: int(8)?,
            tokens: int(9)?,
            samples: int(10)?,
            seconds: num(11)?,
            tokens_per_s: num(12)?,
            samples_per_s: num(13)?,
            expert_share: (14..f.len()).map(num).collect::<Result<_>>()?,
        });
    }
    Ok(rows)
}

/// Keeps the rows up to `step` (a resumed run rewrites what came after its checkpoint),
/// rewriting the file in one atomic write.
pub fn truncate_rows(dir: &Path, step: usize) -> Result<Vec<StepRow>> {
    let rows: Vec<StepRow> = read_rows(dir)?
        .into_iter()
        .filter(|r| r.step <= step)
        .collect();
    let mut text = String::new();
    if let Some(first) = rows.first() {
        text.push_str(&StepRow::header(first.expert_share.len()));
        text.push('\n');
    }
    for r in &rows {
        text.push_str(&r.csv());
        text.push('\n');
    }
    let path = metrics_file(dir);
    if rows.is_empty() {
        // No row yet: the next append writes the header.
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    } else {
        write_atomically(&path, text.as_bytes())?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_backs_off_and_grows() {
        let mut s = LossScaler::new(true);
        s.overflow();
        assert_eq!(s.scale, 32768.0);
        s.growth_interval = 2;
        s.good();
        s.good();
        assert_eq!(s.scale, 65536.0);
        let mut fixed = LossScaler::new(false);
        fixed.overflow();
        fixed.good();
        assert_eq!(fixed.scale, 1.0);
    }

    fn settings(replicas: usize) -> RunSettings {
        RunSettings {
            seed: 1,
            grad_accum: 2,
            batch_size: 3,
            dynamic_loss_scale: false,
            loss_per_sample: false,
            max_grad_norm: 1.0,
            log_every: 0,
            save_every: 0,
            keep_last: 1,
            total_steps: 10,
            samples_per_epoch: 60,
            out_dir: PathBuf::new(),
            adapter: None,
            base_model: String::new(),
            max_consecutive_skips: 3,
            replicas,
            recompute_layers: false,
        }
    }

    #[test]
    fn replicas_share_one_decision_per_step() {
        let s = settings(2);
        assert_eq!(s.samples_per_step(), 12);
        assert_eq!((s.step_of(0), s.step_of(11), s.step_of(12)), (1, 1, 2));
        let run = RunState::new(s, Vec::new());
        let mut p = run.lock();
        p.first_step = 4; // resumed at step 4
        let StepClaim::Decide(step) = p.claim_step("cuda:1") else {
            panic!("the first replica to finish a step decides it")
        };
        assert_eq!(step, 5);
        p.decided(step, false, 0.5, 2);
        // The fast replica may finish step 6 before the slow one applies step 5.
        assert!(matches!(p.claim_step("cuda:1"), StepClaim::Decide(6)));
        p.decided(6, true, 0.25, 2);
        match p.claim_step("cuda:0") {
            StepClaim::Apply(d) => assert!(!d.finite && d.factor == 0.5),
            other => panic!("expected step 5's decision, got {other:?}"),
        }
        match p.claim_step("cuda:0") {
            StepClaim::Apply(d) => assert!(d.finite && d.factor == 0.25),
            other => panic!("expected step 6's decision, got {other:?}"),
        }
        assert!(p.decisions.is_empty(), "applied decisions are dropped");
        assert!(matches!(p.claim_step("cuda:0"), StepClaim::Decide(7)));
    }

    #[test]
    fn one_device_decides_every_step() {
        let run = RunState::new(settings(1), Vec::new());
        let mut p = run.lock();
        for step in 1..=3 {
            assert!(matches!(p.claim_step("cpu"), StepClaim::Decide(s) if s == step));
            p.decided(step, true, 1.0, 1);
            assert!(p.decisions.is_empty());
        }
    }

    #[test]
    fn metrics_round_trip_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        for step in 1..=4 {
            let row = StepRow {
                step,
                epoch: step as f64 / 4.0,
                lr: 1e-4,
                loss: 1.0 / step as f64,
                lm_loss: 0.9 / step as f64,
                aux_loss: 0.1 / step as f64,
                grad_norm: 0.5,
                loss_scale: 1.0,
                skipped: 0,
                tokens: 10,
                samples: 2,
                seconds: step as f64,
                tokens_per_s: 10.0,
                samples_per_s: 2.0,
                expert_share: vec![0.25, 0.75],
            };
            append_row(dir.path(), &row).unwrap();
        }
        let rows = read_rows(dir.path()).unwrap();
        assert_eq!(rows.len(), 4);
        assert!((rows[2].loss - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(rows[3].expert_share, vec![0.25, 0.75]);
        let kept = truncate_rows(dir.path(), 2).unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(read_rows(dir.path()).unwrap().len(), 2);
    }
}
