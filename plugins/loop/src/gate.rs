//! The eval gate: whether a freshly trained candidate adapter may replace the promoted one.
//!
//! A candidate is promoted only when both hold:
//!
//! - its held-out score (the configured [`GateMetric`]) is not worse than the incumbent's by
//!   more than [`GateConfig::margin`], both measured on the same questions with the same seeds;
//! - the ISDD alarm did not fire during its training round ([`isdd_alarm`]).
//!
//! The ISDD alarm reads the trainer's per-step metrics. Importance-sampling distribution drift
//! shows as the ratio `r = π_θ / π_old` collapsing toward 0 on tokens the update should have made
//! *more* likely (positive advantage), and as entropy rising: the alarm fires when, at any
//! optimizer step, the fraction of positive-advantage tokens with `r < 0.1` passes its bound,
//! the mean ratio leaves its band, or entropy spikes: on the step's own tokens it passes both a
//! multiple of the sampler's entropy and that entropy plus an absolute rise. The sampler's
//! entropy is estimated by the sampled tokens' surprisal under the policy that drew them (the
//! mean of `-logp_old`, whose expectation it is), so the comparison is between the same tokens
//! before and after the update; comparing with the round's first step instead measured which
//! prompts and kinds each shuffled mini-batch held (0.41 against 0.96 nats between two steps of
//! one healthy round). Both bounds are needed because at a low serving temperature entropy is
//! small (about 0.05 nats per token), where a 1.6x "rise" is noise. The trainer reports the mean
//! ratio over all trained tokens (not split by the advantage's sign), so that bound reads the
//! all-token mean.

use searchloop_train_sapo::StepMetrics;
use serde::{Deserialize, Serialize};

use crate::error::{LoopError, Result};

pub use searchloop_learn::EvalReport;

/// The held-out score the gate compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    /// Exact match.
    #[default]
    Em,
    /// Token F1.
    F1,
    /// The mean episode reward (exact match, F1 and format, weighted as the agent config says).
    Reward,
}

impl GateMetric {
    /// The metric's value in `report`.
    pub fn of(self, report: &EvalReport) -> f64 {
        match self {
            GateMetric::Em => report.em,
            GateMetric::F1 => report.f1,
            GateMetric::Reward => report.mean_reward,
        }
    }

    /// The metric's name as configured.
    pub fn name(self) -> &'static str {
        match self {
            GateMetric::Em => "em",
            GateMetric::F1 => "f1",
            GateMetric::Reward => "reward",
        }
    }
}

/// Bounds of the ISDD alarm, checked at every optimizer step of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IsddBounds {
    /// Largest fraction of positive-advantage tokens whose ratio fell below 0.1.
    pub max_collapsed_fraction: f64,
    /// Smallest mean ratio over trained tokens.
    pub min_ratio_mean: f64,
    /// Largest mean ratio over trained tokens.
    pub max_ratio_mean: f64,
    /// Largest entropy at any step, as a multiple of the sampler's entropy on the same tokens
    /// ...
    pub max_entropy_rise: f64,
    /// ... and above it by at least this many nats.
    pub min_entropy_rise_nats: f64,
}

impl Default for IsddBounds {
    fn default() -> Self {
        // A healthy PPO step keeps ratios within a few percent of 1 and barely moves the
        // entropy; these bounds leave room for the noise of small batches and fire only on the
        // collapse pattern.
        Self {
            max_collapsed_fraction: 0.05,
            min_ratio_mean: 0.5,
            max_ratio_mean: 2.0,
            max_entropy_rise: 1.5,
            min_entropy_rise_nats: 0.5,
        }
    }
}

impl IsddBounds {
    /// Checks that the bounds are meaningful.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: f64, want: &str| {
            Err(LoopError::Config(format!(
                "learn.gate.isdd.{field} must be {want}, got {value}"
            )))
        };
        if !(0.0..=1.0).contains(&self.max_collapsed_fraction) {
            return bad(
                "max_collapsed_fraction",
                self.max_collapsed_fraction,
                "in [0, 1]",
            );
        }
        if !self.min_ratio_mean.is_finite() || self.min_ratio_mean < 0.0 {
            return bad("min_ratio_mean", self.min_ratio_mean, "finite and >= 0");
        }
        if !self.max_ratio_mean.is_finite() || self.max_ratio_mean <= self.min_ratio_mean {
            return bad(
                "max_ratio_mean",
                self.max_ratio_mean,
                "finite and above min_ratio_mean",
            );
        }
        if !self.max_entropy_rise.is_finite() || self.max_entropy_rise <= 1.0 {
            return bad("max_entropy_rise", self.max_entropy_rise, "finite and > 1");
        }
        if !self.min_entropy_rise_nats.is_finite() || self.min_entropy_rise_nats < 0.0 {
            return bad(
                "min_entropy_rise_nats",
                self.min_entropy_rise_nats,
                "finite and >= 0",
            );
        }
        Ok(())
    }
}

/// The `[learn.gate]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// The held-out metric compared.
    pub metric: GateMetric,
    /// How much worse than the incumbent a candidate may score and still be promoted.
    pub margin: f64,
    /// The ISDD alarm's bounds.
    pub isdd: IsddBounds,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            metric: GateMetric::Em,
            margin: 0.0,
            isdd: IsddBounds::default(),
        }
    }
}

impl GateConfig {
    /// Checks the margin and the bounds.
    pub fn validate(&self) -> Result<()> {
        if !self.margin.is_finite() || !(0.0..=1.0).contains(&self.margin) {
            return Err(LoopError::Config(format!(
                "learn.gate.margin must be in [0, 1], got {}",
                self.margin
            )));
        }
        self.isdd.validate()
    }
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum GateVerdict {
    /// Promote the candidate.
    Promote,
    /// Keep the incumbent; the reason is recorded in the registry.
    Reject {
        /// Why, with the numbers.
        reason: String,
    },
}

/// How every reason [`isdd_alarm`] gives begins, so reports can count the alarms among a
/// round's rejections.
pub const ISDD_ALARM: &str = "ISDD alarm";

/// The ISDD alarm: `Some(reason)` when any step of `steps` breaks `bounds`.
///
/// Steps without trained tokens (NaN means) are skipped, as is the entropy check when the trainer
/// recorded no entropy (then it recorded no surprisal either).
pub fn isdd_alarm(steps: &[StepMetrics], bounds: &IsddBounds) -> Option<String> {
    for s in steps.iter().filter(|s| s.loss.tokens > 0) {
        let m = &s.loss;
        if m.positive_tokens > 0 && m.ratio_below_tenth_pos > bounds.max_collapsed_fraction {
            return Some(format!(
                "{ISDD_ALARM} at step {}: {:.3} of positive-advantage tokens have ratio < 0.1 \
                 (bound {})",
                s.step, m.ratio_below_tenth_pos, bounds.max_collapsed_fraction
            ));
        }
        if !m.ratio_mean.is_finite()
            || m.ratio_mean < bounds.min_ratio_mean
            || m.ratio_mean > bounds.max_ratio_mean
        {
            return Some(format!(
                "{ISDD_ALARM} at step {}: mean ratio {:.4} is outside [{}, {}]",
                s.step, m.ratio_mean, bounds.min_ratio_mean, bounds.max_ratio_mean
            ));
        }
        let sampled = m.behaviour_surprisal_mean;
        if sampled.is_finite()
            && m.entropy_mean.is_finite()
            && m.entropy_mean > sampled * bounds.max_entropy_rise
            && m.entropy_mean > sampled + bounds.min_entropy_rise_nats
        {
            return Some(format!(
                "{ISDD_ALARM} at step {}: entropy {:.4} rose past {} x and {} nats above the \
                 sampler's {:.4} on the same tokens",
                s.step,
                m.entropy_mean,
                bounds.max_entropy_rise,
                bounds.min_entropy_rise_nats,
                sampled
            ));
        }
    }
    None
}

/// Judges `candidate` against `incumbent` (evaluated on the same questions with the same seeds)
/// by the configured metric and margin. The ISDD alarm is checked before, with [`isdd_alarm`]:
/// it needs no evaluation.
pub fn judge(candidate: &EvalReport, incumbent: &EvalReport, config: &GateConfig) -> GateVerdict {
    let metric = config.metric;
    let (c, i) = (metric.of(candidate), metric.of(incumbent));
    if candidate.n == 0 || !c.is_finite() {
        return GateVerdict::Reject {
            reason: format!("the candidate's held-out {} is unknown", metric.name()),
        };
    }
    if c < i - config.margin {
        return GateVerdict::Reject {
            reason: format!(
                "held-out {} {c:.4} is worse than the promoted model's {i:.4} by more than the \
                 margin {} ({} questions)",
                metric.name(),
                config.margin,
                candidate.n
            ),
        };
    }
    GateVerdict::Promote
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step whose tokens have `entropy` now and `surprisal` under the sampler.
    fn step(
        step: usize,
        ratio_mean: f64,
        collapsed: f64,
        (entropy, surprisal): (f64, f64),
    ) -> StepMetrics {
        let loss = serde_json::json!({
            "loss": 0.0, "pg_loss": 0.0, "sapo_loss": 0.0, "kl_ref_loss": 0.0,
            "tokens": 100, "positive_tokens": 60, "negative_tokens": 40,
            "ratio_mean": ratio_mean, "ratio_min": 0.0, "ratio_max": 2.0,
            "ratio_below_t_pos": collapsed, "ratio_below_t_neg": 0.0,
            "ratio_below_half_pos": collapsed, "ratio_below_half_neg": 0.0,
            "ratio_below_tenth_pos": collapsed, "ratio_below_tenth_neg": 0.0,
            "sapo_active_frac": 0.0, "clip_frac": 0.0, "approx_kl_k1": 0.0,
            "approx_kl_k3": 0.0, "kl_ref_k3": 0.0, "entropy_mean": entropy,
            "behaviour_surprisal_mean": surprisal,
        });
        serde_json::from_value(serde_json::json!({
            "step": step, "epoch": 0, "learning_rate": 1e-5, "grad_norm": 0.1,
            "sequences": 8, "loss": loss,
        }))
        .unwrap()
    }

    fn report(em: f64) -> EvalReport {
        EvalReport {
            n: 10,
            em,
            f1: em,
            mean_reward: em,
            right_tools: None,
            by_kind: Default::default(),
        }
    }

    #[test]
    fn healthy_steps_do_not_alarm() {
        let steps = [
            step(1, 1.0, 0.0, (1.2, 1.1)),
            step(2, 0.98, 0.01, (1.3, 1.25)),
        ];
        assert_eq!(isdd_alarm(&steps, &IsddBounds::default()), None);
        // A small entropy that grows by a large factor but a few hundredths of a nat is noise
        // (measured: 0.048 to 0.079 at the serving temperature).
        let cold = [
            step(1, 1.0, 0.0, (0.048, 0.048)),
            step(2, 1.0, 0.0, (0.079, 0.03)),
        ];
        assert_eq!(isdd_alarm(&cold, &IsddBounds::default()), None);
        // A later mini-batch of other prompts whose tokens the sampler was less sure of is not
        // drift, however far its entropy is from the first step's (measured in a healthy round:
        // 0.411, then 0.957).
        let other_prompts = [
            step(1, 1.0, 0.0, (0.411, 0.40)),
            step(2, 1.0, 0.0, (0.957, 0.90)),
        ];
        assert_eq!(isdd_alarm(&other_prompts, &IsddBounds::default()), None);
    }

    #[test]
    fn each_collapse_signal_fires_the_alarm() {
        let bounds = IsddBounds::default();
        let cases = [
            (
                vec![step(1, 1.0, 0.0, (1.0, 1.0)), step(2, 0.9, 0.3, (1.0, 1.0))],
                "ratio < 0.1",
            ),
            (vec![step(1, 0.2, 0.0, (1.0, 1.0))], "mean ratio"),
            (vec![step(1, 7.0, 0.0, (1.0, 1.0))], "mean ratio"),
            (
                vec![step(1, 1.0, 0.0, (1.0, 1.0)), step(2, 1.0, 0.0, (2.0, 1.0))],
                "entropy",
            ),
            // The first step's tokens count as much as any other's.
            (vec![step(1, 1.0, 0.0, (1.6, 0.5))], "entropy"),
        ];
        for (steps, expected) in cases {
            let reason = isdd_alarm(&steps, &bounds).expect("the alarm fires");
            assert!(reason.contains(expected), "{reason}");
        }
    }

    #[test]
    fn the_gate_weighs_the_margin() {
        let config = GateConfig {
            margin: 0.05,
            ..GateConfig::default()
        };
        assert_eq!(
            judge(&report(0.30), &report(0.33), &config),
            GateVerdict::Promote
        );
        let GateVerdict::Reject { reason } = judge(&report(0.20), &report(0.33), &config) else {
            panic!("a worse candidate is rejected");
        };
        assert!(reason.contains("worse"), "{reason}");
        let empty = EvalReport {
            n: 0,
            ..report(0.0)
        };
        assert!(matches!(
            judge(&empty, &report(0.0), &config),
            GateVerdict::Reject { .. }
        ));
    }

    #[test]
    fn bad_gate_configs_are_refused() {
        let mut config = GateConfig {
            margin: -0.1,
            ..GateConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("margin")
        );
        config.margin = 0.0;
        config.isdd.max_entropy_rise = 0.5;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("max_entropy_rise")
        );
    }
}
