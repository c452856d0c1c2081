//! GRPO advantages and the GRPO + SAPO policy loss, with the metrics that expose
//! importance-sampling distribution drift.
//!
//! Per generated token, with `r = exp(logp_theta - logp_old)` and the sequence's advantage `A`:
//!
//! ```text
//! L_pg   = -min(r·A, clip(r, 1-eps, 1+eps)·A)      token-mean over unmasked tokens
//! L_sapo = w · mean over unmasked tokens of sequences with A >= 0 of
//!              1[r <= t] · (logp_old - logp_theta)
//! L      = L_pg + L_sapo (+ beta · k3(ref, theta), token-mean)
//! ```
//!
//! `L_pg` is the standard PPO clipped surrogate. DESIGN.md sketches it as
//! `-A · min(r, clip(r))`, which differs for `A < 0`; the sketch means the standard form, which
//! is what is implemented: for `A >= 0` the token is clipped (zero gradient) when `r > 1+eps`,
//! for `A < 0` when `r < 1-eps`, and otherwise its gradient is `-A·r·∇logp`.
//!
//! The SAPO indicator `1[r <= t]` and the sign of `A` are evaluated without gradient; the term's
//! gradient is `-w·∇logp / N_pos`, not scaled by `r`, which is what pulls back positive tokens
//! whose probability collapsed. When there are no unmasked tokens with `A >= 0` the term is 0
//! (never 0/0). With `w = 0` the term is not built at all, so the loss and its gradients are
//! exactly GRPO's.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

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
}

/// Hyper-parameters of the policy loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Config files name only the fields they change, and a misspelt field is an error.
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// PPO clip range `eps`.
    pub clip_eps: f64,
    /// SAPO weight `w`; 0 gives plain GRPO.
    pub sapo_weight: f64,
    /// SAPO ratio threshold `t`: the term is active on positive tokens with `r <= t`.
    pub sapo_threshold: f64,
    /// Weight `beta` of the k3 KL penalty to the reference (base) model; 0 disables it.
    pub kl_beta: f64,
    /// How the policy-gradient term is averaged.
    pub aggregation: LossAggregation,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            clip_eps: 0.2,
            sapo_weight: 0.1,
            sapo_threshold: 0.8,
            kl_beta: 0.0,
            aggregation: LossAggregation::TokenMean,
        }
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
    /// Unmasked tokens in sequences with `A >= 0` (SAPO denominator).
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
/// the stated token sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossMetrics {
    /// Total loss.
    pub loss: f64,
    /// Policy-gradient (clipped surrogate) term.
    pub pg_loss: f64,
    /// SAPO term (already multiplied by `w`).
    pub sapo_loss: f64,
    /// KL-to-reference term (already multiplied by `beta`).
    pub kl_ref_loss: f64,
    /// Unmasked tokens.
    pub tokens: usize,
    /// Unmasked tokens with `A >= 0`.
    pub positive_tokens: usize,
    /// Unmasked tokens with `A < 0`.
    pub negative_tokens: usize,
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
    /// Fraction of unmasked tokens where the SAPO indicator is on (`A >= 0` and `r <= t`).
    pub sapo_active_frac: f64,
    /// Fraction of unmasked tokens whose surrogate is clipped (zero gradient).
    pub clip_frac: f64,
    /// k1 estimate of KL(old || new): mean of `logp_old - logp`.
    pub approx_kl_k1: f64,
    /// k3 estimate of KL(old || new): mean of `r - 1 - log r`.
    pub approx_kl_k3: f64,
    /// Mean k3 KL to the reference model (NaN without reference log-probs).
    pub kl_ref_k3: f64,
    /// Mean entropy over unmasked tokens (NaN without entropies).
    pub entropy_mean: f64,
}

impl LossMetrics {
    /// Folds another micro-batch's metrics into these: losses add, means are weighted by their
    /// token counts, extremes combine.
    pub fn merge(&mut self, o: &LossMetrics) {
        let wmean = |a: f64, na: usize, b: f64, nb: usize| -> f64 {
            match (na, nb) {
                (0, 0) => a,
                (0, _) => b,
                (_, 0) => a,
                _ => (a * na as f64 + b * nb as f64) / (na + nb) as f64,
            }
        };
        let (n1, n2) = (self.tokens, o.tokens);
        let (p1, p2) = (self.positive_tokens, o.positive_tokens);
        let (m1, m2) = (self.negative_tokens, o.negative_tokens);
        self.loss += o.loss;
        self.pg_loss += o.pg_loss;
        self.sapo_loss += o.sapo_loss;
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
        self.sapo_active_frac = wmean(self.sapo_active_frac, n1, o.sapo_active_frac, n2);
        self.clip_frac = wmean(self.clip_frac, n1, o.clip_frac, n2);
        self.approx_kl_k1 = wmean(self.approx_kl_k1, n1, o.approx_kl_k1, n2);
        self.approx_kl_k3 = wmean(self.approx_kl_k3, n1, o.approx_kl_k3, n2);
        self.kl_ref_k3 = wmean(self.kl_ref_k3, n1, o.kl_ref_k3, n2);
        self.entropy_mean = wmean(self.entropy_mean, n1, o.entropy_mean, n2);
        self.tokens = n1 + n2;
        self.positive_tokens = p1 + p2;
        self.negative_tokens = m1 + m2;
    }
}

/// The GRPO + SAPO loss (see the module docs) and its metrics.
pub fn policy_loss(
    inputs: &PolicyLossInputs<'_>,
    config: &LossConfig,
) -> Result<(Tensor, LossMetrics)> {
    let logp = inputs.logp;
    let (b, l) = logp.dims2()?;
    let dtype = logp.dtype();
    let device = logp.device();
    for (name, t) in [("logp_old", inputs.logp_old), ("mask", inputs.mask)] {
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
    if config.kl_beta != 0.0 && inputs.ref_logp.is_none() {
        return Err(TrainError::InvalidInput(
            "kl_beta is set but no reference log-probs were given".to_string(),
        ));
    }
    let logp_old = inputs.logp_old.to_dtype(dtype)?.detach();
    let mask = inputs.mask.to_dtype(dtype)?.detach();
    let adv_host = inputs.advantages.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let adv = inputs
        .advantages
        .to_dtype(dtype)?
        .detach()
        .unsqueeze(1)?
        .broadcast_as((b, l))?;
    let norm = match inputs.normalizer {
        Some(n) => n,
        None => LossNormalizer::from_tensors(&mask, &adv_host)?,
    };

    let log_ratio = (logp - &logp_old)?;
    let ratio = log_ratio.exp()?;

    // Host copies decide the no-gradient branches (clipping, the SAPO indicator) and feed the
    // metrics. They are the same floats the device holds, so the decisions are exact.
    let ratio_host = to_host(&ratio)?;
    let mask_host = to_host(&mask)?;
    let eps = config.clip_eps;
    let lo = 1.0 - eps;
    let hi = 1.0 + eps;
    let mut clipped = vec![0u8; b * l];
    let mut active = vec![0f64; b * l];
    for (i, &a) in adv_host.iter().enumerate() {
        for j in 0..l {
            let k = i * l + j;
            let r = ratio_host[k];
            if mask_host[k] > 0.0 && ((a >= 0.0 && r > hi) || (a < 0.0 && r < lo)) {
                clipped[k] = 1;
            }
            if mask_host[k] > 0.0 && a >= 0.0 && r <= config.sapo_threshold {
                active[k] = 1.0;
            }
        }
    }
    let clipped = Tensor::from_vec(clipped, (b, l), device)?;
    // min(r·A, clip(r)·A): on clipped tokens the clipped value wins and is a constant; elsewhere
    // r·A wins (or ties with it inside the range), so its gradient is A·r·∇logp.
    let unclipped = (&ratio * &adv)?;
    let clipped_value = (ratio.detach().clamp(lo, hi)? * &adv)?;
    let surrogate = clipped.where_cond(&clipped_value, &unclipped)?;
    let per_token = (surrogate.neg()? * &mask)?;
    let pg = match config.aggregation {
        LossAggregation::TokenMean => (per_token.sum_all()? / norm.tokens.max(1.0))?,
        LossAggregation::SeqMeanTokenMean => {
            let counts = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (per_token.sum(1)?.div(&counts)?.sum_all()? / norm.sequences.max(1.0))?
        }
    };
    let mut loss = pg.clone();

    let mut sapo_value = 0.0;
    if config.sapo_weight != 0.0 && norm.positive_tokens > 0.0 {
        let active_t = Tensor::from_vec(active.clone(), (b, l), device)?.to_dtype(dtype)?;
        let sapo = ((log_ratio.neg()? * active_t)?.sum_all()?
            * (config.sapo_weight / norm.positive_tokens))?;
        sapo_value = scalar(&sapo)?;
        loss = (loss + sapo)?;
    }

    let mut kl_ref_value = 0.0;
    let mut kl_ref_mean = f64::NAN;
    if let Some(ref_logp) = inputs.ref_logp {
        let d = (ref_logp.to_dtype(dtype)?.detach() - logp)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        let k3_sum = (k3 * &mask)?.sum_all()?;
        let k3_host = scalar(&k3_sum)?;
        let n = mask_host.iter().filter(|&&m| m > 0.0).count();
        if n > 0 {
            kl_ref_mean = k3_host / n as f64;
        }
        if config.kl_beta != 0.0 {
            let kl = (k3_sum * (config.kl_beta / norm.tokens.max(1.0)))?;
            kl_ref_value = scalar(&kl)?;
            loss = (loss + kl)?;
        }
    }

    let entropy_host = match inputs.entropy {
        Some(e) => Some(to_host(e)?),
        None => None,
    };
    let log_ratio_host = to_host(&log_ratio)?;
    let mut m = Counts::default();
    for (i, &a) in adv_host.iter().enumerate() {
        let pos = a >= 0.0;
        for j in 0..l {
            let k = i * l + j;
            if mask_host[k] <= 0.0 {
                continue;
            }
            let r = ratio_host[k];
            m.tokens += 1;
            m.ratio_sum += r;
            m.ratio_min = m.ratio_min.min(r);
            m.ratio_max = m.ratio_max.max(r);
            let below = [r < config.sapo_threshold, r < 0.5, r < 0.1];
            if pos {
                m.pos += 1;
                for (acc, hit) in m.below_pos.iter_mut().zip(below) {
                    *acc += usize::from(hit);
                }
            } else {
                m.neg += 1;
                for (acc, hit) in m.below_neg.iter_mut().zip(below) {
                    *acc += usize::from(hit);
                }
            }
            m.active += usize::from(active[k] > 0.0);
            let lr = log_ratio_host[k];
            m.k1 += -lr;
            m.k3 += (r - 1.0) - lr;
            if let Some(e) = &entropy_host {
                m.entropy += e[k];
            }
        }
    }
    let clip_count = clipped
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    let frac = |num: f64, den: usize| if den == 0 { 0.0 } else { num / den as f64 };
    let metrics = LossMetrics {
        loss: scalar(&loss)?,
        pg_loss: scalar(&pg)?,
        sapo_loss: sapo_value,
        kl_ref_loss: kl_ref_value,
        tokens: m.tokens,
        positive_tokens: m.pos,
        negative_tokens: m.neg,
        ratio_mean: frac(m.ratio_sum, m.tokens),
        ratio_min: if m.tokens == 0 { f64::NAN } else { m.ratio_min },
        ratio_max: if m.tokens == 0 { f64::NAN } else { m.ratio_max },
        ratio_below_t_pos: frac(m.below_pos[0] as f64, m.pos),
        ratio_below_t_neg: frac(m.below_neg[0] as f64, m.neg),
        ratio_below_half_pos: frac(m.below_pos[1] as f64, m.pos),
        ratio_below_half_neg: frac(m.below_neg[1] as f64, m.neg),
        ratio_below_tenth_pos: frac(m.below_pos[2] as f64, m.pos),
        ratio_below_tenth_neg: frac(m.below_neg[2] as f64, m.neg),
        sapo_active_frac: frac(m.active as f64, m.tokens),
        clip_frac: frac(clip_count, m.tokens),
        approx_kl_k1: frac(m.k1, m.tokens),
        approx_kl_k3: frac(m.k3, m.tokens),
        kl_ref_k3: kl_ref_mean,
        entropy_mean: if entropy_host.is_some() {
            frac(m.entropy, m.tokens)
        } else {
            f64::NAN
        },
    };
    Ok((loss, metrics))
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
    k1: f64,
    k3: f64,
    entropy: f64,
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
            k1: 0.0,
            k3: 0.0,
            entropy: 0.0,
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
        let inputs = PolicyLossInputs {
            logp: logp.as_tensor(),
            logp_old: &old,
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

    #[test]
    fn zero_sapo_weight_is_bitwise_grpo() {
        let dev = Device::Cpu;
        let logp =
            Var::from_tensor(&(Tensor::randn(0f32, 1.0, (3, 6), &dev).unwrap() - 2.0).unwrap())
                .unwrap();
        // Old log-probs spread enough that ratios fall inside, above and below the clip range.
        let old = (logp.as_tensor() + Tensor::randn(0f32, 0.5, (3, 6), &dev).unwrap())
            .unwrap()
            .detach();
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
        let cfg = LossConfig {
            sapo_weight: 0.0,
            ..LossConfig::default()
        };
        let inputs = PolicyLossInputs {
            logp: logp.as_tensor(),
            logp_old: &old,
            mask: &mask,
            advantages: &adv,
            ref_logp: None,
            entropy: None,
            normalizer: None,
        };
        let (ours, m) = policy_loss(&inputs, &cfg).unwrap();
        assert!(
            m.clip_frac > 0.0 && m.clip_frac < 1.0,
            "the data must exercise clipping"
        );
        let theirs = textbook_grpo(logp.as_tensor(), &old, &mask, &adv, cfg.clip_eps);
        assert_eq!(
            ours.to_scalar::<f32>().unwrap().to_bits(),
            theirs.to_scalar::<f32>().unwrap().to_bits()
        );
        let g1 = ours
            .backward()
            .unwrap()
            .get(logp.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let g2 = theirs
            .backward()
            .unwrap()
            .get(logp.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&g1), bits(&g2));
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
}
