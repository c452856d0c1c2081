//! From stored trajectories to the trainer's input: one [`TrainSequence`] per usable episode,
//! with the reasons the others were left out, and the batch statistics the metrics report.

use std::collections::BTreeMap;

use searchloop_core::{Trajectory, reward};
use searchloop_train_sapo::{AdvantageConfig, TrainSequence, group_advantages};
use serde::{Deserialize, Serialize};

/// Why an episode cannot be trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Sampled greedily (temperature 0): its log-probs are all 0 and there is no distribution
    /// whose ratio could be taken.
    Greedy,
    /// Sampled with top-p or top-k truncation: the recorded log-probs are those of the
    /// truncated distribution, which the trainer does not reproduce.
    Truncated,
    /// Longer than `max_sequence_tokens`.
    TooLong,
    /// No token sampled by the model (nothing to train).
    NoModelTokens,
    /// A token id outside the trained model's vocabulary: the episode came from another model.
    ForeignVocabulary,
    /// The record fails [`Trajectory::validate`].
    Invalid,
}

/// Limits of [`to_train_sequence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceLimits {
    /// The trained model's vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence accepted.
    pub max_tokens: usize,
}

/// The trainer's view of one episode: its tokens, loss mask (model tokens only), behaviour
/// log-probs and the temperature they were sampled at, its training reward and group.
pub fn to_train_sequence(
    t: &Trajectory,
    reward: f64,
    group_id: &str,
    limits: SequenceLimits,
) -> Result<TrainSequence, SkipReason> {
    if t.validate().is_err() || !reward.is_finite() {
        return Err(SkipReason::Invalid);
    }
    let s = &t.sampling;
    if s.temperature <= 0.0 {
        return Err(SkipReason::Greedy);
    }
    if s.top_p < 1.0 || s.top_k > 0 {
        return Err(SkipReason::Truncated);
    }
    if t.tokens.len() > limits.max_tokens {
        return Err(SkipReason::TooLong);
    }
    if t.tokens.iter().any(|&id| id as usize >= limits.vocab_size) {
        return Err(SkipReason::ForeignVocabulary);
    }
    let loss_mask = t.loss_mask();
    // The first token is never predicted, so a model token there carries no loss.
    if !loss_mask.iter().skip(1).any(|&m| m) {
        return Err(SkipReason::NoModelTokens);
    }
    Ok(TrainSequence {
        tokens: t.tokens.clone(),
        loss_mask,
        behaviour_logprobs: t.logprobs.clone(),
        reward,
        group_id: group_id.to_string(),
        baseline: None,
        adapter_version: t.adapter_version,
        temperature: f64::from(s.temperature),
        demonstration: false,
    })
}

/// Whether a trajectory's ledger holds host feedback, not only the rewards the runtime
/// computes itself at episode end.
pub fn has_host_feedback(t: &Trajectory) -> bool {
    t.rewards.iter().any(|r| {
        ![
            reward::source::EXACT_MATCH,
            reward::source::F1,
            reward::source::FORMAT,
        ]
        .contains(&r.source.as_str())
    })
}

/// A batch being assembled, with its provenance and what was left out.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    sequences: Vec<TrainSequence>,
    tool_calls: Vec<usize>,
    replay: usize,
    feedback: usize,
    demonstrations: usize,
    skipped: BTreeMap<SkipReason, usize>,
}

/// Where an episode of the batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Sampled by this round.
    Replay,
    /// Logged with host feedback.
    Feedback,
    /// A teacher's demonstration of a question's worked solution, added to its replay group
    /// ([`TrainSequence::demonstration`]).
    Demonstration,
}

impl BatchBuilder {
    /// Adds `t` with training reward `reward` to group `group_id`, or with a fixed `baseline`
    /// instead of a group (see [`TrainSequence::baseline`]); or counts why it cannot be.
    pub fn push(
        &mut self,
        t: &Trajectory,
        reward: f64,
        group_id: &str,
        baseline: Option<f64>,
        origin: Origin,
        limits: SequenceLimits,
    ) {
        match to_train_sequence(t, reward, group_id, limits) {
            Ok(s) => {
                self.sequences.push(TrainSequence {
                    baseline,
                    demonstration: origin == Origin::Demonstration,
                    ..s
                });
                self.tool_calls.push(t.tool_calls.len());
                match origin {
                    Origin::Replay => self.replay += 1,
                    Origin::Feedback => self.feedback += 1,
                    Origin::Demonstration => self.demonstrations += 1,
                }
            }
            Err(reason) => *self.skipped.entry(reason).or_default() += 1,
        }
    }

    /// The sequences so far.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    /// Whether nothing usable was added.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// The sequences and their statistics.
    pub fn finish(self) -> (Vec<TrainSequence>, BatchStats) {
        let stats = BatchStats::of(&self);
        (self.sequences, stats)
    }
}

/// What went into a round's batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Sequences in the batch.
    pub sequences: usize,
    /// Of which sampled by this round.
    pub replay_sequences: usize,
    /// Of which logged with host feedback.
    pub feedback_sequences: usize,
    /// Of which a teacher's demonstrations (added to replay groups that found no answer as
    /// good, or a warm start's).
    #[serde(default)]
    pub demonstration_sequences: usize,
    /// Distinct groups; an episode trained against a baseline counts as a group of its own.
    pub groups: usize,
    /// Episodes trained against a running per-kind baseline instead of a group.
    #[serde(default)]
    pub baselined_sequences: usize,
    /// Groups whose rewards are all equal (no GRPO signal).
    pub zero_std_groups: usize,
    /// `zero_std_groups / groups`.
    pub zero_std_frac: f64,
    /// Mean training reward.
    pub reward_mean: f64,
    /// Population standard deviation of the training reward.
    pub reward_std: f64,
    /// Mean number of model (trained) tokens per episode.
    pub response_len_mean: f64,
    /// Mean number of tokens per episode.
    pub sequence_len_mean: f64,
    /// Mean number of tool calls per episode.
    pub tool_calls_mean: f64,
    /// Mean sampling temperature.
    pub temperature_mean: f64,
    /// Episodes left out, by reason.
    pub skipped: BTreeMap<SkipReason, usize>,
}

impl BatchStats {
    /// Whether the batch holds demonstrations only (a warm start's): no token of it was sampled.
    pub fn demonstrations_only(&self) -> bool {
        self.sequences > 0 && self.demonstration_sequences == self.sequences
    }

    fn of(builder: &BatchBuilder) -> BatchStats {
        let sequences = &builder.sequences;
        let n = sequences.len().max(1) as f64;
        let mean = |f: &dyn Fn(&TrainSequence) -> f64| sequences.iter().map(f).sum::<f64>() / n;
        let reward_mean = mean(&|s| s.reward);
        let reward_std = mean(&|s| (s.reward - reward_mean).powi(2)).sqrt();
        // The trainer's own grouping, so the counts are the ones training sees. `push` admits
        // finite rewards only, so the computation cannot fail; an error would read as no groups.
        let rewards: Vec<f64> = sequences.iter().map(|s| s.reward).collect();
        let group_ids: Vec<&str> = sequences.iter().map(|s| s.group_id.as_str()).collect();
        let baselines: Vec<Option<f64>> = sequences.iter().map(|s| s.baseline).collect();
        let (groups, zero_std_groups) = group_advantages(
            &rewards,
            &group_ids,
            &baselines,
            &AdvantageConfig::default(),
        )
        .map_or((0, 0), |a| (a.groups, a.zero_std_groups));
        BatchStats {
            sequences: sequences.len(),
            replay_sequences: builder.replay,
            feedback_sequences: builder.feedback,
            demonstration_sequences: builder.demonstrations,
            groups,
            baselined_sequences: baselines.iter().flatten().count(),
            zero_std_groups,
            zero_std_frac: zero_std_groups as f64 / groups.max(1) as f64,
            reward_mean,
            reward_std,
            response_len_mean: mean(&|s| s.loss_mask.iter().skip(1).filter(|&&m| m).count() as f64),
            sequence_len_mean: mean(&|s| s.tokens.len() as f64),
            tool_calls_mean: builder.tool_calls.iter().sum::<usize>() as f64 / n,
            temperature_mean: mean(&|s| s.temperature),
            skipped: builder.skipped.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use searchloop_core::{
        EpisodeEnd, RewardEntry, SamplingParams, SegmentKind, Timing, trajectory::SequenceBuilder,
    };

    use super::*;

    fn trajectory(temperature: f32) -> Trajectory {
        let mut b = SequenceBuilder::new(vec![1, 2, 3]);
        b.push(SegmentKind::Prefill, &[4]);
        b.push_model(&[5, 6], &[-0.5, -1.0]);
        b.push(SegmentKind::Observation, &[7, 8]);
        b.push_model(&[9], &[-0.1]);
        let (tokens, segments, logprobs) = b.finish();
        Trajectory {
            id: "t".into(),
            created_at: Utc::now(),
            question: "q".into(),
            prompt_text: "q".into(),
            response_text: String::new(),
            task: None,
            tokens,
            segments,
            logprobs,
            tool_calls: vec![],
            answer: None,
            end: EpisodeEnd::Answered,
            turns: 2,
            model_id: "m".into(),
            adapter_version: None,
            replica_id: None,
            sampling: SamplingParams {
                temperature,
                ..SamplingParams::default()
            },
            group_id: None,
            timing: Timing::default(),
            rewards: vec![],
        }
    }

    const LIMITS: SequenceLimits = SequenceLimits {
        vocab_size: 16,
        max_tokens: 64,
    };

    #[test]
    fn a_trajectory_becomes_a_masked_tempered_sequence() {
        let t = trajectory(0.3);
        let s = to_train_sequence(&t, 0.75, "g", LIMITS).unwrap();
        assert_eq!(s.tokens, (1..=9).collect::<Vec<u32>>());
        assert_eq!(
            s.loss_mask,
            [false, false, false, false, true, true, false, false, true]
        );
        assert_eq!(s.behaviour_logprobs[4..6], [-0.5, -1.0]);
        assert_eq!(s.behaviour_logprobs[8], -0.1);
        assert_eq!(s.temperature, f64::from(0.3f32));
        assert_eq!((s.reward, s.group_id.as_str()), (0.75, "g"));
    }

    #[test]
    fn unusable_trajectories_are_counted_by_reason() {
        let mut truncated = trajectory(1.0);
        truncated.sampling.top_p = 0.9;
        let mut top_k = trajectory(1.0);
        top_k.sampling.top_k = 5;
        let mut broken = trajectory(1.0);
        broken.logprobs[4] = 0.5;
        let mut no_model = trajectory(1.0);
        no_model.segments = vec![searchloop_core::Segment {
            kind: SegmentKind::Prompt,
            start: 0,
            end: 9,
        }];
        no_model.logprobs = vec![0.0; 9];
        let cases = [
            (trajectory(0.0), LIMITS, SkipReason::Greedy),
            (truncated, LIMITS, SkipReason::Truncated),
            (top_k, LIMITS, SkipReason::Truncated),
            (broken, LIMITS, SkipReason::Invalid),
            (no_model, LIMITS, SkipReason::NoModelTokens),
            (
                trajectory(1.0),
                SequenceLimits {
                    max_tokens: 8,
                    ..LIMITS
                },
                SkipReason::TooLong,
            ),
            (
                trajectory(1.0),
                SequenceLimits {
                    vocab_size: 9,
                    ..LIMITS
                },
                SkipReason::ForeignVocabulary,
            ),
        ];
        let mut batch = BatchBuilder::default();
        for (t, limits, reason) in &cases {
            assert_eq!(to_train_sequence(t, 1.0, "g", *limits), Err(*reason));
            batch.push(t, 1.0, "g", None, Origin::Replay, *limits);
        }
        assert_eq!(
            to_train_sequence(&trajectory(1.0), f64::NAN, "g", LIMITS),
            Err(SkipReason::Invalid)
        );
        assert!(batch.is_empty());
        let (seqs, stats) = batch.finish();
        assert!(seqs.is_empty());
        assert_eq!(stats.skipped.values().sum::<usize>(), cases.len());
        assert_eq!(stats.skipped[&SkipReason::Truncated], 2);
    }

    #[test]
    fn batch_statistics_follow_the_trainer_criteria() {
        let mut batch = BatchBuilder::default();
        let t = trajectory(1.0);
        for (reward, group, baseline, origin) in [
            (1.0, "a", None, Origin::Replay),
            (0.0, "a", None, Origin::Replay),
            (0.5, "b", None, Origin::Feedback),
            (0.5, "b", None, Origin::Feedback),
            (1.0, "c", None, Origin::Feedback),
            (1.0, "k", Some(0.25), Origin::Feedback),
            (0.25, "k", Some(0.25), Origin::Feedback),
        ] {
            batch.push(&t, reward, group, baseline, origin, LIMITS);
        }
        let (seqs, stats) = batch.finish();
        assert_eq!(seqs.len(), 7);
        assert_eq!(seqs[5].baseline, Some(0.25));
        assert_eq!((stats.replay_sequences, stats.feedback_sequences), (2, 5));
        // The baselined episodes are groups of their own; the one at its baseline has no signal.
        assert_eq!((stats.groups, stats.zero_std_groups), (5, 3));
        assert_eq!(stats.baselined_sequences, 2);
        assert!((stats.reward_mean - 4.25 / 7.0).abs() < 1e-12);
        assert_eq!(stats.response_len_mean, 3.0);
        assert_eq!(stats.sequence_len_mean, 9.0);
    }

    #[test]
    fn host_feedback_is_told_apart_from_episode_rewards() {
        let mut t = trajectory(1.0);
        t.rewards = vec![
            RewardEntry::now(reward::source::EXACT_MATCH, 1.0, 1.0),
            RewardEntry::now(reward::source::FORMAT, 1.0, 0.1),
        ];
        assert!(!has_host_feedback(&t));
        t.rewards.push(RewardEntry::now("purchase", 1.0, 1.0));
        assert!(has_host_feedback(&t));
    }
}
