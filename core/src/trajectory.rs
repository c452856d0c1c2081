//! Trajectories: one episode as the trainer needs it (a single token sequence split into
//! segments, with the behaviour log-probabilities of the model's own tokens) and as a person
//! reads it (tool calls, answer, rewards, timing).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    policy::SamplingParams,
    reward::RewardEntry,
};

/// What a stretch of the token sequence is. Only [`SegmentKind::Model`] tokens are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    /// The rendered chat prompt.
    Prompt,
    /// Action tags the runtime wrote for the model.
    Prefill,
    /// Tokens the model sampled.
    Model,
    /// A tool observation (`<information>…</information>`).
    Observation,
    /// The corrective message after an invalid action.
    Correction,
}

impl SegmentKind {
    /// Whether tokens of this kind carry loss.
    pub fn is_trained(self) -> bool {
        self == SegmentKind::Model
    }

    /// A stable small code, for compact storage.
    pub fn code(self) -> u8 {
        match self {
            SegmentKind::Prompt => 0,
            SegmentKind::Prefill => 1,
            SegmentKind::Model => 2,
            SegmentKind::Observation => 3,
            SegmentKind::Correction => 4,
        }
    }

    /// The kind with code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => SegmentKind::Prompt,
            1 => SegmentKind::Prefill,
            2 => SegmentKind::Model,
            3 => SegmentKind::Observation,
            4 => SegmentKind::Correction,
            _ => return None,
        })
    }
}

/// A half-open range `[start, end)` of token positions of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// What the tokens are.
    pub kind: SegmentKind,
    /// First position.
    pub start: u32,
    /// One past the last position.
    pub end: u32,
}

/// One tool call made during an episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// The tool's name.
    pub tool: String,
    /// The arguments as the model wrote them (a JSON value, or a string when unparsable).
    pub arguments: serde_json::Value,
    /// The observation shown to the model.
    pub observation: String,
    /// Whether the call succeeded.
    pub ok: bool,
    /// Wall time of the call.
    pub latency_ms: f64,
}

/// How an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpisodeEnd {
    /// The model answered.
    Answered,
    /// The final answer-only turn produced no answer.
    NoAnswer,
    /// The token budget or the context ran out.
    TokenLimit,
}

/// The split of a task item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data.
    Train,
    /// Held-out evaluation data.
    Heldout,
}

/// What is known about the question, when it comes from a task set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task item's id.
    pub task_id: String,
    /// Acceptable answers, when known.
    pub gold_answers: Vec<String>,
    /// Which split it belongs to.
    pub split: Split,
    /// A free label (single_hop, inventory, ...).
    pub kind: String,
    /// The tools a good episode calls to answer it (empty: not said); the agent's tool-choice
    /// reward reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
}

/// Where the time of an episode went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// When the episode began.
    pub started_at: Option<DateTime<Utc>>,
    /// Milliseconds inside the policy (prompt processing and decoding).
    pub model_ms: f64,
    /// Milliseconds inside tools.
    pub tool_ms: f64,
    /// Milliseconds end to end.
    pub total_ms: f64,
}

impl Timing {
    /// Milliseconds spent in the loop itself (tokenizing, parsing, bookkeeping).
    pub fn overhead_ms(&self) -> f64 {
        (self.total_ms - self.model_ms - self.tool_ms).max(0.0)
    }
}

/// One episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// Unique id (a UUIDv7, so ids sort by creation time).
    pub id: String,
    /// When the episode was created.
    pub created_at: DateTime<Utc>,
    /// The question asked.
    pub question: String,
    /// The rendered chat prompt (the text of the prompt segment).
    pub prompt_text: String,
    /// Everything after the prompt as text: prefills, model turns, observations, corrections.
    pub response_text: String,
    /// Task metadata, when the question comes from a task set.
    pub task: Option<TaskInfo>,
    /// The whole token sequence the model was conditioned on and produced.
    pub tokens: Vec<u32>,
    /// Contiguous segments covering `tokens` exactly, in order.
    pub segments: Vec<Segment>,
    /// Per token: the natural-log probability under the sampling distribution for model tokens,
    /// 0 elsewhere.
    pub logprobs: Vec<f32>,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCallRecord>,
    /// The final answer, if any.
    pub answer: Option<String>,
    /// How the episode ended.
    pub end: EpisodeEnd,
    /// Turns the model took.
    pub turns: u32,
    /// The base model.
    pub model_id: String,
    /// The adapter version that served the episode (`None` = base model).
    pub adapter_version: Option<u64>,
    /// The serving replica that ran the episode, when the host names one (a fleet of servers
    /// on one store tells its replicas apart by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// The sampling parameters of the model turns.
    pub sampling: SamplingParams,
    /// Episodes sampled together for one prompt share a group id.
    pub group_id: Option<String>,
    /// Where the time went.
    pub timing: Timing,
    /// The reward ledger (more entries can arrive later through a store).
    pub rewards: Vec<RewardEntry>,
}

impl Trajectory {
    /// Whether the episode called every tool in `tools` at least once.
    pub fn called_every_tool(&self, tools: &[String]) -> bool {
        tools
            .iter()
            .all(|tool| self.tool_calls.iter().any(|call| &call.tool == tool))
    }

    /// Per token: whether it is trained (a model token).
    pub fn loss_mask(&self) -> Vec<bool> {
        let mut mask = vec![false; self.tokens.len()];
        for s in &self.segments {
            if s.kind.is_trained() {
                for m in &mut mask[s.start as usize..s.end as usize] {
                    *m = true;
                }
            }
        }
        mask
    }

    /// The token ids of every segment of `kind`, in order.
    pub fn tokens_of(&self, kind: SegmentKind) -> Vec<u32> {
        self.segments
            .iter()
            .filter(|s| s.kind == kind)
            .flat_map(|s| {
                self.tokens[s.start as usize..s.end as usize]
                    .iter()
                    .copied()
            })
            .collect()
    }

    /// Length of the prompt segment (the tokens before the first response token).
    pub fn prompt_len(&self) -> usize {
        self.segments
            .first()
            .filter(|s| s.kind == SegmentKind::Prompt)
            .map_or(0, |s| s.end as usize)
    }

    /// Checks the structural invariants: segments cover the tokens contiguously, lengths
    /// agree, log-probs are finite and non-positive on model tokens and zero elsewhere.
    /// Trajectories read back from storage or the network go through this before use.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidTrajectory(format!("{}: {msg}", self.id)));
        if self.logprobs.len() != self.tokens.len() {
            return bad(format!(
                "{} log-probs for {} tokens",
                self.logprobs.len(),
                self.tokens.len()
            ));
        }
        let mut at = 0u32;
        for s in &self.segments {
            if s.start != at || s.end < s.start {
                return bad(format!("segment {s:?} does not start at {at}"));
            }
            at = s.end;
        }
        if at as usize != self.tokens.len() {
            return bad(format!(
                "segments cover {at} of {} tokens",
                self.tokens.len()
            ));
        }
        for (i, (lp, trained)) in self.logprobs.iter().zip(self.loss_mask()).enumerate() {
            let ok = if trained {
                lp.is_finite() && *lp <= 0.0
            } else {
                *lp == 0.0
            };
            if !ok {
                return bad(format!(
                    "log-prob {lp} at position {i} (trained: {trained})"
                ));
            }
        }
        for r in &self.rewards {
            r.validate()?;
        }
        Ok(())
    }
}

/// Builds a trajectory's token sequence one segment at a time, keeping segments, mask and
/// log-probs aligned by construction.
#[derive(Debug, Clone, Default)]
pub struct SequenceBuilder {
    tokens: Vec<u32>,
    segments: Vec<Segment>,
    logprobs: Vec<f32>,
}

impl SequenceBuilder {
    /// Starts with the prompt.
    pub fn new(prompt: Vec<u32>) -> Self {
        let mut b = Self::default();
        b.push(SegmentKind::Prompt, &prompt);
        b
    }

    /// Appends untrained tokens of `kind`.
    pub fn push(&mut self, kind: SegmentKind, tokens: &[u32]) {
        self.push_inner(kind, tokens, None);
    }

    /// Appends sampled model tokens with their log-probs (one per token; a shorter list is
    /// padded with 0, which [`Trajectory::validate`] then rejects, so a broken policy is caught).
    pub fn push_model(&mut self, tokens: &[u32], logprobs: &[f32]) {
        self.push_inner(SegmentKind::Model, tokens, Some(logprobs));
    }

    fn push_inner(&mut self, kind: SegmentKind, tokens: &[u32], logprobs: Option<&[f32]>) {
        if tokens.is_empty() {
            return;
        }
        let start = self.tokens.len() as u32;
        self.tokens.extend_from_slice(tokens);
        let end = self.tokens.len() as u32;
        match logprobs {
            Some(lp) => self
                .logprobs
                .extend((0..tokens.len()).map(|i| lp.get(i).copied().unwrap_or(f32::NAN))),
            None => self.logprobs.extend(std::iter::repeat_n(0.0, tokens.len())),
        }
        // Adjacent segments of the same kind merge, so the segment list stays minimal.
        match self.segments.last_mut() {
            Some(last) if last.kind == kind && last.end == start => last.end = end,
            _ => self.segments.push(Segment { kind, start, end }),
        }
    }

    /// The tokens so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Consumes the builder: tokens, segments, log-probs.
    pub fn finish(self) -> (Vec<u32>, Vec<Segment>, Vec<f32>) {
        (self.tokens, self.segments, self.logprobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_trajectory() -> Trajectory {
        let mut b = SequenceBuilder::new(vec![1, 2, 3]);
        b.push(SegmentKind::Prefill, &[4]);
        b.push_model(&[5, 6], &[-0.5, -1.0]);
        b.push(SegmentKind::Observation, &[7, 8, 9]);
        b.push_model(&[10], &[-0.1]);
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
            sampling: SamplingParams::default(),
            group_id: None,
            timing: Timing::default(),
            rewards: vec![],
        }
    }

    #[test]
    fn builder_keeps_mask_and_logprobs_aligned() {
        let t = sample_trajectory();
        t.validate().unwrap();
        assert_eq!(
            t.loss_mask(),
            vec![
                false, false, false, false, true, true, false, false, false, true
            ]
        );
        assert_eq!(t.tokens_of(SegmentKind::Model), vec![5, 6, 10]);
        assert_eq!(t.prompt_len(), 3);
        assert_eq!(t.logprobs[4], -0.5);
        assert_eq!(t.logprobs[7], 0.0);
    }

    #[test]
    fn validation_catches_broken_invariants() {
        let mut t = sample_trajectory();
        t.logprobs.pop();
        assert!(t.validate().is_err());

        let mut t = sample_trajectory();
        t.segments[1].start += 1;
        assert!(t.validate().is_err());

        let mut t = sample_trajectory();
        t.logprobs[4] = 0.3;
        assert!(t.validate().is_err());

        let mut t = sample_trajectory();
        t.logprobs[0] = -1.0;
        assert!(t.validate().is_err());

        let mut b = SequenceBuilder::new(vec![1]);
        b.push_model(&[2, 3], &[-1.0]);
        let (tokens, segments, logprobs) = b.finish();
        let t = Trajectory {
            tokens,
            segments,
            logprobs,
            ..sample_trajectory()
        };
        assert!(t.validate().is_err(), "missing log-prob must be caught");
    }

    #[test]
    fn segment_codes_round_trip() {
        for k in [
            SegmentKind::Prompt,
            SegmentKind::Prefill,
            SegmentKind::Model,
            SegmentKind::Observation,
            SegmentKind::Correction,
        ] {
            assert_eq!(SegmentKind::from_code(k.code()), Some(k));
        }
        assert_eq!(SegmentKind::from_code(9), None);
    }
}
