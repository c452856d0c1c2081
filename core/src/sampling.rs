//! The sampling distribution and one draw from it: temperature, top-k, top-p, and the exact
//! natural-log probability of the drawn token under the distribution it was drawn from.
//!
//! Everything is computed in f64 from the model's f32 logits, so the recorded log-probability
//! is the distribution's own to well below f32 rounding.

use std::cmp::Ordering;

/// First candidate-set size tried when only top-p truncates; it grows until it holds the nucleus.
const FIRST_NUCLEUS_GUESS: usize = 64;

/// How one token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawSettings {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Nucleus mass kept (1 keeps everything).
    pub top_p: f32,
    /// Most likely tokens kept (0 keeps everything).
    pub top_k: usize,
}

/// The chosen token and its natural-log probability under the distribution it was drawn from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Token id (index into the logits).
    pub token: u32,
    /// Natural-log probability after temperature and truncation; 0 for a greedy choice, whose
    /// distribution puts all its mass on that token.
    pub logprob: f32,
}

/// Draws one token from `logits` with the uniform variate `uniform` in `[0, 1)`.
///
/// Greedy choice (temperature 0) takes the most likely token, the lowest id on ties. Otherwise
/// the distribution is `softmax(logits / temperature)`, cut to the `top_k` most likely tokens,
/// then to the smallest most-likely-first prefix whose mass (relative to what top-k kept) reaches
/// `top_p`, and renormalized; this is the order Hugging Face's warpers apply. Tokens with logit
/// `-inf` are never drawn.
pub fn draw(logits: &[f32], settings: &DrawSettings, uniform: f64) -> Result<Draw, String> {
    if let Some((index, value)) = logits
        .iter()
        .enumerate()
        .find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
    {
        return Err(format!(
            "the model produced logit {value} for token {index}"
        ));
    }
    let Some(best) = most_likely(logits) else {
        return Err("every logit is -inf: no token can be drawn".into());
    };
    if settings.temperature == 0.0 {
        return Ok(Draw {
            token: token_id(best),
            logprob: 0.0,
        });
    }

    let inverse_temperature = 1.0 / f64::from(settings.temperature);
    let max_scaled = f64::from(logits[best]) * inverse_temperature;
    // Unnormalized probability exp(z - max z), with z = logit / temperature.
    let weight = |index: usize| (f64::from(logits[index]) * inverse_temperature - max_scaled).exp();
    let truncates = settings.top_k > 0 || settings.top_p < 1.0;

    let (chosen, kept_mass) = if truncates {
        let kept = truncated_support(logits, settings, &weight);
        let kept_mass: f64 = kept.iter().map(|&i| weight(i)).sum();
        (
            pick(kept.iter().copied(), &weight, uniform * kept_mass),
            kept_mass,
        )
    } else {
        let total: f64 = (0..logits.len()).map(&weight).sum();
        (pick(0..logits.len(), &weight, uniform * total), total)
    };
    let chosen = chosen.unwrap_or(best);
    let logprob = (weight(chosen).ln() - kept_mass.ln()) as f32;
    Ok(Draw {
        token: token_id(chosen),
        logprob,
    })
}

/// The tokens top-k and top-p keep, most likely first.
fn truncated_support(
    logits: &[f32],
    settings: &DrawSettings,
    weight: &impl Fn(usize) -> f64,
) -> Vec<usize> {
    let finite = logits.iter().filter(|v| v.is_finite()).count();
    let top_k = if settings.top_k == 0 {
        finite
    } else {
        settings.top_k.min(finite)
    };
    if settings.top_p >= 1.0 {
        return most_likely_first(logits, top_k);
    }
    // The nucleus is measured against the mass top-k kept (all of it without top-k).
    let top_p = f64::from(settings.top_p);
    let reference_mass: f64 = if top_k == finite {
        (0..logits.len()).map(weight).sum()
    } else {
        most_likely_first(logits, top_k)
            .into_iter()
            .map(weight)
            .sum()
    };
    let mut guess = FIRST_NUCLEUS_GUESS.min(top_k);
    loop {
        let candidates = most_likely_first(logits, guess);
        let mut mass_before = 0.0;
        let mut kept = Vec::new();
        for index in candidates {
            if mass_before >= top_p * reference_mass {
                return kept;
            }
            mass_before += weight(index);
            kept.push(index);
        }
        if guess == top_k {
            return kept;
        }
        guess = (guess * 4).min(top_k);
    }
}

/// Walks `candidates` accumulating weights and returns the first whose running total passes
/// `target`; `None` only when rounding left `target` at the very end of the mass.
fn pick(
    candidates: impl Iterator<Item = usize>,
    weight: &impl Fn(usize) -> f64,
    target: f64,
) -> Option<usize> {
    let mut running = 0.0;
    let mut last_positive = None;
    for index in candidates {
        let w = weight(index);
        if w <= 0.0 {
            continue;
        }
        running += w;
        last_positive = Some(index);
        if running > target {
            return Some(index);
        }
    }
    last_positive
}

/// Orders token `a` before `b` when it is more likely, the lower id first on ties, so every
/// ordering (and hence every draw) is deterministic.
fn likelier(logits: &[f32], a: usize, b: usize) -> Ordering {
    logits[b]
        .partial_cmp(&logits[a])
        .unwrap_or(Ordering::Equal)
        .then(a.cmp(&b))
}

/// The `count` most likely finite tokens, most likely first.
fn most_likely_first(logits: &[f32], count: usize) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if count == 0 {
        return Vec::new();
    }
    if count < indices.len() {
        indices.select_nth_unstable_by(count - 1, |&a, &b| likelier(logits, a, b));
        indices.truncate(count);
    }
    indices.sort_unstable_by(|&a, &b| likelier(logits, a, b));
    indices
}

/// The most likely finite token, the lowest id on ties.
fn most_likely(logits: &[f32]) -> Option<usize> {
    (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .min_by(|&a, &b| likelier(logits, a, b))
}

fn token_id(index: usize) -> u32 {
    // Vocabularies are far below 2^32 entries; saturating keeps this total without a panic.
    u32::try_from(index).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(temperature: f32, top_p: f32, top_k: usize) -> DrawSettings {
        DrawSettings {
            temperature,
            top_p,
            top_k,
        }
    }

    fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / total).collect()
    }

    #[test]
    fn greedy_takes_the_most_likely_token_with_logprob_zero() {
        let logits = [0.5, 3.0, 3.0, -1.0];
        let draw = draw(&logits, &settings(0.0, 1.0, 0), 0.99).unwrap();
        assert_eq!(
            draw,
            Draw {
                token: 1,
                logprob: 0.0
            }
        );
    }

    #[test]
    fn untruncated_logprob_is_the_tempered_softmax() {
        let logits = [1.0, 2.0, 0.5, -3.0, 2.5];
        for temperature in [0.5f32, 1.0, 1.7] {
            let probs = softmax(&logits, temperature as f64);
            for u in [0.0, 0.1, 0.37, 0.5, 0.9, 0.999_999] {
                let d = draw(&logits, &settings(temperature, 1.0, 0), u).unwrap();
                let expected = probs[d.token as usize].ln();
                assert!((d.logprob as f64 - expected).abs() < 1e-6);
                // The inverse-CDF draw walks tokens in id order.
                let mut cumulative = 0.0;
                let expected_token = probs
                    .iter()
                    .position(|p| {
                        cumulative += p;
                        cumulative > u
                    })
                    .unwrap();
                assert_eq!(d.token as usize, expected_token);
            }
        }
    }

    #[test]
    fn top_k_and_top_p_renormalize_over_what_they_keep() {
        let logits = [2.0, 1.0, 0.0, -1.0, 3.0];
        let probs = softmax(&logits, 1.0);
        // Top-2 keeps tokens 4 and 0.
        for u in [0.0, 0.5, 0.99] {
            let d = draw(&logits, &settings(1.0, 1.0, 2), u).unwrap();
            assert!(d.token == 4 || d.token == 0);
            let kept = probs[4] + probs[0];
            assert!((d.logprob as f64 - (probs[d.token as usize] / kept).ln()).abs() < 1e-6);
        }
        // Top-p 0.8: token 4 has ~0.636, adding token 0 (~0.234) reaches the mass.
        assert!(probs[4] < 0.8 && probs[4] + probs[0] >= 0.8);
        let d = draw(&logits, &settings(1.0, 0.8, 0), 0.99).unwrap();
        assert_eq!(d.token, 0);
        assert!((d.logprob as f64 - (probs[0] / (probs[4] + probs[0])).ln()).abs() < 1e-6);
        // A tiny top-p keeps only the most likely token, with probability 1.
        let d = draw(&logits, &settings(1.0, 0.01, 0), 0.7).unwrap();
        assert_eq!(
            d,
            Draw {
                token: 4,
                logprob: 0.0
            }
        );
    }

    #[test]
    fn the_nucleus_search_grows_past_its_first_guess() {
        // 1000 equally likely tokens: top-p 0.5 must keep 500, beyond the first guess of 64.
        let logits = vec![0.0f32; 1000];
        let d = draw(&logits, &settings(1.0, 0.5, 0), 0.999).unwrap();
        assert_eq!(d.token, 499);
        assert!((d.logprob as f64 - (1.0f64 / 500.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn masked_tokens_are_never_drawn_and_bad_logits_are_errors() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        for u in [0.0, 0.5, 0.999] {
            let d = draw(&logits, &settings(1.0, 1.0, 0), u).unwrap();
            assert_eq!(
                d,
                Draw {
                    token: 1,
                    logprob: 0.0
                }
            );
        }
        assert!(draw(&[f32::NEG_INFINITY; 3], &settings(1.0, 1.0, 0), 0.5).is_err());
        assert!(draw(&[0.0, f32::NAN], &settings(1.0, 1.0, 0), 0.5).is_err());
        assert!(draw(&[0.0, f32::INFINITY], &settings(0.0, 1.0, 0), 0.5).is_err());
        assert!(draw(&[], &settings(1.0, 1.0, 0), 0.5).is_err());
    }
}
