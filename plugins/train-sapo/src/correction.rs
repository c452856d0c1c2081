//! The sampler→behaviour importance correction: a detached weight per token for the gap between
//! the sampler (the serving engine) and the trainer's own recomputation of the same behaviour
//! policy.
//!
//! With `logp_old` the trainer's recomputed behaviour log-prob and `logp_sampler` the one the
//! sampler recorded, a token's raw weight is `w = exp(logp_old - logp_sampler)`, that is
//! `π_old / π_sampler`. A correction turns it into the weight `c` that multiplies the token's
//! policy-gradient term after clipping. `c` is a constant: no gradient flows through it.
//!
//! ```text
//! tis     c = clamp(w, min, max)                                   token-level truncation
//! icepop  c = w if min <= w <= max, else 0                          token-level masking
//! mis     c = W if min <= W <= max, else 0;  W = exp(Σ_t log w)     sequence-level masking
//! geo     c = 1 if min <= G <= max, else 0;  G = exp(mean_t log w)  sequence-level rejection
//! ```
//!
//! `tis` is verl's token-level truncated importance sampling (`rollout_is = "token"`, cap 2 by
//! default). `icepop` is Ring-1T's IcePop mask (arXiv 2510.18855, band [0.5, 5]). `mis` masks on
//! the whole sequence's ratio, as TRL's `sequence_mask` and verl's Seq-MIS do (band [0.5, 2]).
//! `geo` is verl's geometric-mean rejection sampling (`seq_mean_k1`, "Geo-RS", band
//! [0.999, 1.001]), which drops sequences without reweighting the rest. The band always bounds
//! `π_old / π_sampler` (verl's k1 statistic is written the other way round, which matters only
//! for asymmetric bands).
//!
//! A rejected token keeps its place in the loss's denominators, as in TRL: only its term becomes
//! zero. The normaliser of a mini-batch therefore stays a count of trained tokens, known before
//! any forward pass, and gradient accumulation over micro-batches still adds up exactly. Only the
//! policy-gradient term is weighted: SAPO's and LLDS's terms and the KL penalty pull toward
//! `π_old` or the reference model, and the implementations this follows leave them unweighted.

use serde::{Deserialize, Serialize};

use crate::loss::masked_row_sums;

/// Which sampler→behaviour correction weights the policy-gradient term (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsCorrection {
    /// No correction: every weight is 1, and no weight is even computed.
    #[default]
    None,
    /// Token-level truncated importance sampling: `clamp(w, min, max)`.
    Tis,
    /// Sequence-level masked importance sampling: the sequence's ratio inside the band, else 0.
    Mis,
    /// IcePop's token-level mask: `w` inside the band, else 0.
    Icepop,
    /// Geometric-mean rejection: 1 when the sequence's geometric-mean ratio is inside the band,
    /// else 0.
    Geo,
}

impl IsCorrection {
    /// The name config files and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tis => "tis",
            Self::Mis => "mis",
            Self::Icepop => "icepop",
            Self::Geo => "geo",
        }
    }

    /// The band `(min, max)` used where a config names no bound: the defaults of the
    /// implementations each correction comes from. `None` for no correction, which has no band.
    pub fn default_band(self) -> Option<(f64, f64)> {
        match self {
            Self::None => None,
            // verl's rollout_is_threshold; truncation from above only.
            Self::Tis => Some((0.0, 2.0)),
            // verl's decoupled_seq_is_rs preset and TRL's MIS example.
            Self::Mis => Some((0.5, 2.0)),
            Self::Icepop => Some((0.5, 5.0)),
            // verl's Geo-RS preset: ±0.1 % on the geometric mean.
            Self::Geo => Some((0.999, 1.001)),
        }
    }

    /// Whether the correction gives every token of a sequence the same weight, decided on the
    /// whole sequence; such a correction suits a sequence-level loss (GSPO).
    pub fn per_sequence(self) -> bool {
        matches!(self, Self::Mis | Self::Geo)
    }
}

/// What a correction did to one `(B, L)` batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CorrectionWeights {
    /// The weight `c` of each position, row-major; 0 at masked positions.
    pub weights: Vec<f64>,
    /// Whether each unmasked position's weight was truncated (`tis`) or the token masked
    /// (`icepop`, `mis`, `geo`).
    pub clipped: Vec<bool>,
}

/// The weights of `correction` for a row-major `(B, L)` batch with `l` positions per row, from
/// `log_w = logp_old - logp_sampler` and the mask (`> 0` for trained positions). `None` for no
/// correction.
pub(crate) fn correction_weights(
    correction: IsCorrection,
    (min, max): (f64, f64),
    log_w: &[f64],
    mask: &[f64],
    l: usize,
) -> Option<CorrectionWeights> {
    let inside = |v: f64| (min..=max).contains(&v);
    let n = log_w.len();
    let mut weights = vec![0.0; n];
    let mut clipped = vec![false; n];
    match correction {
        IsCorrection::None => return None,
        IsCorrection::Tis | IsCorrection::Icepop => {
            for k in (0..n).filter(|&k| mask[k] > 0.0) {
                let w = log_w[k].exp();
                clipped[k] = !inside(w);
                weights[k] = match (correction, clipped[k]) {
                    (IsCorrection::Tis, _) => w.clamp(min, max),
                    (_, false) => w,
                    (_, true) => 0.0,
                };
            }
        }
        IsCorrection::Mis | IsCorrection::Geo => {
            let rows = n.checked_div(l).unwrap_or(0);
            for (i, (sum, count)) in masked_row_sums(log_w, mask, rows, l)
                .into_iter()
                .enumerate()
            {
                let (statistic, kept_weight) = if correction == IsCorrection::Mis {
                    let w = sum.exp();
                    (w, w)
                } else {
                    ((sum / count.max(1) as f64).exp(), 1.0)
                };
                let keep = inside(statistic);
                for k in (i * l..(i + 1) * l).filter(|&k| mask[k] > 0.0) {
                    weights[k] = if keep { kept_weight } else { 0.0 };
                    clipped[k] = !keep;
                }
            }
        }
    }
    Some(CorrectionWeights { weights, clipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Weights of one row of ratios `w` (all positions trained unless `mask` says otherwise).
    fn row(correction: IsCorrection, w: &[f64], mask: &[f64]) -> CorrectionWeights {
        let log_w: Vec<f64> = w.iter().map(|x| x.ln()).collect();
        let band = correction.default_band().unwrap();
        correction_weights(correction, band, &log_w, mask, w.len()).unwrap()
    }

    #[test]
    fn token_level_corrections_truncate_or_mask_each_token() {
        let w = [0.4, 1.5, 3.0, 6.0, 0.9];
        let mask = [1.0, 1.0, 1.0, 1.0, 0.0];
        let tis = row(IsCorrection::Tis, &w, &mask);
        for (c, want) in tis.weights.iter().zip([0.4, 1.5, 2.0, 2.0, 0.0]) {
            assert!(close(*c, want), "{c} != {want}");
        }
        assert_eq!(tis.clipped, [false, false, true, true, false]);
        let icepop = row(IsCorrection::Icepop, &w, &mask);
        for (c, want) in icepop.weights.iter().zip([0.0, 1.5, 3.0, 0.0, 0.0]) {
            assert!(close(*c, want), "{c} != {want}");
        }
        assert_eq!(icepop.clipped, [true, false, false, true, false]);
    }

    #[test]
    fn sequence_level_corrections_decide_on_the_whole_row() {
        // Two rows of three positions: the second row's middle position is masked, so its
        // statistics cover two tokens.
        let w = [1.5, 1.2, 1.0, 1.5, 40.0, 1.5];
        let mask = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        let log_w: Vec<f64> = w.iter().map(|x: &f64| x.ln()).collect();
        let band = IsCorrection::Mis.default_band().unwrap();
        let mis = correction_weights(IsCorrection::Mis, band, &log_w, &mask, 3).unwrap();
        // Row 0: W = 1.8, kept with weight 1.8; row 1: W = 2.25, masked.
        for (c, want) in mis.weights.iter().zip([1.8, 1.8, 1.8, 0.0, 0.0, 0.0]) {
            assert!(close(*c, want), "{c} != {want}");
        }
        assert_eq!(mis.clipped, [false, false, false, true, false, true]);
        let w = [1.0005, 0.9995, 1.002, 1.003, 1.0];
        let log_w: Vec<f64> = w.iter().map(|x: &f64| x.ln()).collect();
        let band = IsCorrection::Geo.default_band().unwrap();
        // One row of five positions; the masks choose which of them form the sequence.
        let mask_a = [1.0, 1.0, 0.0, 0.0, 0.0];
        let geo = correction_weights(IsCorrection::Geo, band, &log_w, &mask_a, 5).unwrap();
        assert_eq!(geo.weights, [1.0, 1.0, 0.0, 0.0, 0.0]);
        let mask_b = [0.0, 0.0, 0.0, 1.0, 1.0];
        let geo = correction_weights(IsCorrection::Geo, band, &log_w, &mask_b, 5).unwrap();
        // G = sqrt(1.003) = 1.0015: outside ±0.1 %, although 1.0 alone is inside.
        assert_eq!(geo.weights, [0.0; 5]);
        assert_eq!(geo.clipped, [false, false, false, true, true]);
    }

    #[test]
    fn no_correction_computes_nothing() {
        assert!(correction_weights(IsCorrection::None, (0.0, 1.0), &[0.0], &[1.0], 1).is_none());
        assert!(IsCorrection::None.default_band().is_none());
        assert!(IsCorrection::Mis.per_sequence() && IsCorrection::Geo.per_sequence());
        assert!(!IsCorrection::Tis.per_sequence() && !IsCorrection::Icepop.per_sequence());
    }
}
