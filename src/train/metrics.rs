//! burn-train metrics of a caption run (shown by the dashboard and logged per split): loss,
//! LM loss, aux loss, gradient norm, tokens/s, samples/s, skipped steps and each expert's
//! share of routed tokens; plus a silent renderer for runs that print plain log lines.

use std::sync::Arc;
use std::time::Instant;

use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

use super::step::StepOutput;

impl Adaptor<StepOutput> for StepOutput {
    fn adapt(&self) -> StepOutput {
        self.clone()
    }
}

/// What a [`ScalarMetric`] reads from a step's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantity {
    /// LM + aux loss.
    Loss,
    /// Caption cross-entropy.
    LmLoss,
    /// Weighted MoE load-balancing loss.
    AuxLoss,
    /// Gradient norm of the last optimizer step.
    GradNorm,
    /// Tokens per second (wall clock between outputs).
    TokensPerSec,
    /// Samples per second.
    SamplesPerSec,
    /// Steps skipped so far.
    Skipped,
    /// Share of routed tokens that went to expert `e`.
    ExpertShare(usize),
}

/// A numeric metric over one [`Quantity`].
#[derive(Clone)]
pub struct ScalarMetric {
    name: MetricName,
    quantity: Quantity,
    state: NumericMetricState,
    last: Option<Instant>,
}

impl ScalarMetric {
    /// The metric of `quantity` (names are file names in burn's logs: no `/`).
    pub fn new(quantity: Quantity) -> Self {
        let name = match quantity {
            Quantity::Loss => "Loss".to_string(),
            Quantity::LmLoss => "LM loss".into(),
            Quantity::AuxLoss => "Aux loss".into(),
            Quantity::GradNorm => "Grad norm".into(),
            Quantity::TokensPerSec => "Tokens per sec".into(),
            Quantity::SamplesPerSec => "Samples per sec".into(),
            Quantity::Skipped => "Skipped steps".into(),
            Quantity::ExpertShare(e) => format!("Expert {e} share"),
        };
        Self {
            name: Arc::new(name),
            quantity,
            state: NumericMetricState::new(),
            last: None,
        }
    }

    fn unit(&self) -> Option<&'static str> {
        match self.quantity {
            Quantity::TokensPerSec => Some("tok/s"),
            Quantity::SamplesPerSec => Some("samples/s"),
            Quantity::ExpertShare(_) => Some("%"),
            _ => None,
        }
    }
}

impl Metric for ScalarMetric {
    type Input = StepOutput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, item: &StepOutput, _meta: &MetricMetadata) -> SerializedEntry {
        let now = Instant::now();
        let dt = self.last.map(|t| (now - t).as_secs_f64().max(1e-9));
        let value = match self.quantity {
            Quantity::Loss => item.loss,
            Quantity::LmLoss => item.lm_loss,
            Quantity::AuxLoss => item.aux_loss,
            Quantity::GradNorm => item.grad_norm,
            Quantity::TokensPerSec => dt.map(|d| item.tokens as f64 / d).unwrap_or(0.0),
            Quantity::SamplesPerSec => dt.map(|d| item.samples as f64 / d).unwrap_or(0.0),
            Quantity::Skipped => item.skipped as f64,
            Quantity::ExpertShare(e) => {
                let all: usize = item.expert_tokens.iter().sum();
                100.0 * item.expert_tokens.get(e).copied().unwrap_or(0) as f64 / all.max(1) as f64
            }
        };
        self.last = Some(now);
        let mut format = FormatOptions::new(self.name()).precision(4);
        if let Some(u) = self.unit() {
            format = format.unit(u).precision(1);
        }
        self.state.update(value, item.samples.max(1), format)
    }

    fn clear(&mut self) {
        self.state.reset();
        self.last = None;
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: self.unit().map(str::to_string),
            higher_is_better: matches!(
                self.quantity,
                Quantity::TokensPerSec | Quantity::SamplesPerSec
            ),
        }
        .into()
    }
}

impl Numeric for ScalarMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

/// Renders nothing: used when stdout is not a terminal (the run prints its own log lines).
pub struct QuietRenderer;

impl MetricsRendererTraining for QuietRenderer {
    fn update_train(&mut self, _state: MetricState) {}
    fn update_valid(&mut self, _state: MetricState) {}
    fn render_train(&mut self, _item: TrainingProgress, _p: Vec<ProgressType>) {}
    fn render_valid(&mut self, _item: TrainingProgress, _p: Vec<ProgressType>) {}
    fn on_train_end(
        &mut self,
        _summary: Option<burn::train::LearnerSummary>,
    ) -> Result<(), Box<dyn core::error::Error>> {
        Ok(())
    }
}

impl MetricsRendererEvaluation for QuietRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
    fn render_test(&mut self, _item: EvaluationProgress, _p: Vec<ProgressType>) {}
}

impl MetricsRenderer for QuietRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: burn::train::metric::MetricDefinition) {}
}
