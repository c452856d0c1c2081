//! GRPO advantages and the policy-loss family: GRPO, GRPO + SAPO, GSPO, CISPO and GRPO + LLDS,
//! each optionally weighted by a sampler→behaviour importance correction ([`crate::correction`]),
//! with the metrics that expose importance-sampling distribution drift.
//!
//! Per generated token, with `r = exp(logp_theta - logp_old)`, `Δ = logp_old - logp_theta`, the
//! sequence's advantage `A`, `lo = 1 - clip_eps` and `hi = 1 + clip_eps_high` (`clip_eps` unless
//! set), the policy-gradient term `L_pg` of each [`LossKind`] is:
//!
//! ```text
//! grpo   L_pg = -min(r·A, clip(r, lo, hi)·A)                          aggregated per `aggregation`
//! sapo   L_pg(grpo) + w · (1/N_pos) Σ_{A >= 0} 1[r <= t] · Δ
//! gspo   -min(s·A, clip(s, 1-ε, 1+ε_high)·A) per sequence, s = exp(mean_t log r); sequence mean
//! cispo  gradient -sg[clip(r, w_min, w_max)] · A · ∇logp_theta          aggregated per `aggregation`
//! llds   L_pg(grpo) + λ · (1/N_pos) Σ_{A >= 0} Σ_actions 1[Σ_action Δ > 0] · Σ_k max(0, Δ_k)
//! L      = L_pg (· the correction's weight c per token) + the SAPO or LLDS term
//!          (+ beta · k3(ref, theta), token-mean)
//! ```
//!
//! `N_pos` counts the unmasked tokens of sequences with `A >= 0`.
//!
//! **GRPO** is the standard PPO clipped surrogate. DESIGN.md sketches it as `-A · min(r, clip(r))`,
//! which differs for `A < 0`; the sketch means the standard form, which is what is implemented:
//! for `A >= 0` the token is clipped (zero gradient) when `r > hi`, for `A < 0` when `r < lo`,
//! and otherwise its gradient is `-A·r·∇logp`. A `clip_eps_high` above `clip_eps` is DAPO's
//! clip-higher (arXiv 2503.14476: 0.2 and 0.28), which with `aggregation = "token_mean"` is
//! DAPO's loss; `aggregation = "seq_mean_token_sum"` with [`AdvantageConfig::scale_by_std`] off
//! is Dr. GRPO's.
//!
//! **SAPO** ("Search Agent Policy Optimization", arXiv 2603.10069) adds a k1 term on positive
//! tokens whose ratio fell to `t` or below. The indicator `1[r <= t]` and the sign of `A` are
//! evaluated without gradient; the term's gradient is `-w·∇logp / N_pos`, not scaled by `r`,
//! which is what pulls back positive tokens whose probability collapsed. When there are no
//! unmasked tokens with `A >= 0` the term is 0 (never 0/0). With `w = 0` the term is not built
//! at all, so the loss and its gradients are exactly GRPO's.
//!
//! **GSPO** (Zheng et al., arXiv 2507.18071, eqs. 5 and 7) clips the length-normalised sequence
//! ratio `s` instead of each token's, and averages over sequences whatever `aggregation` says
//! (its objective is a mean over the group's responses). The gradient of an unclipped sequence is
//! `-A·s/|y|·Σ_t ∇logp_t`, so with all token ratios of a sequence equal to `r` it is GRPO's
//! sequence-mean gradient, and on a one-token sequence it is GRPO.
//!
//! **CISPO** (MiniMax-M1, arXiv 2506.13585, eqs. 4 and 5) never drops a token: it is REINFORCE
//! with the detached, clipped token ratio as weight, so a token outside the trust region keeps a
//! capped gradient where PPO's would be zero. The paper writes the objective as
//! `sg[ŵ]·A·log π`, whose value means nothing (only its gradient is used) and jumps with the
//! weight. The value computed here is instead a potential of the very same gradient, continuous
//! in θ: `-A·r` while `r` is inside the band and `-A·b·(1 + ln(r/b))` past a bound `b`. So the
//! loss is comparable with GRPO's (on-policy, `r = 1`, both value and gradient are GRPO's), and
//! finite differences of the value check the gradient.
//!
//! **LLDS** (Deng et al., "On GRPO Collapse in Agent Search: The Lazy Likelihood-Displacement",
//! arXiv 2512.04220 v2, Eq. (4), added to GRPO as in Eq. (6)) penalises the likelihood that
//! preserved responses (`A >= 0`, zero-advantage ones included) lost since sampling. An action is
//! one model turn: a maximal run of trained positions, which in our sequences are the spans
//! between masked tool observations. An action whose summed displacement `Σ_k Δ_k` is positive
//! (strictly: on-policy nothing activates) has its tokens with `Δ_k > 0` pulled back with
//! gradient `-λ·∇logp / N_pos`. The gate and the hinge's side are decided without gradient, as in
//! the authors' code. `N` of Eq. (4) is read as the token count of the preserved responses,
//! `N_pos`; the authors' code averages over all trained tokens instead.
//!
//! All host-side decisions (clipping, indicators, gates) are made on exact copies of the floats
//! the device holds, so they agree with the values they select.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::correction::{IsCorrection, correction_weights};
use crate::error::{Result, TrainError};

/// How per-token policy-gradient terms are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Sum over all unmasked tokens divided by their count (DAPO / Dr. GRPO style).
    #[default]
    TokenMean,
    /// Mean over sequences of each sequence's token mean (the original GRPO form).
    SeqMeanTokenMean,
    /// Mean over sequences of each sequence's token sum divided by a constant, `norm_tokens`
    /// (Dr. GRPO, arXiv 2503.20783): no sequence's tokens are scaled by its own length, which
    /// is the length bias Dr. GRPO removes.
    SeqMeanTokenSum,
}

/// Which policy loss the trainer minimises (see the module docs for each formula).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// The PPO clipped surrogate on group-relative advantages.
    Grpo,
    /// GRPO plus SAPO's term (`sapo_weight`, `sapo_threshold`); the default, since SAPO is what
    /// this trainer was built around, and with `sapo_weight = 0` it is GRPO.
    #[default]
    Sapo,
    /// GSPO: the clipped surrogate on the length-normalised sequence ratio (`gspo_clip_eps`,
    /// `gspo_clip_eps_high`).
    Gspo,
    /// CISPO: REINFORCE weighted by the detached token ratio clipped to
    /// [`cispo_min_weight`, `cispo_max_weight`].
    Cispo,
    /// GRPO plus the LLDS regulariser with the action-level gate (`llds_lambda`).
    Llds,
}

impl LossKind {
    /// The name config files and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpo => "grpo",
            Self::Sapo => "sapo",
            Self::Gspo => "gspo",
            Self::Cispo => "cispo",
            Self::Llds => "llds",
        }
    }
}

/// Hyper-parameters of the policy loss. Each kind reads its own fields and ignores the others'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Config files name only the fields they change, and a misspelt field is an error.
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Which loss.
    pub kind: LossKind,
    /// PPO clip range `eps` of `grpo`, `sapo` and `llds`: below 1 always, above 1 too unless
    /// `clip_eps_high` is set.
    pub clip_eps: f64,
    /// DAPO's clip-higher: the clip range above 1, when it should differ from `clip_eps` (DAPO
    /// uses 0.28 with 0.2 below). Absent: `clip_eps`, a symmetric range.
    pub clip_eps_high: Option<f64>,
    /// SAPO weight `w`; 0 gives plain GRPO.
    pub sapo_weight: f64,
    /// SAPO ratio threshold `t`: the term is active on positive tokens with `r <= t`.
    pub sapo_threshold: f64,
    /// GSPO's clip range below 1 of the sequence ratio. The paper's 3e-4 fits sequence ratios,
    /// which stay far closer to 1 than token ratios do.
    pub gspo_clip_eps: f64,
    /// GSPO's clip range above 1 (the paper's 4e-4).
    pub gspo_clip_eps_high: f64,
    /// CISPO's lower bound on the token weight. The paper sets its `ε_low` so large that there
    /// is no lower bound: 0.
    pub cispo_min_weight: f64,
    /// CISPO's cap on the token weight. The paper gives no number; 5 is ScaleRL's, recommended
    /// by TRL and used by ART (`ε_high = 4`).
    pub cispo_max_weight: f64,
    /// LLDS weight `λ`: 0.2, the paper's for all models but one, the smallest that prevented
    /// collapse in its ablation.
    pub llds_lambda: f64,
    /// The sampler→behaviour correction of the policy-gradient term. It needs the trainer's
    /// recomputed behaviour log-probs beside the recorded ones (`old_logprobs = "recompute"`).
    pub is_correction: IsCorrection,
    /// Lower bound of the correction's band on `π_old / π_sampler` (the sequence's ratio for
    /// `mis`, its geometric mean for `geo`). Absent: the correction's default.
    pub is_min: Option<f64>,
    /// Upper bound of the correction's band. Absent: the correction's default (2 for `tis` and
    /// `mis`, 5 for `icepop`, 1.001 for `geo`).
    pub is_max: Option<f64>,
    /// Weight `beta` of the k3 KL penalty to the reference (base) model; 0 disables it.
    pub kl_beta: f64,
    /// How the policy-gradient term is averaged (GSPO always averages over sequences).
    pub aggregation: LossAggregation,
    /// The constant `aggregation = "seq_mean_token_sum"` divides each sequence's token sum by:
    /// Dr. GRPO's maximum generation length. It only scales the step, like a learning rate.
    pub norm_tokens: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            kind: LossKind::Sapo,
            clip_eps: 0.2,
            clip_eps_high: None,
            sapo_weight: 0.1,
            sapo_threshold: 0.8,
            gspo_clip_eps: 3e-4,
            gspo_clip_eps_high: 4e-4,
            cispo_min_weight: 0.0,
            cispo_max_weight: 5.0,
            llds_lambda: 0.2,
            is_correction: IsCorrection::None,
            is_min: None,
            is_max: None,
            kl_beta: 0.0,
            aggregation: LossAggregation::TokenMean,
            norm_tokens: 1024.0,
        }
    }
}

impl LossConfig {
    /// Checks every value and refuses the compositions that have no meaning.
    ///
    /// Every correction composes with `grpo`, `sapo`, `cispo` and `llds`, whose terms are per
    /// token. `gspo` takes only the sequence-level ones (`mis`, `geo`): it replaces token ratios
    /// by one ratio per sequence because token-level importance weights are noisy within a
    /// sequence, and a token-level correction (`tis`, `icepop`) would bring them back. Bounds
    /// without a correction are refused too, since they would silently do nothing.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(TrainError::Config(msg));
        for (name, value) in [
            ("sapo_weight", self.sapo_weight),
            ("llds_lambda", self.llds_lambda),
            ("kl_beta", self.kl_beta),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(format!("{name} must be a finite number >= 0, got {value}"));
            }
        }
        for (name, value) in [
            ("clip_eps", self.clip_eps),
            ("gspo_clip_eps", self.gspo_clip_eps),
        ] {
            if !(value > 0.0 && value < 1.0) {
                return bad(format!("{name} must be in (0, 1), got {value}"));
            }
        }
        for (name, value) in [
            ("clip_eps_high", self.clip_eps_high.unwrap_or(self.clip_eps)),
            ("gspo_clip_eps_high", self.gspo_clip_eps_high),
            ("sapo_threshold", self.sapo_threshold),
            ("norm_tokens", self.norm_tokens),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("{name} must be a finite number > 0, got {value}"));
            }
        }
        // Weight 1 must lie inside both bands, so that on-policy tokens and a sampler that
        // agrees with the trainer are left alone.
        let brackets_one =
            |(min, max): (f64, f64)| (0.0..=1.0).contains(&min) && max >= 1.0 && max.is_finite();
        let (min, max) = (self.cispo_min_weight, self.cispo_max_weight);
        if !brackets_one((min, max)) {
            return bad(format!(
                "cispo_min_weight and cispo_max_weight must satisfy 0 <= min <= 1 <= max < inf, \
                 got {min} and {max}"
            ));
        }
        let correction = self.is_correction;
        match self.is_band() {
            None if self.is_min.is_some() || self.is_max.is_some() => {
                return bad(
                    "is_min and is_max bound a sampler correction, but is_correction is \"none\""
                        .to_string(),
                );
            }
            Some((min, max)) if !brackets_one((min, max)) => {
                return bad(format!(
                    "the band of is_correction = \"{}\" must satisfy 0 <= is_min <= 1 <= \
                     is_max < inf, got [{min}, {max}]",
                    correction.name()
                ));
            }
            _ => {}
        }
        if self.kind == LossKind::Gspo
            && correction != IsCorrection::None
            && !correction.per_sequence()
        {
            return bad(format!(
                "kind = \"gspo\" cannot take is_correction = \"{}\": GSPO weights whole \
                 sequences, and a per-token correction would bring back the token-level \
                 importance weights it removes; use \"mis\" or \"geo\", which decide per sequence",
                correction.name()
            ));
        }
        Ok(())
    }

    /// The PPO clip bounds `(lo, hi)` of `grpo`, `sapo` and `llds`.
    fn ppo_bounds(&self) -> (f64, f64) {
        (
            1.0 - self.clip_eps,
            1.0 + self.clip_eps_high.unwrap_or(self.clip_eps),
        )
    }

    /// The correction's band with the defaults filled in; `None` without a correction.
    pub fn is_band(&self) -> Option<(f64, f64)> {
        let (min, max) = self.is_correction.default_band()?;
        Some((self.is_min.unwrap_or(min), self.is_max.unwrap_or(max)))
    }
}

/// How rewards become advantages within each group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Config files name only the fields they change, and a misspelt field is an error.
#[serde(default, deny_unknown_fields)]
pub struct AdvantageConfig {
    /// Divide by the group's standard deviation (GRPO). `false` is Dr. GRPO (centre only).
    pub scale_by_std: bool,
    /// Drop groups whose rewards are all equal: they carry no GRPO signal.
    pub skip_zero_std_groups: bool,
    /// Added to the standard deviation before dividing.
    pub std_eps: f64,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            scale_by_std: true,
            skip_zero_std_groups: true,
            std_eps: 1e-6,
        }
    }
}

/// Advantages of a batch of sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One advantage per input sequence (0 for sequences of skipped groups).
    pub values: Vec<f64>,
    /// Whether each sequence should be trained on.
    pub keep: Vec<bool>,
    /// Number of distinct groups.
    pub groups: usize,
    /// Number of groups whose rewards were all equal (including groups of one).
    pub zero_std_groups: usize,
}

/// Computes `A_i = (R_i - mean) / (std + eps)` within each group (or `R_i - mean` for Dr. GRPO).
///
/// The standard deviation is the unbiased sample estimate (`n - 1` in the denominator), as in
/// TRL and verl. A group of one has no spread and counts as a zero-std group.
///
/// A sequence with a baseline (`baselines[i]` is `Some(b)`) is not grouped: its advantage is
/// `R_i - b`, unscaled, since a single episode has no spread to scale by. It counts as a group
/// of its own, a zero-std one when `R_i = b`.
pub fn group_advantages<S: AsRef<str>>(
    rewards: &[f64],
    group_ids: &[S],
    baselines: &[Option<f64>],
    config: &AdvantageConfig,
) -> Result<Advantages> {
    if rewards.len() != group_ids.len() || rewards.len() != baselines.len() {
        return Err(TrainError::InvalidInput(format!(
            "{} rewards but {} group ids and {} baselines",
            rewards.len(),
            group_ids.len(),
            baselines.len()
        )));
    }
    if let Some(bad) = rewards
        .iter()
        .chain(baselines.iter().flatten())
        .find(|r| !r.is_finite())
    {
        return Err(TrainError::InvalidInput(format!(
            "non-finite reward or baseline {bad}"
        )));
    }
    let mut members: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut values = vec![0.0; rewards.len()];
    let mut keep = vec![true; rewards.len()];
    let mut zero_std_groups = 0;
    let mut singles = 0;
    for (i, (g, baseline)) in group_ids.iter().zip(baselines).enumerate() {
        match baseline {
            None => members.entry(g.as_ref()).or_default().push(i),
            Some(b) => {
                singles += 1;
                values[i] = rewards[i] - b;
                if values[i].abs() <= 1e-12 {
                    zero_std_groups += 1;
                    values[i] = 0.0;
                    keep[i] = !config.skip_zero_std_groups;
                }
            }
        }
    }
    for idx in members.values() {
        let n = idx.len() as f64;
        let mean = idx.iter().map(|&i| rewards[i]).sum::<f64>() / n;
        let var = if idx.len() > 1 {
            idx.iter()
                .map(|&i| (rewards[i] - mean).powi(2))
                .sum::<f64>()
                / (n - 1.0)
        } else {
            0.0
        };
        let std = var.sqrt();
        let zero_std = std <= 1e-12;
        if zero_std {
            zero_std_groups += 1;
        }
        for &i in idx {
            values[i] = if config.scale_by_std {
                (rewards[i] - mean) / (std + config.std_eps)
            } else {
                rewards[i] - mean
            };
            if zero_std {
                // Equal rewards give (up to rounding) zero advantages; make them exactly zero.
                values[i] = 0.0;
                keep[i] = !config.skip_zero_std_groups;
            }
        }
    }
    Ok(Advantages {
        values,
        keep,
        groups: members.len() + singles,
        zero_std_groups,
    })
}

/// Denominators of the loss averages. For gradient accumulation they must describe the whole
/// mini-batch, so that the micro-batch losses add up to the mini-batch loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossNormalizer {
    /// Unmasked tokens (token-mean denominator).
    pub tokens: f64,
    /// Unmasked tokens in sequences with `A >= 0` (SAPO and LLDS denominator).
    pub positive_tokens: f64,
    /// Sequences with at least one unmasked token (seq-mean denominator).
    pub sequences: f64,
}

impl LossNormalizer {
    /// Counts from host data: one mask row and one advantage per sequence.
    pub fn from_host<M: AsRef<[bool]>>(masks: &[M], advantages: &[f64]) -> Result<Self> {
        if masks.len() != advantages.len() {
            return Err(TrainError::InvalidInput(format!(
                "{} masks but {} advantages",
                masks.len(),
                advantages.len()
            )));
        }
        let mut n = Self {
            tokens: 0.0,
            positive_tokens: 0.0,
            sequences: 0.0,
        };
        for (mask, &a) in masks.iter().zip(advantages) {
            let count = mask.as_ref().iter().filter(|&&m| m).count() as f64;
            n.tokens += count;
            if a >= 0.0 {
                n.positive_tokens += count;
            }
            if count > 0.0 {
                n.sequences += 1.0;
            }
        }
        Ok(n)
    }

    fn from_tensors(mask: &Tensor, advantages: &[f64]) -> Result<Self> {
        let rows: Vec<Vec<bool>> = mask
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?
            .into_iter()
            .map(|row| row.into_iter().map(|m| m > 0.0).collect())
            .collect();
        Self::from_host(&rows, advantages)
    }
}

/// Inputs of [`policy_loss`]; every per-token tensor is `(B, L)` in one float dtype.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossInputs<'a> {
    /// Current policy log-probs of the taken tokens; the loss is differentiated through these.
    pub logp: &'a Tensor,
    /// Behaviour (old) policy log-probs; treated as constants.
    pub logp_old: &'a Tensor,
    /// The sampler's recorded log-probs, needed by a sampler correction (`is_correction`), for
    /// which `logp_old` is the trainer's recomputation of the same policy; treated as constants.
    pub logp_sampler: Option<&'a Tensor>,
    /// 1 for trained (model-generated) tokens, 0 for prompt, tool output and padding.
    pub mask: &'a Tensor,
    /// `(B,)` one advantage per sequence.
    pub advantages: &'a Tensor,
    /// Reference-model log-probs, needed when `kl_beta != 0`.
    pub ref_logp: Option<&'a Tensor>,
    /// Per-token entropy, for the metrics only.
    pub entropy: Option<&'a Tensor>,
    /// Denominators; computed from this batch when `None`.
    pub normalizer: Option<LossNormalizer>,
}

/// Diagnostics of one loss evaluation. Loss fields are contributions to the mini-batch loss
/// (they add up across micro-batches that share a [`LossNormalizer`]); the rest are means over
/// the stated token sets. Fields added after the first metrics files were written default when
/// absent, so those files still read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossMetrics {
    /// Total loss.
    pub loss: f64,
    /// Policy-gradient term (after the sampler correction, when there is one).
    pub pg_loss: f64,
    /// SAPO term (already multiplied by `w`); 0 for the other kinds.
    pub sapo_loss: f64,
    /// LLDS term (already multiplied by `λ`); 0 for the other kinds.
    #[serde(default)]
    pub llds_loss: f64,
    /// KL-to-reference term (already multiplied by `beta`).
    pub kl_ref_loss: f64,
    /// Unmasked tokens.
    pub tokens: usize,
    /// Unmasked tokens with `A >= 0`.
    pub positive_tokens: usize,
    /// Unmasked tokens with `A < 0`.
    pub negative_tokens: usize,
    /// Sequences with at least one unmasked token.
    #[serde(default)]
    pub sequences: usize,
    /// Mean of `r` over unmasked tokens.
    pub ratio_mean: f64,
    /// Minimum of `r` over unmasked tokens (NaN when there are none).
    pub ratio_min: f64,
    /// Maximum of `r` over unmasked tokens (NaN when there are none).
    pub ratio_max: f64,
    /// Fraction of `A >= 0` tokens with `r < t`.
    pub ratio_below_t_pos: f64,
    /// Fraction of `A < 0` tokens with `r < t`.
    pub ratio_below_t_neg: f64,
    /// Fraction of `A >= 0` tokens with `r < 0.5`.
    pub ratio_below_half_pos: f64,
    /// Fraction of `A < 0` tokens with `r < 0.5`.
    pub ratio_below_half_neg: f64,
    /// Fraction of `A >= 0` tokens with `r < 0.1`.
    pub ratio_below_tenth_pos: f64,
    /// Fraction of `A < 0` tokens with `r < 0.1`.
    pub ratio_below_tenth_neg: f64,
    /// Mean over sequences of the length-normalised sequence ratio `s = exp(mean_t log r)`, the
    /// ratio GSPO clips (measured whatever the kind); `None` without trained sequences.
    pub seq_ratio_mean: Option<f64>,
    /// Minimum over sequences of `s`; `None` without trained sequences.
    pub seq_ratio_min: Option<f64>,
    /// Fraction of unmasked tokens where the SAPO indicator is on (`A >= 0` and `r <= t`),
    /// whatever the kind: it measures drift even where no SAPO term is built.
    pub sapo_active_frac: f64,
    /// Fraction of unmasked tokens where the LLDS term is active (a preserved response, an
    /// action with positive summed displacement, a token with `Δ > 0`); 0 for the other kinds.
    #[serde(default)]
    pub llds_active_frac: f64,
    /// Fraction of unmasked tokens that are clipped: zero-gradient surrogates for the PPO-style
    /// kinds (for GSPO, the tokens of clipped sequences), truncated weights for CISPO (whose
    /// tokens keep a gradient).
    pub clip_frac: f64,
    /// Mean sampler-correction weight over unmasked tokens; `None` without a correction.
    pub is_weight_mean: Option<f64>,
    /// Fraction of `A >= 0` tokens whose correction weight was truncated (`tis`) or that were
    /// masked (`icepop`, `mis`, `geo`); `None` without a correction.
    pub is_clip_frac_pos: Option<f64>,
    /// The same fraction among `A < 0` tokens.
    pub is_clip_frac_neg: Option<f64>,
    /// k1 estimate of KL(old || new): mean of `logp_old - logp`.
    pub approx_kl_k1: f64,
    /// k3 estimate of KL(old || new): mean of `r - 1 - log r`.
    pub approx_kl_k3: f64,
    /// Mean k3 KL to the reference model (NaN without reference log-probs).
    pub kl_ref_k3: f64,
    /// Mean entropy over unmasked tokens (NaN without entropies).
    pub entropy_mean: f64,
    /// Mean of `-logp_old` over the same tokens, when entropies are measured: the surprisal of
    /// each sampled token under the policy that sampled it, whose expectation is that policy's
    /// entropy at that position. Beside [`LossMetrics::entropy_mean`] it says how far the
    /// entropy moved from the sampler's on these very tokens, whatever the batch holds (NaN
    /// without entropies).
    #[serde(default = "unmeasured")]
    pub behaviour_surprisal_mean: f64,
}

/// The value of a mean that was not measured.
fn unmeasured() -> f64 {
    f64::NAN
}

/// The mean of two means over `na` and `nb` items.
fn wmean(a: f64, na: usize, b: f64, nb: usize) -> f64 {
    match (na, nb) {
        (0, 0) => a,
        (0, _) => b,
        (_, 0) => a,
        _ => (a * na as f64 + b * nb as f64) / (na + nb) as f64,
    }
}

/// [`wmean`] of optional means: a missing one contributes nothing.
fn wmean_opt(a: Option<f64>, na: usize, b: Option<f64>, nb: usize) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(wmean(a, na, b, nb)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl LossMetrics {
    /// Folds another micro-batch's metrics into these: losses add, means are weighted by their
    /// token (or sequence) counts, extremes combine.
    pub fn merge(&mut self, o: &LossMetrics) {
        let (n1, n2) = (self.tokens, o.tokens);
        let (p1, p2) = (self.positive_tokens, o.positive_tokens);
        let (m1, m2) = (self.negative_tokens, o.negative_tokens);
        let (s1, s2) = (self.sequences, o.sequences);
        self.loss += o.loss;
        self.pg_loss += o.pg_loss;
        self.sapo_loss += o.sapo_loss;
        self.llds_loss += o.llds_loss;
        self.kl_ref_loss += o.kl_ref_loss;
        self.ratio_mean = wmean(self.ratio_mean, n1, o.ratio_mean, n2);
        self.ratio_min = if n1 == 0 {
            o.ratio_min
        } else if n2 == 0 {
            self.ratio_min
        } else {
            self.ratio_min.min(o.ratio_min)
        };
        self.ratio_max = if n1 == 0 {
            o.ratio_max
        } else if n2 == 0 {
            self.ratio_max
        } else {
            self.ratio_max.max(o.ratio_max)
        };
        self.ratio_below_t_pos = wmean(self.ratio_below_t_pos, p1, o.ratio_below_t_pos, p2);
        self.ratio_below_t_neg = wmean(self.ratio_below_t_neg, m1, o.ratio_below_t_neg, m2);
        self.ratio_below_half_pos =
            wmean(self.ratio_below_half_pos, p1, o.ratio_below_half_pos, p2);
        self.ratio_below_half_neg =
            wmean(self.ratio_below_half_neg, m1, o.ratio_below_half_neg, m2);
        self.ratio_below_tenth_pos =
            wmean(self.ratio_below_tenth_pos, p1, o.ratio_below_tenth_pos, p2);
        self.ratio_below_tenth_neg =
            wmean(self.ratio_below_tenth_neg, m1, o.ratio_below_tenth_neg, m2);
        self.seq_ratio_mean = wmean_opt(self.seq_ratio_mean, s1, o.seq_ratio_mean, s2);
        self.seq_ratio_min = match (self.seq_ratio_min, o.seq_ratio_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.sapo_active_frac = wmean(self.sapo_active_frac, n1, o.sapo_active_frac, n2);
        self.llds_active_frac = wmean(self.llds_active_frac, n1, o.llds_active_frac, n2);
        self.clip_frac = wmean(self.clip_frac, n1, o.clip_frac, n2);
        self.is_weight_mean = wmean_opt(self.is_weight_mean, n1, o.is_weight_mean, n2);
        self.is_clip_frac_pos = wmean_opt(self.is_clip_frac_pos, p1, o.is_clip_frac_pos, p2);
        self.is_clip_frac_neg = wmean_opt(self.is_clip_frac_neg, m1, o.is_clip_frac_neg, m2);
        self.approx_kl_k1 = wmean(self.approx_kl_k1, n1, o.approx_kl_k1, n2);
        self.approx_kl_k3 = wmean(self.approx_kl_k3, n1, o.approx_kl_k3, n2);
        self.kl_ref_k3 = wmean(self.kl_ref_k3, n1, o.kl_ref_k3, n2);
        self.entropy_mean = wmean(self.entropy_mean, n1, o.entropy_mean, n2);
        self.behaviour_surprisal_mean = wmean(
            self.behaviour_surprisal_mean,
            n1,
            o.behaviour_surprisal_mean,
            n2,
        );
        self.tokens = n1 + n2;
        self.positive_tokens = p1 + p2;
        self.negative_tokens = m1 + m2;
        self.sequences = s1 + s2;
    }
}

/// The policy loss of `config.kind` (see the module docs) and its metrics.
pub fn policy_loss(
    inputs: &PolicyLossInputs<'_>,
    config: &LossConfig,
) -> Result<(Tensor, LossMetrics)> {
    config.validate()?;
    let batch = Batch::new(inputs)?;
    let (b, l) = (batch.b, batch.l);
    if config.kl_beta != 0.0 && inputs.ref_logp.is_none() {
        return Err(TrainError::InvalidInput(
            "kl_beta is set but no reference log-probs were given".to_string(),
        ));
    }
    let norm = match inputs.normalizer {
        Some(n) => n,
        None => LossNormalizer::from_tensors(&batch.mask, &batch.adv_host)?,
    };
    let correction = match (config.is_band(), inputs.logp_sampler) {
        (None, _) => None,
        (Some(band), Some(sampler)) => {
            let old = to_host(&batch.logp_old)?;
            let log_w: Vec<f64> = old
                .iter()
                .zip(to_host(sampler)?)
                .map(|(o, s)| o - s)
                .collect();
            correction_weights(config.is_correction, band, &log_w, &batch.mask_host, l)
        }
        (Some(_), None) => {
            return Err(TrainError::InvalidInput(format!(
                "is_correction = \"{}\" needs the sampler's log-probs (logp_sampler)",
                config.is_correction.name()
            )));
        }
    };

    let PolicyTerm { per_token, clipped } = match config.kind {
        LossKind::Grpo | LossKind::Sapo | LossKind::Llds => batch.ppo_clip(config.ppo_bounds())?,
        LossKind::Gspo => {
            batch.gspo((1.0 - config.gspo_clip_eps, 1.0 + config.gspo_clip_eps_high))?
        }
        LossKind::Cispo => batch.cispo((config.cispo_min_weight, config.cispo_max_weight))?,
    };
    let per_token = match &correction {
        Some(c) => (per_token * batch.tensor(c.weights.clone())?)?,
        None => per_token,
    };
    let aggregation = match config.kind {
        LossKind::Gspo => LossAggregation::SeqMeanTokenMean,
        _ => config.aggregation,
    };
    let pg = aggregate(
        &per_token,
        &batch.mask,
        &norm,
        aggregation,
        config.norm_tokens,
    )?;
    let mut loss = pg.clone();

    let sapo_active = batch
        .indicator(|i, k| batch.adv_host[i] >= 0.0 && batch.ratio_host[k] <= config.sapo_threshold);
    let mut sapo_value = 0.0;
    if config.kind == LossKind::Sapo && config.sapo_weight != 0.0 && norm.positive_tokens > 0.0 {
        let sapo = batch.k1_term(&sapo_active, config.sapo_weight / norm.positive_tokens)?;
        sapo_value = scalar(&sapo)?;
        loss = (loss + sapo)?;
    }
    let llds_active = (config.kind == LossKind::Llds).then(|| batch.llds_active());
    let mut llds_value = 0.0;
    if let Some(active) = &llds_active
        && config.llds_lambda != 0.0
        && norm.positive_tokens > 0.0
        && active.iter().any(|&a| a > 0.0)
    {
        let llds = batch.k1_term(active, config.llds_lambda / norm.positive_tokens)?;
        llds_value = scalar(&llds)?;
        loss = (loss + llds)?;
    }

    let logp = inputs.logp;
    let mask = &batch.mask;
    let mut kl_ref_value = 0.0;
    let mut kl_ref_mean = f64::NAN;
    if let Some(ref_logp) = inputs.ref_logp {
        let d = (ref_logp.to_dtype(batch.dtype)?.detach() - logp)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        let k3_sum = (k3 * mask)?.sum_all()?;
        let k3_host = scalar(&k3_sum)?;
        let n = batch.mask_host.iter().filter(|&&m| m > 0.0).count();
        if n > 0 {
            kl_ref_mean = k3_host / n as f64;
        }
        if config.kl_beta != 0.0 {
            let kl = (k3_sum * (config.kl_beta / norm.tokens.max(1.0)))?;
            kl_ref_value = scalar(&kl)?;
            loss = (loss + kl)?;
        }
    }

    // With the entropies, the old log-probs of the same tokens: their surprisal is the
    // sampler's entropy to compare with.
    let entropy_host = match inputs.entropy {
        Some(e) => Some((to_host(e)?, to_host(&batch.logp_old)?)),
        None => None,
    };
    let mut m = Counts::default();
    for (i, &a) in batch.adv_host.iter().enumerate() {
        let pos = a >= 0.0;
        for k in i * l..(i + 1) * l {
            if batch.mask_host[k] <= 0.0 {
                continue;
            }
            let r = batch.ratio_host[k];
            m.tokens += 1;
            m.ratio_sum += r;
            m.ratio_min = m.ratio_min.min(r);
            m.ratio_max = m.ratio_max.max(r);
            let below = [r < config.sapo_threshold, r < 0.5, r < 0.1];
            let (sign_count, below_count) = if pos {
                (&mut m.pos, &mut m.below_pos)
            } else {
                (&mut m.neg, &mut m.below_neg)
            };
            *sign_count += 1;
            for (acc, hit) in below_count.iter_mut().zip(below) {
                *acc += usize::from(hit);
            }
            m.active += usize::from(sapo_active[k] > 0.0);
            m.llds_active += llds_active.as_ref().map_or(0, |v| usize::from(v[k] > 0.0));
            m.clipped += usize::from(clipped[k]);
            if let Some(c) = &correction {
                m.is_weight += c.weights[k];
                m.is_clipped[usize::from(!pos)] += usize::from(c.clipped[k]);
            }
            let lr = batch.log_ratio_host[k];
            m.k1 += -lr;
            m.k3 += (r - 1.0) - lr;
            if let Some((entropy, old)) = &entropy_host {
                m.entropy += entropy[k];
                m.surprisal -= old[k];
            }
        }
    }
    let seq_ratios: Vec<f64> = masked_row_sums(&batch.log_ratio_host, &batch.mask_host, b, l)
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(sum, n)| (sum / n as f64).exp())
        .collect();
    let frac = |num: f64, den: usize| if den == 0 { 0.0 } else { num / den as f64 };
    let with_correction = |v: f64| correction.is_some().then_some(v);
    let metrics = LossMetrics {
        loss: scalar(&loss)?,
        pg_loss: scalar(&pg)?,
        sapo_loss: sapo_value,
        llds_loss: llds_value,
        kl_ref_loss: kl_ref_value,
        tokens: m.tokens,
        positive_tokens: m.pos,
        negative_tokens: m.neg,
        sequences: seq_ratios.len(),
        ratio_mean: frac(m.ratio_sum, m.tokens),
        ratio_min: if m.tokens == 0 { f64::NAN } else { m.ratio_min },
        ratio_max: if m.tokens == 0 { f64::NAN } else { m.ratio_max },
        ratio_below_t_pos: frac(m.below_pos[0] as f64, m.pos),
        ratio_below_t_neg: frac(m.below_neg[0] as f64, m.neg),
        ratio_below_half_pos: frac(m.below_pos[1] as f64, m.pos),
        ratio_below_half_neg: frac(m.below_neg[1] as f64, m.neg),
        ratio_below_tenth_pos: frac(m.below_pos[2] as f64, m.pos),
        ratio_below_tenth_neg: frac(m.below_neg[2] as f64, m.neg),
        seq_ratio_mean: (!seq_ratios.is_empty())
            .then(|| seq_ratios.iter().sum::<f64>() / seq_ratios.len() as f64),
        seq_ratio_min: seq_ratios.iter().copied().reduce(f64::min),
        sapo_active_frac: frac(m.active as f64, m.tokens),
        llds_active_frac: frac(m.llds_active as f64, m.tokens),
        clip_frac: frac(m.clipped as f64, m.tokens),
        is_weight_mean: with_correction(frac(m.is_weight, m.tokens)),
        is_clip_frac_pos: with_correction(frac(m.is_clipped[0] as f64, m.pos)),
        is_clip_frac_neg: with_correction(frac(m.is_clipped[1] as f64, m.neg)),
        approx_kl_k1: frac(m.k1, m.tokens),
        approx_kl_k3: frac(m.k3, m.tokens),
        kl_ref_k3: kl_ref_mean,
        entropy_mean: if entropy_host.is_some() {
            frac(m.entropy, m.tokens)
        } else {
            f64::NAN
        },
        behaviour_surprisal_mean: if entropy_host.is_some() {
            frac(m.surprisal, m.tokens)
        } else {
            f64::NAN
        },
    };
    Ok((loss, metrics))
}

/// A policy-gradient term before correction and aggregation.
struct PolicyTerm {
    /// `(B, L)` per-token loss, zero at masked positions.
    per_token: Tensor,
    /// Which positions are clipped (see [`LossMetrics::clip_frac`]), row-major.
    clipped: Vec<bool>,
}

/// One evaluation's tensors and the host copies that the no-gradient decisions are made on.
struct Batch {
    b: usize,
    l: usize,
    dtype: DType,
    device: Device,
    logp_old: Tensor,
    mask: Tensor,
    /// `(B,)` advantages.
    adv_seq: Tensor,
    /// `(B, L)`: each sequence's advantage at every position.
    adv: Tensor,
    log_ratio: Tensor,
    ratio: Tensor,
    mask_host: Vec<f64>,
    adv_host: Vec<f64>,
    ratio_host: Vec<f64>,
    log_ratio_host: Vec<f64>,
}

impl Batch {
    fn new(inputs: &PolicyLossInputs<'_>) -> Result<Self> {
        let logp = inputs.logp;
        let (b, l) = logp.dims2()?;
        let dtype = logp.dtype();
        let shaped = [
            ("logp_old", Some(inputs.logp_old)),
            ("mask", Some(inputs.mask)),
            ("logp_sampler", inputs.logp_sampler),
        ];
        for (name, t) in shaped.iter().filter_map(|(n, t)| Some((n, (*t)?))) {
            if t.dims2()? != (b, l) {
                return Err(TrainError::InvalidInput(format!(
                    "{name} has shape {:?}, logp is ({b}, {l})",
                    t.dims()
                )));
            }
        }
        if inputs.advantages.dims1()? != b {
            return Err(TrainError::InvalidInput(format!(
                "advantages have shape {:?}, expected ({b},)",
                inputs.advantages.dims()
            )));
        }
        let logp_old = inputs.logp_old.to_dtype(dtype)?.detach();
        let mask = inputs.mask.to_dtype(dtype)?.detach();
        let adv_host = inputs.advantages.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let adv_seq = inputs.advantages.to_dtype(dtype)?.detach();
        let adv = adv_seq.unsqueeze(1)?.broadcast_as((b, l))?;
        let log_ratio = (logp - &logp_old)?;
        let ratio = log_ratio.exp()?;
        Ok(Self {
            b,
            l,
            dtype,
            device: logp.device().clone(),
            mask_host: to_host(&mask)?,
            ratio_host: to_host(&ratio)?,
            log_ratio_host: to_host(&log_ratio)?,
            logp_old,
            mask,
            adv_seq,
            adv,
            log_ratio,
            ratio,
            adv_host,
        })
    }

    /// A `(B, L)` tensor of this batch's dtype from row-major host values.
    fn tensor(&self, values: Vec<f64>) -> Result<Tensor> {
        Ok(Tensor::from_vec(values, (self.b, self.l), &self.device)?.to_dtype(self.dtype)?)
    }

    /// `f(i, k)` at every unmasked position `k` (in row `i`); false at masked positions.
    fn decide(&self, f: impl Fn(usize, usize) -> bool) -> Vec<bool> {
        (0..self.b * self.l)
            .map(|k| self.mask_host[k] > 0.0 && f(k / self.l, k))
            .collect()
    }

    /// [`Batch::decide`] as 1.0 and 0.0, an indicator to multiply by.
    fn indicator(&self, f: impl Fn(usize, usize) -> bool) -> Vec<f64> {
        self.decide(f).into_iter().map(f64::from).collect()
    }

    /// GRPO's clipped surrogate `-min(r·A, clip(r, lo, hi)·A)` per token.
    fn ppo_clip(&self, (lo, hi): (f64, f64)) -> Result<PolicyTerm> {
        let clipped = self.decide(|i, k| clips(self.adv_host[i], self.ratio_host[k], lo, hi));
        let flags: Vec<u8> = clipped.iter().map(|&c| u8::from(c)).collect();
        let flags = Tensor::from_vec(flags, (self.b, self.l), &self.device)?;
        // On clipped tokens the clipped value wins and is a constant; elsewhere r·A wins (or ties
        // with it inside the range), so its gradient is A·r·∇logp.
        let unclipped = (&self.ratio * &self.adv)?;
        let clipped_value = (self.ratio.detach().clamp(lo, hi)? * &self.adv)?;
        let surrogate = flags.where_cond(&clipped_value, &unclipped)?;
        let per_token = (surrogate.neg()? * &self.mask)?;
        Ok(PolicyTerm { per_token, clipped })
    }

    /// GSPO's clipped surrogate on the sequence ratio `s = exp(mean_t log r)` (eqs. 5 and 7),
    /// spread over the sequence's tokens so that a sequence mean of token means gives it back.
    fn gspo(&self, (lo, hi): (f64, f64)) -> Result<PolicyTerm> {
        let counts = self.mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
        let s = (&self.log_ratio * &self.mask)?
            .sum(1)?
            .div(&counts)?
            .exp()?;
        let s_host = to_host(&s)?;
        let seq_clipped: Vec<bool> = (0..self.b)
            .map(|i| clips(self.adv_host[i], s_host[i], lo, hi))
            .collect();
        let flags: Vec<u8> = seq_clipped.iter().map(|&c| u8::from(c)).collect();
        let flags = Tensor::from_vec(flags, self.b, &self.device)?;
        let unclipped = (&s * &self.adv_seq)?;
        let clipped_value = (s.detach().clamp(lo, hi)? * &self.adv_seq)?;
        let surrogate = flags.where_cond(&clipped_value, &unclipped)?;
        let per_token = (surrogate
            .neg()?
            .unsqueeze(1)?
            .broadcast_as((self.b, self.l))?
            * &self.mask)?;
        let clipped = self.decide(|i, _| seq_clipped[i]);
        Ok(PolicyTerm { per_token, clipped })
    }

    /// CISPO per token (eqs. 4 and 5): the gradient `-sg[clip(r, min, max)]·A·∇logp`, as the
    /// gradient of `-A·r` inside the band and of `-A·b·(1 + ln(r/b))` past a bound `b` (see the
    /// module docs).
    fn cispo(&self, (min, max): (f64, f64)) -> Result<PolicyTerm> {
        let clipped = self.decide(|_, k| !(min..=max).contains(&self.ratio_host[k]));
        // The bound each truncated token sits at; 1 elsewhere, where it is unused but keeps
        // the logarithm finite.
        let bounds: Vec<f64> = clipped
            .iter()
            .zip(&self.ratio_host)
            .map(|(&c, &r)| match (c, r < min) {
                (false, _) => 1.0,
                (true, true) => min,
                (true, false) => max,
            })
            .collect();
        let flags: Vec<u8> = clipped.iter().map(|&c| u8::from(c)).collect();
        let flags = Tensor::from_vec(flags, (self.b, self.l), &self.device)?;
        let bounds = self.tensor(bounds)?;
        let inside = (&self.ratio * &self.adv)?;
        let past = ((((&self.log_ratio - bounds.log()?)? + 1.0)? * &bounds)? * &self.adv)?;
        let surrogate = flags.where_cond(&past, &inside)?;
        let per_token = (surrogate.neg()? * &self.mask)?;
        Ok(PolicyTerm { per_token, clipped })
    }

    /// LLDS's active tokens (Eq. 4): in a preserved response (`A >= 0`), inside an action (a
    /// maximal run of trained positions) whose summed displacement `Σ Δ` is positive, with a
    /// positive displacement `Δ = -log r` of their own.
    fn llds_active(&self) -> Vec<f64> {
        let mut active = vec![0.0; self.b * self.l];
        for i in (0..self.b).filter(|&i| self.adv_host[i] >= 0.0) {
            let mut start = i * self.l;
            let row = &self.mask_host[start..start + self.l];
            for run in row.chunk_by(|x, y| (*x > 0.0) == (*y > 0.0)) {
                let action = start..start + run.len();
                start += run.len();
                if run[0] <= 0.0 {
                    continue;
                }
                let displacement: f64 = action.clone().map(|k| -self.log_ratio_host[k]).sum();
                if displacement > 0.0 {
                    for k in action.filter(|&k| self.log_ratio_host[k] < 0.0) {
                        active[k] = 1.0;
                    }
                }
            }
        }
        active
    }

    /// `coefficient · Σ indicator · Δ`: a k1 term on a no-gradient set of tokens, whose gradient
    /// on each of them is `-coefficient·∇logp`, not scaled by the ratio (SAPO's and LLDS's
    /// terms).
    fn k1_term(&self, indicator: &[f64], coefficient: f64) -> Result<Tensor> {
        let indicator = self.tensor(indicator.to_vec())?;
        Ok(((self.log_ratio.neg()? * indicator)?.sum_all()? * coefficient)?)
    }
}

/// Whether PPO's clipped surrogate takes its constant branch: above the range for `A >= 0`,
/// below it for `A < 0`.
fn clips(a: f64, r: f64, lo: f64, hi: f64) -> bool {
    (a >= 0.0 && r > hi) || (a < 0.0 && r < lo)
}

/// Averages a per-token loss as `aggregation` says, over the normaliser's counts (and
/// `norm_tokens` for Dr. GRPO's constant).
fn aggregate(
    per_token: &Tensor,
    mask: &Tensor,
    norm: &LossNormalizer,
    aggregation: LossAggregation,
    norm_tokens: f64,
) -> Result<Tensor> {
    Ok(match aggregation {
        LossAggregation::TokenMean => (per_token.sum_all()? / norm.tokens.max(1.0))?,
        LossAggregation::SeqMeanTokenMean => {
            let counts = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (per_token.sum(1)?.div(&counts)?.sum_all()? / norm.sequences.max(1.0))?
        }
        LossAggregation::SeqMeanTokenSum => {
            (per_token.sum_all()? / (norm.sequences.max(1.0) * norm_tokens))?
        }
    })
}

/// Per row of a row-major `(rows, l)` array: the sum of `values` over its positions where `mask`
/// is positive, and how many there are.
pub(crate) fn masked_row_sums(
    values: &[f64],
    mask: &[f64],
    rows: usize,
    l: usize,
) -> Vec<(f64, usize)> {
    (0..rows)
        .map(|i| {
            (i * l..(i + 1) * l)
                .filter(|&k| mask[k] > 0.0)
                .fold((0.0, 0), |(sum, n), k| (sum + values[k], n + 1))
        })
        .collect()
}

struct Counts {
    tokens: usize,
    pos: usize,
    neg: usize,
    ratio_sum: f64,
    ratio_min: f64,
    ratio_max: f64,
    below_pos: [usize; 3],
    below_neg: [usize; 3],
    active: usize,
    llds_active: usize,
    clipped: usize,
    is_weight: f64,
    /// Tokens the correction truncated or masked: `[A >= 0, A < 0]`.
    is_clipped: [usize; 2],
    k1: f64,
    k3: f64,
    entropy: f64,
    /// Σ `-logp_old` over the tokens whose entropy is summed.
    surprisal: f64,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            tokens: 0,
            pos: 0,
            neg: 0,
            ratio_sum: 0.0,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            below_pos: [0; 3],
            below_neg: [0; 3],
            active: 0,
            llds_active: 0,
            clipped: 0,
            is_weight: 0.0,
            is_clipped: [0; 2],
            k1: 0.0,
            k3: 0.0,
            entropy: 0.0,
            surprisal: 0.0,
        }
    }
}

fn to_host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    const TOL: f64 = 1e-9;

    struct Eval {
        loss: f64,
        grad: Vec<Vec<f64>>,
        metrics: LossMetrics,
    }

    /// Evaluates the loss on ratios `r` (logp_old = -1, logp = -1 + ln r) in f64 and returns the
    /// gradient with respect to `logp`.
    fn eval(
        r: &[&[f64]],
        mask: &[&[f64]],
        adv: &[f64],
        cfg: &LossConfig,
        reference: Option<&[&[f64]]>,
    ) -> Eval {
        eval_full(r, mask, adv, cfg, reference, None)
    }

    /// [`eval`] with the sampler's ratios `w = π_old / π_sampler` per token
    /// (`logp_sampler = -1 - ln w`).
    fn eval_corrected(
        r: &[&[f64]],
        w: &[&[f64]],
        mask: &[&[f64]],
        adv: &[f64],
        cfg: &LossConfig,
    ) -> Eval {
        eval_full(r, mask, adv, cfg, None, Some(w))
    }

    fn eval_full(
        r: &[&[f64]],
        mask: &[&[f64]],
        adv: &[f64],
        cfg: &LossConfig,
        reference: Option<&[&[f64]]>,
        sampler: Option<&[&[f64]]>,
    ) -> Eval {
        let dev = Device::Cpu;
        let (b, l) = (r.len(), r[0].len());
        let old: Vec<f64> = vec![-1.0; b * l];
        let logp: Vec<f64> = r
            .iter()
            .flat_map(|row| row.iter().map(|x| -1.0 + x.ln()))
            .collect();
        let logp = Var::from_vec(logp, (b, l), &dev).unwrap();
        let old = Tensor::from_vec(old, (b, l), &dev).unwrap();
        let mask: Vec<f64> = mask.iter().flat_map(|m| m.iter().copied()).collect();
        let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
        let advantages = Tensor::from_slice(adv, b, &dev).unwrap();
        let ref_t = reference.map(|rows| {
            let v: Vec<f64> = rows.iter().flat_map(|row| row.iter().copied()).collect();
            Tensor::from_vec(v, (b, l), &dev).unwrap()
        });
        let sampler_t = sampler.map(|rows| {
            let v: Vec<f64> = rows
                .iter()
                .flat_map(|row| row.iter().map(|w| -1.0 - w.ln()))
                .collect();
            Tensor::from_vec(v, (b, l), &dev).unwrap()
        });
        let inputs = PolicyLossInputs {
            logp: logp.as_tensor(),
            logp_old: &old,
            logp_sampler: sampler_t.as_ref(),
            mask: &mask,
            advantages: &advantages,
            ref_logp: ref_t.as_ref(),
            entropy: None,
            normalizer: None,
        };
        let (loss, metrics) = policy_loss(&inputs, cfg).unwrap();
        let grads = loss.backward().unwrap();
        let grad = match grads.get(logp.as_tensor()) {
            Some(g) => g.to_vec2::<f64>().unwrap(),
            None => vec![vec![0.0; l]; b],
        };
        Eval {
            loss: loss.to_scalar::<f64>().unwrap(),
            grad,
            metrics,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < TOL
    }

    #[test]
    fn every_branch_of_a_single_token() {
        let cfg = LossConfig::default(); // eps 0.2, w 0.1, t 0.8
        // (A, r, loss, d loss / d logp, clipped, sapo active)
        let cases: [(f64, f64, f64, f64, bool, bool); 9] = [
            (1.0, 1.1, -1.1, -1.1, false, false), // A >= 0, inside the range
            (1.0, 1.5, -1.2, 0.0, true, false),   // A >= 0, above: clipped
            (1.0, 0.5, -0.5 + 0.1 * 2f64.ln(), -0.6, false, true), // below: not clipped, SAPO on
            (1.0, 0.79, -0.79 - 0.1 * 0.79f64.ln(), -0.89, false, true), // r <= t
            (1.0, 0.81, -0.81, -0.81, false, false), // r > t: SAPO off
            (2.0, 0.9, -1.8, -1.8, false, false), // A scales the surrogate
            (-1.0, 0.5, 0.8, 0.0, true, false),   // A < 0, below: clipped
            (-1.0, 1.5, 1.5, 1.5, false, false),  // A < 0, above: not clipped
            (-1.0, 1.0, 1.0, 1.0, false, false),  // A < 0, inside
        ];
        for (a, r, loss, grad, clipped, active) in cases {
            let e = eval(&[&[r]], &[&[1.0]], &[a], &cfg, None);
            assert!(
                close(e.loss, loss),
                "A={a} r={r}: loss {} != {loss}",
                e.loss
            );
            assert!(
                close(e.grad[0][0], grad),
                "A={a} r={r}: grad {} != {grad}",
                e.grad[0][0]
            );
            assert_eq!(
                e.metrics.clip_frac,
                if clipped { 1.0 } else { 0.0 },
                "A={a} r={r}"
            );
            assert_eq!(
                e.metrics.sapo_active_frac,
                if active { 1.0 } else { 0.0 },
                "A={a} r={r}"
            );
        }
    }

    #[test]
    fn batch_with_masks_and_metrics() {
        let cfg = LossConfig::default();
        // Sequence 0 (A = +1): r = 0.45 (SAPO on), 1.1, and a masked token with a wild ratio.
        // Sequence 1 (A = -1): r = 0.45 (clipped), 1.5, and masked padding.
        let e = eval(
            &[&[0.45, 1.1, 3.0], &[0.45, 1.5, 100.0]],
            &[&[1.0, 1.0, 0.0], &[1.0, 1.0, 0.0]],
            &[1.0, -1.0],
            &cfg,
            None,
        );
        let pg = (-0.45 - 1.1 + 0.8 + 1.5) / 4.0;
        let sapo = 0.1 * -(0.45f64.ln()) / 2.0;
        assert!(close(e.loss, pg + sapo));
        assert!(close(e.metrics.pg_loss, pg));
        assert!(close(e.metrics.sapo_loss, sapo));
        let want = [
            [-0.45 / 4.0 - 0.1 / 2.0, -1.1 / 4.0, 0.0],
            [0.0, 1.5 / 4.0, 0.0],
        ];
        for (row, want_row) in e.grad.iter().zip(want) {
            for (g, w) in row.iter().zip(want_row) {
                assert!(close(*g, w), "{g} != {w}");
            }
        }
        let m = &e.metrics;
        assert_eq!((m.tokens, m.positive_tokens, m.negative_tokens), (4, 2, 2));
        assert!(close(m.ratio_mean, (0.45 + 1.1 + 0.45 + 1.5) / 4.0));
        assert!(close(m.ratio_min, 0.45) && close(m.ratio_max, 1.5));
        assert_eq!((m.ratio_below_t_pos, m.ratio_below_t_neg), (0.5, 0.5));
        assert_eq!((m.ratio_below_half_pos, m.ratio_below_half_neg), (0.5, 0.5));
        assert_eq!(
            (m.ratio_below_tenth_pos, m.ratio_below_tenth_neg),
            (0.0, 0.0)
        );
        assert_eq!((m.clip_frac, m.sapo_active_frac), (0.25, 0.25));
        let k1 = -(0.45f64.ln() * 2.0 + 1.1f64.ln() + 1.5f64.ln()) / 4.0;
        assert!(close(m.approx_kl_k1, k1));
        let k3: f64 = [0.45f64, 1.1, 0.45, 1.5]
            .iter()
            .map(|r| r - 1.0 - r.ln())
            .sum::<f64>()
            / 4.0;
        assert!(close(m.approx_kl_k3, k3));
    }

    #[test]
    fn seq_mean_token_mean_weights_sequences_equally() {
        let r: [&[f64]; 2] = [&[1.1, 0.9], &[1.0, 1.0]];
        let mask: [&[f64]; 2] = [&[1.0, 1.0], &[1.0, 0.0]];
        let cfg = LossConfig {
            sapo_weight: 0.0,
            ..LossConfig::default()
        };
        let tok = eval(&r, &mask, &[1.0, -1.0], &cfg, None);
        assert!(close(tok.loss, (-1.1 - 0.9 + 1.0) / 3.0));
        let seq_cfg = LossConfig {
            aggregation: LossAggregation::SeqMeanTokenMean,
            ..cfg
        };
        let seq = eval(&r, &mask, &[1.0, -1.0], &seq_cfg, None);
        assert!(close(seq.loss, ((-1.1 - 0.9) / 2.0 + 1.0) / 2.0));
        assert!(close(seq.grad[0][0], -1.1 / 4.0) && close(seq.grad[0][1], -0.9 / 4.0));
        assert!(close(seq.grad[1][0], 0.5) && close(seq.grad[1][1], 0.0));
    }

    #[test]
    fn dr_grpo_divides_token_sums_by_a_constant() {
        let cfg = LossConfig {
            kind: LossKind::Grpo,
            aggregation: LossAggregation::SeqMeanTokenSum,
            norm_tokens: 4.0,
            ..LossConfig::default()
        };
        // Two sequences of two and one trained tokens: every token weighs 1 / (2 · 4), however
        // long its sequence.
        let e = eval(
            &[&[1.1, 0.9], &[1.0, 3.0]],
            &[&[1.0, 1.0], &[1.0, 0.0]],
            &[1.0, -1.0],
            &cfg,
            None,
        );
        assert!(close(e.loss, (-1.1 - 0.9 + 1.0) / 8.0));
        assert_grad(
            &e,
            &[&[-1.1 / 8.0, -0.9 / 8.0], &[1.0 / 8.0, 0.0]],
            "dr grpo",
        );
    }

    #[test]
    fn k3_penalty_to_the_reference() {
        let cfg = LossConfig {
            kl_beta: 0.1,
            ..LossConfig::default()
        };
        // logp = -1 + ln 1.1; the reference is 0.5 above it.
        let reference = -1.0 + 1.1f64.ln() + 0.5;
        let e = eval(&[&[1.1]], &[&[1.0]], &[1.0], &cfg, Some(&[&[reference]]));
        let k3 = 0.5f64.exp() - 0.5 - 1.0;
        assert!(close(e.loss, -1.1 + 0.1 * k3));
        assert!(close(e.grad[0][0], -1.1 + 0.1 * (1.0 - 0.5f64.exp())));
        assert!(close(e.metrics.kl_ref_k3, k3));
        assert!(close(e.metrics.kl_ref_loss, 0.1 * k3));
    }

    #[test]
    fn empty_positive_set_and_empty_mask_give_zero_not_nan() {
        let cfg = LossConfig::default();
        let e = eval(&[&[0.3, 1.4]], &[&[1.0, 1.0]], &[-1.0], &cfg, None);
        assert_eq!(e.metrics.sapo_loss, 0.0);
        assert_eq!(e.metrics.sapo_active_frac, 0.0);
        assert!(close(e.loss, (0.8 + 1.4) / 2.0));
        assert!(e.grad.iter().flatten().all(|g| g.is_finite()));
        let e = eval(&[&[0.3, 1.4]], &[&[0.0, 0.0]], &[1.0], &cfg, None);
        assert_eq!(e.loss, 0.0);
        assert!(e.grad.iter().flatten().all(|g| *g == 0.0));
        assert_eq!(e.metrics.ratio_mean, 0.0);
    }

    /// The textbook GRPO loss, written independently: `-min(r·A, clip(r)·A)`, token mean.
    fn textbook_grpo(logp: &Tensor, old: &Tensor, mask: &Tensor, adv: &Tensor, eps: f64) -> Tensor {
        let ratio = (logp - old).unwrap().exp().unwrap();
        let a = adv
            .unsqueeze(1)
            .unwrap()
            .broadcast_as(ratio.shape())
            .unwrap();
        let s1 = (&ratio * &a).unwrap();
        let s2 = (ratio.clamp(1.0 - eps, 1.0 + eps).unwrap() * &a).unwrap();
        let pg = s1.minimum(&s2).unwrap().neg().unwrap();
        ((pg * mask).unwrap().sum_all().unwrap()
            / mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
            .unwrap()
    }

    /// A seeded random f32 batch of three sequences whose ratios fall inside, above and below
    /// the clip range, with masked positions in two of them.
    struct RandomBatch {
        logp: Var,
        old: Tensor,
        mask: Tensor,
        adv: Tensor,
    }

    fn random_batch() -> RandomBatch {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut uniform = |half_width: f32| -> Tensor {
            let v: Vec<f32> = (0..18)
                .map(|_| rng.random_range(-half_width..half_width))
                .collect();
            Tensor::from_vec(v, (3, 6), &dev).unwrap()
        };
        let logp = Var::from_tensor(&(uniform(1.7) - 2.0).unwrap()).unwrap();
        // Old log-probs spread enough that ratios fall inside, above and below the clip range.
        let old = (logp.as_tensor() + uniform(0.8)).unwrap().detach();
        let mask = Tensor::new(
            &[
                [1f32, 1., 1., 1., 0., 0.],
                [0., 1., 1., 1., 1., 1.],
                [1., 1., 1., 1., 1., 1.],
            ],
            &dev,
        )
        .unwrap();
        let adv = Tensor::new(&[1.3f32, -0.7, 0.4], &dev).unwrap();
        RandomBatch {
            logp,
            old,
            mask,
            adv,
        }
    }

    impl RandomBatch {
        /// The loss inputs with `old` as behaviour log-probs and `sampler` as the sampler's.
        fn inputs<'a>(
            &'a self,
            old: &'a Tensor,
            sampler: Option<&'a Tensor>,
        ) -> PolicyLossInputs<'a> {
            PolicyLossInputs {
                logp: self.logp.as_tensor(),
                logp_old: old,
                logp_sampler: sampler,
                mask: &self.mask,
                advantages: &self.adv,
                ref_logp: None,
                entropy: None,
                normalizer: None,
            }
        }

        /// The bits of `loss` and of its gradient with respect to `logp`.
        fn bits(&self, loss: &Tensor) -> (u32, Vec<u32>) {
            let grads = loss.backward().unwrap();
            let grad = grads
                .get(self.logp.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (
                loss.to_scalar::<f32>().unwrap().to_bits(),
                grad.iter().map(|x| x.to_bits()).collect(),
            )
        }
    }

    #[test]
    fn zero_sapo_weight_is_bitwise_grpo() {
        let batch = random_batch();
        let cfg = LossConfig {
            sapo_weight: 0.0,
            ..LossConfig::default()
        };
        let (ours, m) = policy_loss(&batch.inputs(&batch.old, None), &cfg).unwrap();
        assert!(
            m.clip_frac > 0.0 && m.clip_frac < 1.0,
            "the data must exercise clipping"
        );
        let theirs = textbook_grpo(
            batch.logp.as_tensor(),
            &batch.old,
            &batch.mask,
            &batch.adv,
            cfg.clip_eps,
        );
        assert_eq!(batch.bits(&ours), batch.bits(&theirs));
    }

    #[test]
    fn sapo_revives_a_collapsed_positive_token_where_grpo_cannot() {
        // A positive-advantage token whose probability collapsed since sampling: logp_old is
        // stale by ln(100), so r = 0.01. GRPO's gradient is scaled by r and nearly vanishes;
        // SAPO's is not, and it points toward raising the token's logit.
        let dev = Device::Cpu;
        let logits =
            Var::from_tensor(&Tensor::new(&[[[0.3f32, -1.0, 0.5, 2.0, 0.1]]], &dev).unwrap())
                .unwrap();
        let target = 2usize;
        let grad_for = |w: f64| -> (f32, f32) {
            let logp_all = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
            let logp = logp_all
                .narrow(D::Minus1, target, 1)
                .unwrap()
                .squeeze(2)
                .unwrap();
            let old = (logp.detach() + 100f64.ln()).unwrap();
            let mask = Tensor::ones((1, 1), DType::F32, &dev).unwrap();
            let adv = Tensor::new(&[1f32], &dev).unwrap();
            let cfg = LossConfig {
                sapo_weight: w,
                ..LossConfig::default()
            };
            let inputs = PolicyLossInputs {
                logp: &logp,
                logp_old: &old,
                logp_sampler: None,
                mask: &mask,
                advantages: &adv,
                ref_logp: None,
                entropy: None,
                normalizer: None,
            };
            let (loss, m) = policy_loss(&inputs, &cfg).unwrap();
            assert!((m.ratio_mean - 0.01).abs() < 1e-6);
            let g = loss
                .backward()
                .unwrap()
                .get(logits.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let p = logp_all
                .exp()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[target];
            (g[target], 1.0 - p)
        };
        let (grpo, one_minus_p) = grad_for(0.0);
        let (sapo, _) = grad_for(0.1);
        // d(-A r logp)/dz_target = -A r (1 - p): about 1% of a fresh token's gradient.
        assert!((grpo + 0.01 * one_minus_p).abs() < 1e-6, "{grpo}");
        assert!(grpo.abs() < 0.011 * one_minus_p);
        // SAPO adds -w (1 - p): ten times the GRPO gradient, with the descent direction raising
        // the logit (negative gradient).
        assert!((sapo + 0.11 * one_minus_p).abs() < 1e-6, "{sapo}");
        assert!(sapo < 0.0 && sapo.abs() > 10.0 * grpo.abs());
    }

    #[test]
    fn micro_batches_with_a_shared_normalizer_add_up() {
        let r: [&[f64]; 3] = [&[0.45, 1.1], &[0.6, 1.5], &[0.95, 0.2]];
        let mask: [&[f64]; 3] = [&[1.0, 1.0], &[1.0, 0.0], &[1.0, 1.0]];
        let adv = [1.0, -1.0, 0.5];
        let cfg = LossConfig::default();
        let whole = eval(&r, &mask, &adv, &cfg, None);
        let bool_masks: Vec<Vec<bool>> = mask
            .iter()
            .map(|m| m.iter().map(|v| *v > 0.0).collect())
            .collect();
        let norm = LossNormalizer::from_host(&bool_masks, &adv).unwrap();
        let part = |rows: std::ops::Range<usize>| {
            let dev = Device::Cpu;
            let b = rows.len();
            let logp: Vec<f64> = rows
                .clone()
                .flat_map(|i| r[i].iter().map(|x| -1.0 + x.ln()))
                .collect();
            let logp = Tensor::from_vec(logp, (b, 2), &dev).unwrap();
            let old = Tensor::full(-1.0f64, (b, 2), &dev).unwrap();
            let m: Vec<f64> = rows.clone().flat_map(|i| mask[i].iter().copied()).collect();
            let m = Tensor::from_vec(m, (b, 2), &dev).unwrap();
            let a = Tensor::from_slice(&adv[rows], b, &dev).unwrap();
            let inputs = PolicyLossInputs {
                logp: &logp,
                logp_old: &old,
                logp_sampler: None,
                mask: &m,
                advantages: &a,
                ref_logp: None,
                entropy: None,
                normalizer: Some(norm),
            };
            policy_loss(&inputs, &cfg).unwrap().1
        };
        let mut merged = part(0..2);
        merged.merge(&part(2..3));
        assert!(close(merged.loss, whole.loss));
        assert!(close(merged.sapo_loss, whole.metrics.sapo_loss));
        assert!(close(merged.ratio_mean, whole.metrics.ratio_mean));
        assert!(close(
            merged.ratio_below_t_pos,
            whole.metrics.ratio_below_t_pos
        ));
        assert!(close(merged.clip_frac, whole.metrics.clip_frac));
        assert_eq!(merged.ratio_min, whole.metrics.ratio_min);
        assert_eq!(merged.tokens, whole.metrics.tokens);
    }

    #[test]
    fn group_advantages_grpo_dr_grpo_and_zero_std() {
        let rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0];
        let groups = ["a", "a", "a", "a", "b", "b", "c"];
        let none = [None; 7];
        let adv = group_advantages(&rewards, &groups, &none, &AdvantageConfig::default()).unwrap();
        let std = (4.0 * 0.25f64 / 3.0).sqrt();
        let hi = 0.5 / (std + 1e-6);
        for (v, w) in adv.values.iter().zip([hi, -hi, -hi, hi, 0.0, 0.0, 0.0]) {
            assert!(close(*v, w), "{v} != {w}");
        }
        assert_eq!(adv.keep, [true, true, true, true, false, false, false]);
        assert_eq!((adv.groups, adv.zero_std_groups), (3, 2));
        let dr = AdvantageConfig {
            scale_by_std: false,
            skip_zero_std_groups: false,
            ..AdvantageConfig::default()
        };
        let adv = group_advantages(&rewards, &groups, &none, &dr).unwrap();
        assert_eq!(adv.values, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0]);
        assert!(adv.keep.iter().all(|k| *k));
        assert_eq!(adv.zero_std_groups, 2);
        assert!(group_advantages(&[f64::NAN], &["a"], &[None], &dr).is_err());
        assert!(group_advantages(&[1.0], &["a"], &[Some(f64::INFINITY)], &dr).is_err());
        assert!(group_advantages(&[1.0], &["a", "b"], &[None, None], &dr).is_err());
        assert!(group_advantages(&[1.0], &["a"], &[], &dr).is_err());
    }

    #[test]
    fn baselined_sequences_are_centred_on_their_baseline_not_grouped() {
        // "s" holds two baselined episodes and one grouped with "a"'s: the baselined ones must
        // neither join a group nor change the grouped advantages.
        let rewards = [1.0, 0.0, 1.0, 0.25, 0.5];
        let groups = ["a", "a", "s", "s", "s"];
        let baselines = [None, None, Some(0.25), Some(0.25), None];
        let adv =
            group_advantages(&rewards, &groups, &baselines, &AdvantageConfig::default()).unwrap();
        let hi = 0.5 / ((0.5f64).sqrt() + 1e-6);
        for (v, w) in adv.values.iter().zip([hi, -hi, 0.75, 0.0, 0.0]) {
            assert!(close(*v, w), "{v} != {w}");
        }
        // The one-member "s" group and the episode at its baseline carry no signal.
        assert_eq!(adv.keep, [true, true, true, false, false]);
        assert_eq!((adv.groups, adv.zero_std_groups), (4, 2));
    }

    /// Checks a single-token case: loss, gradient and whether it was clipped.
    fn assert_case(e: &Eval, loss: f64, grad: f64, clipped: bool, what: &str) {
        assert!(close(e.loss, loss), "{what}: loss {} != {loss}", e.loss);
        assert!(
            close(e.grad[0][0], grad),
            "{what}: grad {} != {grad}",
            e.grad[0][0]
        );
        assert_eq!(e.metrics.clip_frac, f64::from(u8::from(clipped)), "{what}");
    }

    /// Checks every entry of a gradient against `want`.
    fn assert_grad(e: &Eval, want: &[&[f64]], what: &str) {
        for (row, want_row) in e.grad.iter().zip(want) {
            for (g, w) in row.iter().zip(*want_row) {
                assert!(close(*g, *w), "{what}: grad {g} != {w} ({:?})", e.grad);
            }
        }
    }

    #[test]
    fn grpo_every_branch_of_one_and_two_tokens_with_clip_higher() {
        // DAPO's asymmetric range [0.8, 1.28]; the SAPO weight is ignored by this kind.
        let cfg = LossConfig {
            kind: LossKind::Grpo,
            clip_eps_high: Some(0.28),
            ..LossConfig::default()
        };
        // (A, r, loss, d loss / d logp, clipped)
        let cases: [(f64, f64, f64, f64, bool); 7] = [
            (1.0, 1.1, -1.1, -1.1, false),
            (1.0, 1.25, -1.25, -1.25, false), // above 1 + eps, below 1 + eps_high
            (1.0, 1.3, -1.28, 0.0, true),     // above 1 + eps_high: clipped
            (1.0, 0.5, -0.5, -0.5, false),    // no SAPO term, whatever sapo_weight says
            (-1.0, 0.79, 0.8, 0.0, true),     // below 1 - eps: clipped
            (-1.0, 1.3, 1.3, 1.3, false),     // A < 0 is never clipped above
            (-1.0, 1.0, 1.0, 1.0, false),
        ];
        for (a, r, loss, grad, clipped) in cases {
            let e = eval(&[&[r]], &[&[1.0]], &[a], &cfg, None);
            assert_case(&e, loss, grad, clipped, &format!("A={a} r={r}"));
            assert_eq!(e.metrics.sapo_loss, 0.0);
            assert_eq!(e.metrics.is_weight_mean, None);
        }
        // Two tokens of one sequence: one inside, one clipped above.
        let e = eval(&[&[1.1, 1.3]], &[&[1.0, 1.0]], &[1.0], &cfg, None);
        assert!(close(e.loss, (-1.1 - 1.28) / 2.0));
        assert_grad(&e, &[&[-0.55, 0.0]], "two tokens");
        assert_eq!(e.metrics.clip_frac, 0.5);
        // The SAPO indicator is still measured, though no term is built.
        assert_eq!(
            eval(&[&[0.5]], &[&[1.0]], &[1.0], &cfg, None)
                .metrics
                .sapo_active_frac,
            1.0
        );
    }

    #[test]
    fn grpo_kind_is_bitwise_grpo() {
        let batch = random_batch();
        let cfg = LossConfig {
            kind: LossKind::Grpo,
            ..LossConfig::default()
        };
        let (ours, _) = policy_loss(&batch.inputs(&batch.old, None), &cfg).unwrap();
        let theirs = textbook_grpo(
            batch.logp.as_tensor(),
            &batch.old,
            &batch.mask,
            &batch.adv,
            cfg.clip_eps,
        );
        assert_eq!(batch.bits(&ours), batch.bits(&theirs));
    }

    #[test]
    fn gspo_every_branch_of_one_and_two_tokens() {
        let cfg = LossConfig {
            kind: LossKind::Gspo,
            ..LossConfig::default()
        }; // [1 - 3e-4, 1 + 4e-4]
        // One token: the sequence ratio is the token ratio.
        let cases: [(f64, f64, f64, f64, bool); 5] = [
            (1.0, 1.0002, -1.0002, -1.0002, false),
            (1.0, 1.001, -1.0004, 0.0, true),
            (1.0, 0.5, -0.5, -0.5, false),
            (-1.0, 0.999, 0.9997, 0.0, true),
            (-1.0, 1.5, 1.5, 1.5, false),
        ];
        for (a, r, loss, grad, clipped) in cases {
            let e = eval(&[&[r]], &[&[1.0]], &[a], &cfg, None);
            assert_case(&e, loss, grad, clipped, &format!("A={a} r={r}"));
            assert!(close(e.metrics.seq_ratio_mean.unwrap(), r));
        }
        // Two tokens: s = sqrt(r1·r2) is clipped, not the tokens. Ratios 0.5 and 2 give s = 1,
        // inside, although GRPO would clip the second token; the gradient is -A·s/2 on each.
        let e = eval(&[&[0.5, 2.0]], &[&[1.0, 1.0]], &[1.0], &cfg, None);
        assert!(close(e.loss, -1.0));
        assert_grad(&e, &[&[-0.5, -0.5]], "s = 1");
        assert_eq!(e.metrics.clip_frac, 0.0);
        // Ratios 1 and 1.01, each harmless to GRPO: s = 1.005 clips the whole sequence.
        let e = eval(&[&[1.0, 1.01]], &[&[1.0, 1.0]], &[1.0], &cfg, None);
        assert!(close(e.loss, -1.0004));
        assert_grad(&e, &[&[0.0, 0.0]], "clipped above");
        assert_eq!(e.metrics.clip_frac, 1.0);
        let e = eval(&[&[0.9, 0.9]], &[&[1.0, 1.0]], &[-1.0], &cfg, None);
        assert!(close(e.loss, 0.9997));
        assert_grad(&e, &[&[0.0, 0.0]], "clipped below");
        // Two sequences average as sequences even under the default token-mean aggregation:
        // s = 1 (A = 1, two tokens) and s = 1.2 (A = -1, one token and padding).
        let e = eval(
            &[&[0.5, 2.0], &[1.2, 7.0]],
            &[&[1.0, 1.0], &[1.0, 0.0]],
            &[1.0, -1.0],
            &cfg,
            None,
        );
        assert!(close(e.loss, (-1.0 + 1.2) / 2.0), "{}", e.loss);
        assert_grad(&e, &[&[-0.25, -0.25], &[0.6, 0.0]], "two sequences");
        let m = &e.metrics;
        assert_eq!(m.sequences, 2);
        assert!(close(m.seq_ratio_mean.unwrap(), 1.1) && close(m.seq_ratio_min.unwrap(), 1.0));
    }

    #[test]
    fn gspo_is_grpo_on_one_token_and_with_equal_token_ratios() {
        // Sequences whose tokens share one ratio (inside, above and below GRPO's range, with
        // both signs of A), scored in f64: GSPO with GRPO's range is GRPO's sequence mean.
        let r: [&[f64]; 4] = [
            &[1.1, 1.1, 1.1],
            &[1.5, 1.5, 9.0],
            &[0.6, 0.6, 0.6],
            &[0.9, 3.0, 3.0],
        ];
        let mask: [&[f64]; 4] = [
            &[1.0, 1.0, 1.0],
            &[1.0, 1.0, 0.0],
            &[1.0, 1.0, 1.0],
            &[1.0, 0.0, 0.0],
        ];
        let adv = [1.0, 0.5, -1.0, -0.3];
        let grpo = LossConfig {
            kind: LossKind::Grpo,
            aggregation: LossAggregation::SeqMeanTokenMean,
            ..LossConfig::default()
        };
        let gspo = LossConfig {
            kind: LossKind::Gspo,
            gspo_clip_eps: 0.2,
            gspo_clip_eps_high: 0.2,
            ..LossConfig::default()
        };
        let a = eval(&r, &mask, &adv, &grpo, None);
        let b = eval(&r, &mask, &adv, &gspo, None);
        assert!(a.metrics.clip_frac > 0.0 && a.metrics.clip_frac < 1.0);
        assert!(close(a.loss, b.loss), "{} vs {}", a.loss, b.loss);
        assert!(close(a.metrics.clip_frac, b.metrics.clip_frac));
        for (x, y) in a.grad.iter().flatten().zip(b.grad.iter().flatten()) {
            assert!(close(*x, *y), "{:?} vs {:?}", a.grad, b.grad);
        }
        // One-token sequences with different ratios: GSPO is GRPO under any aggregation.
        let r: [&[f64]; 3] = [&[1.1], &[1.5], &[0.6]];
        let mask: [&[f64]; 3] = [&[1.0], &[1.0], &[1.0]];
        let adv = [1.0, 0.5, -1.0];
        let a = eval(
            &r,
            &mask,
            &adv,
            &LossConfig {
                aggregation: LossAggregation::TokenMean,
                ..grpo
            },
            None,
        );
        let b = eval(&r, &mask, &adv, &gspo, None);
        assert!(close(a.loss, b.loss));
        for (x, y) in a.grad.iter().flatten().zip(b.grad.iter().flatten()) {
            assert!(close(*x, *y));
        }
    }

    #[test]
    fn cispo_every_branch_of_one_and_two_tokens() {
        let cfg = LossConfig {
            kind: LossKind::Cispo,
            cispo_min_weight: 0.8,
            cispo_max_weight: 1.2,
            ..LossConfig::default()
        };
        // (A, r, weight, truncated): the gradient is -weight·A, never zero; the loss is -A·r
        // inside the band and -A·b·(1 + ln(r/b)) past a bound b (the weight).
        let cases: [(f64, f64, f64, bool); 6] = [
            (1.0, 1.1, 1.1, false),
            (1.0, 1.5, 1.2, true),
            (1.0, 0.5, 0.8, true),
            (-1.0, 0.5, 0.8, true),
            (-1.0, 1.5, 1.2, true),
            (-1.0, 1.0, 1.0, false),
        ];
        for (a, r, w, truncated) in cases {
            let e = eval(&[&[r]], &[&[1.0]], &[a], &cfg, None);
            let loss = if truncated {
                -a * w * (1.0 + (r / w).ln())
            } else {
                -a * r
            };
            assert_case(&e, loss, -w * a, truncated, &format!("A={a} r={r}"));
        }
        // The defaults have no lower bound and cap at 5.
        let default = LossConfig {
            kind: LossKind::Cispo,
            ..LossConfig::default()
        };
        for (r, w) in [(6.0, 5.0), (0.01, 0.01)] {
            let e = eval(&[&[r]], &[&[1.0]], &[1.0], &default, None);
            assert!(close(e.grad[0][0], -w), "r={r}: {}", e.grad[0][0]);
        }
        // Two tokens, token mean: one inside, one truncated to 1.2.
        let e = eval(&[&[1.1, 1.32]], &[&[1.0, 1.0]], &[2.0], &cfg, None);
        let want = (-2.2 - 2.0 * 1.2 * (1.0 + 1.1f64.ln())) / 2.0;
        assert!(close(e.loss, want));
        assert_grad(&e, &[&[-1.1, -1.2]], "two tokens");
        assert_eq!(e.metrics.clip_frac, 0.5);
    }

    #[test]
    fn cispo_on_policy_is_bitwise_grpo() {
        // r = 1 everywhere: CISPO's gradient -A·∇logp is GRPO's -A·r·∇logp, and the value
        // -A·r is GRPO's too.
        let batch = random_batch();
        let on_policy = batch.logp.as_tensor().detach();
        let bits = |kind: LossKind| {
            let cfg = LossConfig {
                kind,
                ..LossConfig::default()
            };
            let (loss, _) = policy_loss(&batch.inputs(&on_policy, None), &cfg).unwrap();
            batch.bits(&loss)
        };
        let grpo = bits(LossKind::Grpo);
        assert!(grpo.1.iter().any(|g| f32::from_bits(*g) != 0.0));
        assert_eq!(bits(LossKind::Cispo), grpo);
    }

    #[test]
    fn llds_every_branch_of_one_and_two_tokens() {
        let cfg = LossConfig {
            kind: LossKind::Llds,
            ..LossConfig::default()
        }; // λ = 0.2, clip 0.2
        // One token, a one-token action: (A, r, loss, grad, clipped, LLDS active).
        let l2 = 2f64.ln();
        let cases: [(f64, f64, f64, f64, bool, bool); 7] = [
            (1.0, 0.5, -0.5 + 0.2 * l2, -0.7, false, true), // Δ = ln 2 > 0
            (1.0, 1.1, -1.1, -1.1, false, false),           // Δ < 0
            (1.0, 1.0, -1.0, -1.0, false, false),           // Δ = 0: strictly positive only
            (1.0, 1.5, -1.2, 0.0, true, false),
            (0.0, 0.5, 0.2 * l2, -0.2, false, true), // A = 0 is preserved too
            (-1.0, 0.5, 0.8, 0.0, true, false),      // A < 0 never is
            (-1.0, 1.5, 1.5, 1.5, false, false),
        ];
        for (a, r, loss, grad, clipped, active) in cases {
            let e = eval(&[&[r]], &[&[1.0]], &[a], &cfg, None);
            let what = format!("A={a} r={r}");
            assert_case(&e, loss, grad, clipped, &what);
            assert_eq!(
                e.metrics.llds_active_frac,
                f64::from(u8::from(active)),
                "{what}"
            );
            let term = if active { 0.2 * l2 } else { 0.0 };
            assert!(close(e.metrics.llds_loss, term), "{what}");
        }
        // Two tokens in one action: the gate is on (Δ sums to ln 2 - ln 1.1 > 0), and only the
        // token with Δ > 0 is penalised.
        let e = eval(&[&[0.5, 1.1]], &[&[1.0, 1.0]], &[1.0], &cfg, None);
        assert!(close(e.loss, (-0.5 - 1.1) / 2.0 + 0.2 * l2 / 2.0));
        assert_grad(&e, &[&[-0.25 - 0.1, -0.55]], "gate on");
        assert_eq!(e.metrics.llds_active_frac, 0.5);
        // Ratios 0.9 and 1.15 in one action: Δ sums to ln(1/0.9) - ln 1.15 < 0, so the gate is
        // off, although the first token lost likelihood...
        let e = eval(&[&[0.9, 1.15]], &[&[1.0, 1.0]], &[1.0], &cfg, None);
        assert!(close(e.loss, (-0.9 - 1.15) / 2.0));
        assert_grad(&e, &[&[-0.45, -0.575]], "gate off");
        assert_eq!(e.metrics.llds_active_frac, 0.0);
        // ...but split by a tool observation into two actions, the first action's gate opens.
        let e = eval(
            &[&[0.9, 5.0, 1.15]],
            &[&[1.0, 0.0, 1.0]],
            &[1.0],
            &cfg,
            None,
        );
        let term = 0.2 * -(0.9f64.ln()) / 2.0;
        assert!(close(e.loss, (-0.9 - 1.15) / 2.0 + term));
        assert!(close(e.metrics.llds_loss, term));
        assert_grad(&e, &[&[-0.45 - 0.1, 0.0, -0.575]], "two actions");
        // The normaliser counts the preserved responses' tokens only.
        let e = eval(
            &[&[0.5, 0.6], &[0.5, 0.6]],
            &[&[1.0, 1.0], &[1.0, 1.0]],
            &[1.0, -1.0],
            &cfg,
            None,
        );
        let term = 0.2 * (l2 - 0.6f64.ln()) / 2.0;
        assert!(close(e.loss, (-0.5 - 0.6 + 0.8 + 0.8) / 4.0 + term));
        assert_grad(
            &e,
            &[&[-0.125 - 0.1, -0.15 - 0.1], &[0.0, 0.0]],
            "two sequences",
        );
        assert_eq!(e.metrics.llds_active_frac, 0.5);
    }

    #[test]
    fn llds_is_bitwise_grpo_with_zero_lambda_or_on_policy() {
        let batch = random_batch();
        let grpo = LossConfig {
            kind: LossKind::Grpo,
            ..LossConfig::default()
        };
        let llds = LossConfig {
            kind: LossKind::Llds,
            ..LossConfig::default()
        };
        let zero = LossConfig {
            llds_lambda: 0.0,
            ..llds.clone()
        };
        let bits = |old: &Tensor, cfg: &LossConfig| {
            let (loss, m) = policy_loss(&batch.inputs(old, None), cfg).unwrap();
            (batch.bits(&loss), m.llds_active_frac)
        };
        // Off-policy the term is active, so λ = 0 is a real test...
        assert!(bits(&batch.old, &llds).1 > 0.0);
        assert_eq!(bits(&batch.old, &zero).0, bits(&batch.old, &grpo).0);
        // ...and θ = old leaves nothing to displace.
        let on_policy = batch.logp.as_tensor().detach();
        let (on, active) = bits(&on_policy, &llds);
        assert_eq!(active, 0.0);
        assert_eq!(on, bits(&on_policy, &grpo).0);
    }

    #[test]
    fn corrections_every_branch_of_one_and_two_tokens() {
        let with = |is_correction: IsCorrection, is_max: Option<f64>| LossConfig {
            kind: LossKind::Grpo,
            is_correction,
            is_max,
            ..LossConfig::default()
        };
        // One token: (correction, A, r, w, loss, grad, weight, truncated or masked).
        let cases = [
            (IsCorrection::Tis, 1.0, 1.1, 1.5, -1.65, -1.65, 1.5, false),
            (IsCorrection::Tis, 1.0, 1.1, 3.0, -2.2, -2.2, 2.0, true),
            (IsCorrection::Tis, 1.0, 1.1, 0.5, -0.55, -0.55, 0.5, false),
            (IsCorrection::Tis, -1.0, 1.5, 3.0, 3.0, 3.0, 2.0, true),
            (IsCorrection::Tis, 1.0, 1.5, 3.0, -2.4, 0.0, 2.0, true), // PPO-clipped too
            (IsCorrection::Icepop, 1.0, 1.1, 3.0, -3.3, -3.3, 3.0, false),
            (IsCorrection::Icepop, 1.0, 1.1, 6.0, 0.0, 0.0, 0.0, true),
            (IsCorrection::Icepop, -1.0, 1.5, 0.4, 0.0, 0.0, 0.0, true),
            (IsCorrection::Mis, 1.0, 1.1, 0.4, 0.0, 0.0, 0.0, true),
            (IsCorrection::Geo, 1.0, 1.1, 1.002, 0.0, 0.0, 0.0, true),
            (IsCorrection::Geo, 1.0, 1.1, 1.0005, -1.1, -1.1, 1.0, false),
        ];
        for (c, a, r, w, loss, grad, weight, hit) in cases {
            let e = eval_corrected(&[&[r]], &[&[w]], &[&[1.0]], &[a], &with(c, None));
            let what = format!("{c:?} A={a} r={r} w={w}");
            assert!(close(e.loss, loss), "{what}: loss {}", e.loss);
            assert!(close(e.grad[0][0], grad), "{what}: grad {}", e.grad[0][0]);
            let m = &e.metrics;
            assert!(close(m.is_weight_mean.unwrap(), weight), "{what}");
            let (pos, neg) = if a >= 0.0 {
                (f64::from(u8::from(hit)), 0.0)
            } else {
                (0.0, f64::from(u8::from(hit)))
            };
            assert_eq!(
                (m.is_clip_frac_pos, m.is_clip_frac_neg),
                (Some(pos), Some(neg)),
                "{what}"
            );
        }
        // Two tokens, sequence-level: MIS weighs both by W = 1.5·1.2 = 1.8, or masks both when
        // W = 2.25 leaves the band, although each token's own ratio is inside it.
        let e = eval_corrected(
            &[&[1.1, 0.9]],
            &[&[1.5, 1.2]],
            &[&[1.0, 1.0]],
            &[1.0],
            &with(IsCorrection::Mis, None),
        );
        assert!(close(e.loss, 1.8 * (-1.1 - 0.9) / 2.0));
        assert_grad(&e, &[&[-0.99, -0.81]], "mis kept");
        assert!(close(e.metrics.is_weight_mean.unwrap(), 1.8));
        let e = eval_corrected(
            &[&[1.1, 0.9]],
            &[&[1.5, 1.5]],
            &[&[1.0, 1.0]],
            &[1.0],
            &with(IsCorrection::Mis, None),
        );
        assert_eq!(e.loss, 0.0);
        assert_grad(&e, &[&[0.0, 0.0]], "mis masked");
        assert_eq!(e.metrics.is_clip_frac_pos, Some(1.0));
        // Geo: geometric mean sqrt(1.0005·0.9995) is inside ±0.1 %, sqrt(1.003·1) is not.
        let geo = with(IsCorrection::Geo, None);
        let e = eval_corrected(
            &[&[1.1, 0.9]],
            &[&[1.0005, 0.9995]],
            &[&[1.0, 1.0]],
            &[-1.0],
            &geo,
        );
        assert!(close(e.loss, 1.0));
        assert_grad(&e, &[&[0.55, 0.45]], "geo kept");
        let e = eval_corrected(
            &[&[1.1, 0.9]],
            &[&[1.003, 1.0]],
            &[&[1.0, 1.0]],
            &[-1.0],
            &geo,
        );
        assert_eq!(e.loss, 0.0);
        assert_eq!(
            (e.metrics.is_clip_frac_pos, e.metrics.is_clip_frac_neg),
            (Some(0.0), Some(1.0))
        );
        // Token-level TIS on two tokens with a configured cap of 1.2.
        let e = eval_corrected(
            &[&[1.1, 0.9]],
            &[&[1.5, 1.1]],
            &[&[1.0, 1.0]],
            &[1.0],
            &with(IsCorrection::Tis, Some(1.2)),
        );
        assert!(close(e.loss, (-1.2 * 1.1 - 1.1 * 0.9) / 2.0));
        assert_grad(&e, &[&[-0.66, -0.495]], "tis capped");
        assert_eq!(e.metrics.is_clip_frac_pos, Some(0.5));
        // The correction weighs the policy-gradient term only, not SAPO's.
        let sapo = LossConfig {
            is_correction: IsCorrection::Tis,
            ..LossConfig::default()
        };
        let e = eval_corrected(&[&[0.5]], &[&[1.5]], &[&[1.0]], &[1.0], &sapo);
        assert!(close(e.loss, 1.5 * -0.5 + 0.1 * 2f64.ln()));
        assert!(close(e.grad[0][0], 1.5 * -0.5 - 0.1));
    }

    #[test]
    fn corrections_with_the_sampler_equal_to_old_are_bitwise_uncorrected() {
        let batch = random_batch();
        for kind in [
            LossKind::Grpo,
            LossKind::Sapo,
            LossKind::Cispo,
            LossKind::Llds,
            LossKind::Gspo,
        ] {
            let plain = LossConfig {
                kind,
                ..LossConfig::default()
            };
            let (loss, _) = policy_loss(&batch.inputs(&batch.old, None), &plain).unwrap();
            let want = batch.bits(&loss);
            for correction in [
                IsCorrection::Tis,
                IsCorrection::Mis,
                IsCorrection::Icepop,
                IsCorrection::Geo,
            ] {
                if kind == LossKind::Gspo && !correction.per_sequence() {
                    continue;
                }
                let cfg = LossConfig {
                    is_correction: correction,
                    ..plain.clone()
                };
                let inputs = batch.inputs(&batch.old, Some(&batch.old));
                let (loss, m) = policy_loss(&inputs, &cfg).unwrap();
                assert_eq!(batch.bits(&loss), want, "{kind:?} {correction:?}");
                assert_eq!(m.is_weight_mean, Some(1.0));
                assert_eq!(
                    (m.is_clip_frac_pos, m.is_clip_frac_neg),
                    (Some(0.0), Some(0.0))
                );
            }
        }
    }

    #[test]
    fn meaningless_compositions_and_bounds_are_refused() {
        let refused = |cfg: LossConfig, needle: &str| {
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, TrainError::Config(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        };
        for correction in [IsCorrection::Tis, IsCorrection::Icepop] {
            refused(
                LossConfig {
                    kind: LossKind::Gspo,
                    is_correction: correction,
                    ..LossConfig::default()
                },
                "per-token correction",
            );
        }
        for correction in [IsCorrection::Mis, IsCorrection::Geo] {
            LossConfig {
                kind: LossKind::Gspo,
                is_correction: correction,
                ..LossConfig::default()
            }
            .validate()
            .unwrap();
        }
        refused(
            LossConfig {
                is_max: Some(3.0),
                ..LossConfig::default()
            },
            "is_correction is \"none\"",
        );
        refused(
            LossConfig {
                is_correction: IsCorrection::Geo,
                is_min: Some(1.01),
                ..LossConfig::default()
            },
            "band",
        );
        refused(
            LossConfig {
                cispo_max_weight: 0.9,
                ..LossConfig::default()
            },
            "cispo",
        );
        refused(
            LossConfig {
                clip_eps_high: Some(-0.1),
                ..LossConfig::default()
            },
            "clip_eps_high",
        );
        refused(
            LossConfig {
                llds_lambda: f64::NAN,
                ..LossConfig::default()
            },
            "llds_lambda",
        );
        // A correction without the sampler's log-probs cannot be computed.
        let batch = random_batch();
        let cfg = LossConfig {
            is_correction: IsCorrection::Tis,
            ..LossConfig::default()
        };
        let err = policy_loss(&batch.inputs(&batch.old, None), &cfg).unwrap_err();
        assert!(matches!(err, TrainError::InvalidInput(_)), "{err}");
    }

    #[test]
    fn configs_name_kinds_and_corrections_and_keep_the_old_fields() {
        let cfg: LossConfig = serde_json::from_str(
            r#"{"kind": "llds", "llds_lambda": 0.3, "is_correction": "icepop", "is_max": 4.0,
                "clip_eps_high": 0.28}"#,
        )
        .unwrap();
        assert_eq!(
            (cfg.kind, cfg.is_correction),
            (LossKind::Llds, IsCorrection::Icepop)
        );
        assert_eq!(cfg.is_band(), Some((0.5, 4.0)));
        assert_eq!(cfg.ppo_bounds(), (0.8, 1.28));
        // A config written before the family is SAPO with its own weight and threshold.
        let old: LossConfig =
            serde_json::from_str(r#"{"sapo_weight": 0.3, "sapo_threshold": 0.7, "clip_eps": 0.1}"#)
                .unwrap();
        assert_eq!(old.kind, LossKind::Sapo);
        assert_eq!(
            (old.sapo_weight, old.sapo_threshold, old.clip_eps),
            (0.3, 0.7, 0.1)
        );
        assert_eq!(old.is_correction, IsCorrection::None);
        for bad in [
            r#"{"kind": "ppo"}"#,
            r#"{"is_correction": "vtrace"}"#,
            r#"{"lambda": 1}"#,
        ] {
            assert!(serde_json::from_str::<LossConfig>(bad).is_err(), "{bad}");
        }
        // Metrics written before the family still read.
        let m: LossMetrics = serde_json::from_str(
            r#"{"loss": 0.1, "pg_loss": 0.1, "sapo_loss": 0.0, "kl_ref_loss": 0.0,
                "tokens": 4, "positive_tokens": 2, "negative_tokens": 2, "ratio_mean": 1.0,
                "ratio_min": 1.0, "ratio_max": 1.0, "ratio_below_t_pos": 0.0,
                "ratio_below_t_neg": 0.0, "ratio_below_half_pos": 0.0,
                "ratio_below_half_neg": 0.0, "ratio_below_tenth_pos": 0.0,
                "ratio_below_tenth_neg": 0.0, "sapo_active_frac": 0.0, "clip_frac": 0.0,
                "approx_kl_k1": 0.0, "approx_kl_k3": 0.0, "kl_ref_k3": 0.0,
                "entropy_mean": 1.0}"#,
        )
        .unwrap();
        assert_eq!(
            (m.llds_loss, m.is_weight_mean, m.seq_ratio_mean),
            (0.0, None, None)
        );
    }

    #[test]
    fn micro_batches_add_up_for_every_kind_and_correction() {
        // Three sequences, the first two actions long with a masked observation between them.
        let r: [&[f64]; 3] = [
            &[0.45, 1.1, 2.0, 0.7],
            &[0.6, 1.5, 1.0, 1.0],
            &[0.95, 0.2, 1.3, 0.9],
        ];
        let w: [&[f64]; 3] = [
            &[1.5, 0.9, 1.0, 3.0],
            &[1.1, 1.1, 1.0, 0.98],
            &[1.0, 1.0005, 1.0, 0.3],
        ];
        let mask: [&[f64]; 3] = [
            &[1.0, 1.0, 0.0, 1.0],
            &[1.0, 0.0, 0.0, 1.0],
            &[1.0, 1.0, 1.0, 1.0],
        ];
        let adv = [1.0, -1.0, 0.5];
        let bool_masks: Vec<Vec<bool>> = mask
            .iter()
            .map(|m| m.iter().map(|v| *v > 0.0).collect())
            .collect();
        let norm = LossNormalizer::from_host(&bool_masks, &adv).unwrap();
        let configs = [
            (LossKind::Llds, IsCorrection::Tis),
            (LossKind::Gspo, IsCorrection::Mis),
            (LossKind::Cispo, IsCorrection::Icepop),
            (LossKind::Sapo, IsCorrection::Geo),
        ];
        for (kind, is_correction) in configs {
            let cfg = LossConfig {
                kind,
                is_correction,
                is_min: (is_correction == IsCorrection::Geo).then_some(0.5),
                ..LossConfig::default()
            };
            let whole = eval_corrected(&r, &w, &mask, &adv, &cfg);
            let part = |rows: std::ops::Range<usize>| {
                let dev = Device::Cpu;
                let b = rows.len();
                let values = |f: &dyn Fn(usize) -> Vec<f64>| {
                    let v: Vec<f64> = rows.clone().flat_map(f).collect();
                    Tensor::from_vec(v, (b, 4), &dev).unwrap()
                };
                let logp = values(&|i| r[i].iter().map(|x| -1.0 + x.ln()).collect());
                let sampler = values(&|i| w[i].iter().map(|x| -1.0 - x.ln()).collect());
                let m = values(&|i| mask[i].to_vec());
                let old = Tensor::full(-1.0f64, (b, 4), &dev).unwrap();
                let a = Tensor::from_slice(&adv[rows.clone()], b, &dev).unwrap();
                let inputs = PolicyLossInputs {
                    logp: &logp,
                    logp_old: &old,
                    logp_sampler: Some(&sampler),
                    mask: &m,
                    advantages: &a,
                    ref_logp: None,
                    entropy: None,
                    normalizer: Some(norm),
                };
                policy_loss(&inputs, &cfg).unwrap().1
            };
            let mut merged = part(0..1);
            merged.merge(&part(1..3));
            let what = format!("{kind:?} {is_correction:?}");
            let want = &whole.metrics;
            assert!(
                close(merged.loss, want.loss),
                "{what}: {} vs {}",
                merged.loss,
                want.loss
            );
            for (a, b) in [
                (merged.llds_loss, want.llds_loss),
                (merged.llds_active_frac, want.llds_active_frac),
                (merged.clip_frac, want.clip_frac),
                (merged.is_weight_mean.unwrap(), want.is_weight_mean.unwrap()),
                (
                    merged.is_clip_frac_pos.unwrap(),
                    want.is_clip_frac_pos.unwrap(),
                ),
                (
                    merged.is_clip_frac_neg.unwrap(),
                    want.is_clip_frac_neg.unwrap(),
                ),
                (merged.seq_ratio_mean.unwrap(), want.seq_ratio_mean.unwrap()),
                (merged.seq_ratio_min.unwrap(), want.seq_ratio_min.unwrap()),
            ] {
                assert!(close(a, b), "{what}: {merged:?} vs {want:?}");
            }
            assert_eq!(merged.sequences, 3);
        }
    }

    #[test]
    fn entropy_is_reported_beside_the_samplers_surprisal_on_the_same_tokens() {
        let dev = Device::Cpu;
        // Two sequences of three positions; the last position of the second is masked.
        let old = [-0.5, -1.5, -2.5, -0.25, -0.75, -9.0];
        let entropy = [1.0, 2.0, 3.0, 0.5, 0.5, 9.0];
        let mask = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
        let t = |v: &[f64]| Tensor::from_slice(v, (2, 3), &dev).unwrap();
        let (old, entropy, mask) = (t(&old), t(&entropy), t(&mask));
        let advantages = Tensor::from_slice(&[1.0, -1.0], 2, &dev).unwrap();
        let inputs = |entropy| PolicyLossInputs {
            logp: &old,
            logp_old: &old,
            logp_sampler: None,
            mask: &mask,
            advantages: &advantages,
            ref_logp: None,
            entropy,
            normalizer: None,
        };
        let (_, m) = policy_loss(&inputs(Some(&entropy)), &LossConfig::default()).unwrap();
        assert!(close(m.entropy_mean, 7.0 / 5.0), "{}", m.entropy_mean);
        assert!(
            close(m.behaviour_surprisal_mean, 5.5 / 5.0),
            "{}",
            m.behaviour_surprisal_mean
        );
        // Merged micro-batches weigh each by its tokens, like the other means.
        let mut merged = m.clone();
        merged.merge(&m);
        assert!(close(
            merged.behaviour_surprisal_mean,
            m.behaviour_surprisal_mean
        ));
        let (_, unmeasured) = policy_loss(&inputs(None), &LossConfig::default()).unwrap();
        assert!(unmeasured.entropy_mean.is_nan());
        assert!(unmeasured.behaviour_surprisal_mean.is_nan());
    }
}
