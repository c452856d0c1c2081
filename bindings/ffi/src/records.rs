//! The plain records the bindings return: an answer, a stored trajectory, its tool calls and
//! rewards, and the store's counts. They are copies of the core and store types, cut to what a
//! host needs (no token ids or log-probs) and shaped for every target language.

use std::time::SystemTime;

use searchloop_core::{RewardEntry, RewardPolicy, Trajectory};
use searchloop_store_sql::BackendKind;

/// The answer to one question.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Answer {
    /// The model's answer; absent when the episode ended without one (see `end`).
    pub text: Option<String>,
    /// How the episode ended.
    pub end: EpisodeEnd,
    /// The stored trajectory's id, for `feedback` and `trajectory`.
    pub trajectory_id: String,
    /// The tools the model called, in order.
    pub tool_calls: Vec<ToolCallRecord>,
    /// Wall time of the whole `ask`, from the question to the stored trajectory.
    pub latency_ms: f64,
}

/// How an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum EpisodeEnd {
    /// The model answered.
    Answered,
    /// The final answer-only turn produced no answer.
    NoAnswer,
    /// The token budget or the model's context ran out.
    TokenLimit,
}

impl From<searchloop_core::EpisodeEnd> for EpisodeEnd {
    fn from(end: searchloop_core::EpisodeEnd) -> Self {
        match end {
            searchloop_core::EpisodeEnd::Answered => Self::Answered,
            searchloop_core::EpisodeEnd::NoAnswer => Self::NoAnswer,
            searchloop_core::EpisodeEnd::TokenLimit => Self::TokenLimit,
        }
    }
}

/// One tool call of an episode.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ToolCallRecord {
    /// The tool's name.
    pub tool: String,
    /// The arguments as JSON text (`{"query": "…"}` for a search; a JSON string when the
    /// model wrote something unparsable).
    pub arguments_json: String,
    /// What the model read back (an `error: …` text when the call failed).
    pub observation: String,
    /// Whether the call succeeded.
    pub ok: bool,
    /// Wall time of the call.
    pub latency_ms: f64,
}

impl From<&searchloop_core::ToolCallRecord> for ToolCallRecord {
    fn from(call: &searchloop_core::ToolCallRecord) -> Self {
        Self {
            tool: call.tool.clone(),
            arguments_json: call.arguments.to_string(),
            observation: call.observation.clone(),
            ok: call.ok,
            latency_ms: call.latency_ms,
        }
    }
}

/// One entry of a trajectory's reward ledger: an episode reward computed by the runtime
/// (`format`, `exact_match`, `f1`) or host feedback.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct RewardRecord {
    /// The source: a runtime reward or the host's feedback kind.
    pub source: String,
    /// The value.
    pub value: f64,
    /// Its weight in the training reward.
    pub weight: f64,
    /// When it was recorded.
    pub at: SystemTime,
    /// The idempotency key it was delivered with, if any.
    pub idempotency_key: Option<String>,
}

impl From<&RewardEntry> for RewardRecord {
    fn from(entry: &RewardEntry) -> Self {
        Self {
            source: entry.source.clone(),
            value: entry.value,
            weight: entry.weight,
            at: entry.at.into(),
            idempotency_key: entry.idempotency_key.clone(),
        }
    }
}

/// A stored episode, as a host reads it.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct TrajectoryRecord {
    /// The id.
    pub id: String,
    /// When the episode began.
    pub created_at: SystemTime,
    /// The question.
    pub question: String,
    /// The answer, if the model gave one.
    pub answer: Option<String>,
    /// How the episode ended.
    pub end: EpisodeEnd,
    /// Turns the model took.
    pub turns: u32,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCallRecord>,
    /// The reward ledger, in the order recorded.
    pub rewards: Vec<RewardRecord>,
    /// The training reward the ledger adds up to under the store's reward weights; absent
    /// while the ledger is empty.
    pub reward: Option<f64>,
    /// Everything after the prompt: the model's turns, the runtime's prefills, the
    /// observations.
    pub response_text: String,
    /// The base model.
    pub model_id: String,
    /// The adapter version that served it (absent for the base model).
    pub adapter_version: Option<u64>,
    /// Tokens of the whole sequence, prompt included.
    pub token_count: u64,
    /// Milliseconds inside the model.
    pub model_ms: f64,
    /// Milliseconds inside tools.
    pub tool_ms: f64,
    /// Milliseconds end to end.
    pub total_ms: f64,
}

impl TrajectoryRecord {
    /// The record of `t`, with its training reward under `policy`.
    pub(crate) fn new(t: &Trajectory, policy: &RewardPolicy) -> Self {
        Self {
            id: t.id.clone(),
            created_at: t.created_at.into(),
            question: t.question.clone(),
            answer: t.answer.clone(),
            end: t.end.into(),
            turns: t.turns,
            tool_calls: t.tool_calls.iter().map(ToolCallRecord::from).collect(),
            rewards: t.rewards.iter().map(RewardRecord::from).collect(),
            reward: policy.combine(&t.rewards),
            response_text: t.response_text.clone(),
            model_id: t.model_id.clone(),
            adapter_version: t.adapter_version,
            token_count: t.tokens.len() as u64,
            model_ms: t.timing.model_ms,
            tool_ms: t.timing.tool_ms,
            total_ms: t.timing.total_ms,
        }
    }
}

/// What [`crate::Agent::feedback`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum FeedbackOutcome {
    /// A new ledger entry was written.
    Recorded,
    /// The same feedback was already recorded under this idempotency key; nothing changed.
    Duplicate,
}

impl From<searchloop_store_sql::FeedbackOutcome> for FeedbackOutcome {
    fn from(outcome: searchloop_store_sql::FeedbackOutcome) -> Self {
        match outcome {
            searchloop_store_sql::FeedbackOutcome::Recorded => Self::Recorded,
            searchloop_store_sql::FeedbackOutcome::Duplicate => Self::Duplicate,
        }
    }
}

/// What the trajectory store holds.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct StoreStats {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Trajectories stored.
    pub trajectories: u64,
    /// Trajectories with at least one reward.
    pub rewarded_trajectories: u64,
    /// Training groups.
    pub groups: u64,
    /// Reward ledger entries.
    pub reward_entries: u64,
    /// Of which host feedback.
    pub feedback_entries: u64,
    /// Registered adapters.
    pub adapters: u64,
    /// The promoted adapter version, if any.
    pub promoted_adapter: Option<u64>,
    /// Bytes the store occupies.
    pub size_bytes: u64,
}

impl From<searchloop_store_sql::StoreStats> for StoreStats {
    fn from(s: searchloop_store_sql::StoreStats) -> Self {
        Self {
            backend: match s.backend {
                BackendKind::Sqlite => "sqlite",
                BackendKind::Postgres => "postgres",
            }
            .to_string(),
            trajectories: s.trajectories,
            rewarded_trajectories: s.rewarded_trajectories,
            groups: s.groups,
            reward_entries: s.reward_entries,
            feedback_entries: s.feedback_entries,
            adapters: s.adapters,
            promoted_adapter: s.promoted_adapter,
            size_bytes: s.size_bytes,
        }
    }
}

/// One registered adapter.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct AdapterInfo {
    /// Its version: 1, 2, 3, ... never reused.
    pub version: u64,
    /// The version it was trained from.
    pub parent_version: Option<u64>,
    /// `candidate`, `promoted`, `superseded`, `rejected` or `rolled_back`.
    pub status: String,
    /// Why it was rejected or rolled back.
    pub status_reason: Option<String>,
    /// Where its files are.
    pub path: String,
    /// Hash of the weights.
    pub content_hash: String,
    /// Its held-out evaluation as JSON text, once the gate has run.
    pub eval_results_json: Option<String>,
    /// When it was registered.
    pub created_at: SystemTime,
}

impl From<searchloop_store_sql::AdapterRecord> for AdapterInfo {
    fn from(a: searchloop_store_sql::AdapterRecord) -> Self {
        Self {
            version: a.version,
            parent_version: a.parent_version,
            status: a.status.to_string(),
            status_reason: a.status_reason,
            path: a.path,
            content_hash: a.content_hash,
            eval_results_json: a.eval_results.map(|v| v.to_string()),
            created_at: a.created_at.into(),
        }
    }
}

/// What a change of the served adapter did.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct SwapInfo {
    /// The version served before (absent: the base model).
    pub from_version: Option<u64>,
    /// The version served now (absent: the base model).
    pub to_version: Option<u64>,
    /// Time spent loading the new model.
    pub load_ms: u64,
}

impl From<searchloop_runtime::SwapReport> for SwapInfo {
    fn from(s: searchloop_runtime::SwapReport) -> Self {
        Self {
            from_version: s.from,
            to_version: s.to,
            load_ms: s.load_ms,
        }
    }
}

/// What one training round did.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct RoundSummary {
    /// The candidate adapter the round registered.
    pub candidate: u64,
    /// The adapter it was compared with (absent: the base model).
    pub incumbent: Option<u64>,
    /// Whether the eval gate promoted the candidate (it serves new episodes now).
    pub promoted: bool,
    /// Why the gate rejected it, when it did.
    pub rejection_reason: Option<String>,
    /// The candidate's held-out exact match (absent when the ISDD alarm rejected it
    /// unevaluated).
    pub candidate_em: Option<f64>,
    /// The incumbent's, on the same questions and seed.
    pub incumbent_em: Option<f64>,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Wall time of training.
    pub train_ms: u64,
    /// Wall time of the gate.
    pub gate_ms: u64,
    /// The whole report as JSON text (per-step metrics, both evaluations, the swap).
    pub report_json: String,
}

impl From<searchloop_runtime::RoundReport> for RoundSummary {
    fn from(r: searchloop_runtime::RoundReport) -> Self {
        let (promoted, rejection_reason) = match &r.verdict {
            searchloop_loop::GateVerdict::Promote => (true, None),
            searchloop_loop::GateVerdict::Reject { reason } => (false, Some(reason.clone())),
        };
        Self {
            candidate: r.candidate,
            incumbent: r.incumbent,
            promoted,
            rejection_reason,
            candidate_em: r.candidate_eval.as_ref().map(|e| e.em),
            incumbent_em: r.incumbent_eval.as_ref().map(|e| e.em),
            steps: r.train.steps.len() as u64,
            train_ms: r.train_ms,
            gate_ms: r.gate_ms,
            // A report of plain numbers and strings always serializes; an empty object keeps
            // the record usable if that ever changed.
            report_json: serde_json::to_string(&r).unwrap_or_else(|_| "{}".into()),
        }
    }
}
