//! Rewards: Search-R1's answer normalisation, exact match and token F1, the format reward, and
//! the policy that turns a trajectory's reward ledger into one training reward.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Reward source names written by the runtime itself. Host feedback uses its own names
/// (`purchase`, `resolved`, ...).
pub mod source {
    /// Exact match of the answer against the gold answers.
    pub const EXACT_MATCH: &str = "exact_match";
    /// Token F1 of the answer against the gold answers.
    pub const F1: &str = "f1";
    /// 1 when the episode ended with a well-formed answer.
    pub const FORMAT: &str = "format";
    /// 1 when the episode called every tool its task names (recorded only when it names some).
    pub const TOOL_CHOICE: &str = "tool_choice";
}

/// One entry of a trajectory's reward ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardEntry {
    /// Where it came from: one of [`source`], or a host feedback kind.
    pub source: String,
    /// The reward value.
    pub value: f64,
    /// Its weight in the training reward.
    pub weight: f64,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Deliveries with the same key are the same feedback; only the first counts.
    pub idempotency_key: Option<String>,
}

impl RewardEntry {
    /// A reward recorded now.
    pub fn now(source: impl Into<String>, value: f64, weight: f64) -> Self {
        Self {
            source: source.into(),
            value,
            weight,
            at: Utc::now(),
            idempotency_key: None,
        }
    }

    /// Rejects non-finite values and weights and empty or oversized source names.
    pub fn validate(&self) -> Result<()> {
        if !self.value.is_finite() {
            return Err(Error::Config(format!(
                "reward value for '{}' must be finite, got {}",
                self.source, self.value
            )));
        }
        if !self.weight.is_finite() {
            return Err(Error::Config(format!(
                "reward weight for '{}' must be finite, got {}",
                self.source, self.weight
            )));
        }
        if self.source.is_empty()
            || self.source.len() > 64
            || !self
                .source
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(Error::Config(format!(
                "reward source '{}' must be 1-64 characters of letters, digits, '_', '-' or '.'",
                self.source
            )));
        }
        Ok(())
    }
}

/// Search-R1's normalisation: lowercase, strip punctuation, drop the articles a/an/the, collapse
/// whitespace.
pub fn normalize_answer(text: &str) -> String {
    let lower = text.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1 if the normalised prediction equals any normalised gold answer, else 0.
pub fn exact_match(prediction: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(prediction);
    if golds.iter().any(|g| normalize_answer(g) == p) {
        1.0
    } else {
        0.0
    }
}

/// The best token-level F1 of the prediction against any gold answer (SQuAD style).
pub fn f1_score(prediction: &str, golds: &[String]) -> f64 {
    let pred = normalize_answer(prediction);
    let pred: Vec<&str> = pred.split_whitespace().collect();
    golds
        .iter()
        .map(|gold| {
            let gold = normalize_answer(gold);
            let gold: Vec<&str> = gold.split_whitespace().collect();
            token_f1(&pred, &gold)
        })
        .fold(0.0, f64::max)
}

fn token_f1(pred: &[&str], gold: &[&str]) -> f64 {
    if pred.is_empty() || gold.is_empty() {
        return if pred == gold { 1.0 } else { 0.0 };
    }
    let mut gold_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in gold {
        *gold_counts.entry(w).or_default() += 1;
    }
    let mut common = 0usize;
    for w in pred {
        if let Some(c) = gold_counts.get_mut(w).filter(|c| **c > 0) {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pred.len() as f64;
    let recall = common as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// How a ledger becomes one training reward: the weighted sum, over sources, of the latest value
/// of each source. A source listed in `weights` uses that weight instead of the entry's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardPolicy {
    /// Per-source weight overrides.
    pub weights: BTreeMap<String, f64>,
}

impl RewardPolicy {
    /// The training reward of `entries`, or `None` when the ledger is empty.
    pub fn combine(&self, entries: &[RewardEntry]) -> Option<f64> {
        let mut latest: BTreeMap<&str, &RewardEntry> = BTreeMap::new();
        for e in entries {
            match latest.get(e.source.as_str()) {
                Some(prev) if prev.at > e.at => {}
                _ => {
                    latest.insert(&e.source, e);
                }
            }
        }
        if latest.is_empty() {
            return None;
        }
        Some(
            latest
                .values()
                .map(|e| self.weights.get(&e.source).copied().unwrap_or(e.weight) * e.value)
                .sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golds(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalisation_follows_search_r1() {
        assert_eq!(normalize_answer("  The Aurora   Tote! "), "aurora tote");
        assert_eq!(normalize_answer("An apple, a pear."), "apple pear");
        assert_eq!(normalize_answer("$129.99"), "12999");
        assert_eq!(normalize_answer("Theatre"), "theatre");
    }

    #[test]
    fn exact_match_and_f1() {
        assert_eq!(exact_match("the Leather.", &golds(&["leather"])), 1.0);
        assert_eq!(exact_match("vegan leather", &golds(&["leather"])), 0.0);
        assert_eq!(exact_match("x", &[]), 0.0);
        assert!((f1_score("vegan leather", &golds(&["leather"])) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1_score("blue", &golds(&["red", "blue"])), 1.0);
        assert_eq!(f1_score("", &golds(&["red"])), 0.0);
        assert_eq!(f1_score("a the", &golds(&["an"])), 1.0);
    }

    #[test]
    fn policy_uses_latest_value_per_source() {
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(5);
        let entries = vec![
            RewardEntry {
                at: t1,
                ..RewardEntry::now("purchase", 1.0, 2.0)
            },
            RewardEntry {
                at: t0,
                ..RewardEntry::now("purchase", 0.0, 2.0)
            },
            RewardEntry {
                at: t0,
                ..RewardEntry::now(source::EXACT_MATCH, 1.0, 1.0)
            },
        ];
        assert_eq!(RewardPolicy::default().combine(&entries), Some(3.0));
        let mut p = RewardPolicy::default();
        p.weights.insert("purchase".into(), 0.5);
        assert_eq!(p.combine(&entries), Some(1.5));
        assert_eq!(p.combine(&[]), None);
    }

    #[test]
    fn entries_are_validated() {
        assert!(RewardEntry::now("f1", f64::NAN, 1.0).validate().is_err());
        assert!(
            RewardEntry::now("f1", 1.0, f64::INFINITY)
                .validate()
                .is_err()
        );
        assert!(RewardEntry::now("bad source", 1.0, 1.0).validate().is_err());
        assert!(RewardEntry::now("", 1.0, 1.0).validate().is_err());
        RewardEntry::now("purchase", 1.0, 1.0).validate().unwrap();
    }
}
