//! The agent loop: one episode is a sequence of model turns and tool observations over a single
//! growing token sequence, ending in an answer, and recorded as a [`Trajectory`].

use std::{sync::Arc, time::Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    policy::{ChatMessage, FinishReason, Policy, PolicySlot, Role, Sample, SamplingParams},
    protocol::{
        Action, CLOSING_TAGS, ProtocolConfig, information_block, opened_action, parse_action,
    },
    reward::{RewardEntry, exact_match, f1_score, source},
    sink::TrajectorySink,
    tool::{ToolError, ToolOutcome, ToolRegistry},
    trajectory::{
        EpisodeEnd, SegmentKind, SequenceBuilder, TaskInfo, Timing, ToolCallRecord, Trajectory,
    },
};

/// Weights of the rewards the runtime computes when an episode ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EpisodeRewardWeights {
    /// Weight of exact match (recorded only when gold answers are known).
    pub exact_match: f64,
    /// Weight of token F1 (recorded only when gold answers are known).
    pub f1: f64,
    /// Weight of the format reward (1 for a well-formed answer).
    pub format: f64,
    /// Weight of the tool-choice reward (1 when the episode called every tool its task
    /// names); recorded only for tasks that name their tools and a positive weight. Kept small
    /// beside exact match, so calling the right tool cannot stand in for the right answer.
    pub tool_choice: f64,
}

impl Default for EpisodeRewardWeights {
    fn default() -> Self {
        Self {
            exact_match: 1.0,
            f1: 0.5,
            format: 0.1,
            tool_choice: 0.0,
        }
    }
}

/// How the agent runs episodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Prompting, scaffolding and limits.
    pub protocol: ProtocolConfig,
    /// Sampling of model turns (stop strings and token limits are set per turn by the loop).
    pub sampling: SamplingParams,
    /// Rewards computed at episode end.
    pub rewards: EpisodeRewardWeights,
}

/// The serving temperature: a 135M-parameter model sampled at 1.0 mostly rambles, while 0.3
/// keeps its answers on the information it was shown (EM 0.33 against 0.0 on twelve held-out
/// retail questions). Training rollouts set their own temperature, and the trainer scores
/// tokens at the temperature they were sampled with.
pub const SERVING_TEMPERATURE: f32 = 0.3;

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            protocol: ProtocolConfig::default(),
            sampling: SamplingParams {
                temperature: SERVING_TEMPERATURE,
                ..SamplingParams::default()
            },
            rewards: EpisodeRewardWeights::default(),
        }
    }
}

impl AgentConfig {
    /// Checks every part, so a bad config fails at start-up.
    pub fn validate(&self) -> Result<()> {
        self.protocol.validate()?;
        self.sampling.validate()
    }
}

/// One episode to run.
#[derive(Debug, Clone, Default)]
pub struct EpisodeRequest {
    /// The customer's question.
    pub question: String,
    /// Task metadata (gold answers, split), when known.
    pub task: Option<TaskInfo>,
    /// Shared by the episodes of one GRPO group.
    pub group_id: Option<String>,
    /// Seed of the episode's sampling; turns use `seed + turn`.
    pub seed: Option<u64>,
}

impl EpisodeRequest {
    /// An episode for `question` with nothing else known.
    pub fn new(question: impl Into<String>) -> Self {
        Self {
            question: question.into(),
            ..Default::default()
        }
    }
}

/// A tool call a model turn asked for.
enum ToolCall {
    /// `<search>query</search>`: the default tool.
    Search(String),
    /// `<tool name="...">{json}</tool>`, arguments not yet parsed.
    Named { name: String, arguments: String },
}

/// Runs episodes: model turns, tool calls, rewards, recording.
pub struct Agent {
    policy: Arc<PolicySlot>,
    tools: Arc<ToolRegistry>,
    config: AgentConfig,
    sink: Option<Arc<dyn TrajectorySink>>,
    replica_id: Option<String>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("policy", &self.policy)
            .field("tools", &self.tools)
            .field("config", &self.config)
            .finish()
    }
}

impl Agent {
    /// An agent over `policy` and `tools`. Fails on an invalid config or an empty registry.
    pub fn new(
        policy: Arc<PolicySlot>,
        tools: Arc<ToolRegistry>,
        config: AgentConfig,
    ) -> Result<Self> {
        config.validate()?;
        if tools.is_empty() {
            return Err(Error::Config("the agent needs at least one tool".into()));
        }
        Ok(Self {
            policy,
            tools,
            config,
            sink: None,
            replica_id: None,
        })
    }

    /// Records every finished episode into `sink`.
    pub fn with_sink(mut self, sink: Arc<dyn TrajectorySink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Stamps every trajectory with `replica_id`, the serving replica's name in a fleet.
    pub fn with_replica_id(mut self, replica_id: impl Into<String>) -> Self {
        self.replica_id = Some(replica_id.into());
        self
    }

    /// The replica name trajectories are stamped with, if any.
    pub fn replica_id(&self) -> Option<&str> {
        self.replica_id.as_deref()
    }

    /// The policy slot (for swaps).
    pub fn policy(&self) -> &Arc<PolicySlot> {
        &self.policy
    }

    /// The tools.
    pub fn tools(&self) -> &Arc<ToolRegistry> {
        &self.tools
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// An agent sharing this one's policy slot, tools, sink and replica id but running episodes with
    /// `config`: how a front end applies one request's sampling overrides without touching the
    /// agent other requests use. Fails on an invalid config.
    pub fn reconfigured(&self, config: AgentConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            policy: Arc::clone(&self.policy),
            tools: Arc::clone(&self.tools),
            config,
            sink: self.sink.clone(),
            replica_id: self.replica_id.clone(),
        })
    }

    /// Runs one episode for `question` and records it.
    pub async fn ask(&self, question: &str) -> Result<Trajectory> {
        self.run(EpisodeRequest::new(question)).await
    }

    /// Runs `n` episodes of one question concurrently, as one GRPO group sharing a group id.
    /// Episode `i` uses seed `seed + 1000 * i`.
    pub async fn run_group(&self, request: EpisodeRequest, n: usize) -> Result<Vec<Trajectory>> {
        let group_id = request
            .group_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let episodes = (0..n).map(|i| {
            let mut r = request.clone();
            r.group_id = Some(group_id.clone());
            r.seed = request.seed.map(|s| s.wrapping_add(1000 * i as u64));
            self.run(r)
        });
        futures::future::try_join_all(episodes).await
    }

    /// Runs one episode and records it in the sink (if any) before returning it.
    pub async fn run(&self, request: EpisodeRequest) -> Result<Trajectory> {
        // The policy is fixed for the whole episode, so a swap never mixes two models in one
        // trajectory, and the recorded adapter version is the one that served it.
        let policy = self.policy.current();
        let trajectory = self.run_with(policy.as_ref(), request).await?;
        if let Some(sink) = &self.sink {
            sink.record(&trajectory).await?;
        }
        Ok(trajectory)
    }

    async fn run_with(&self, policy: &dyn Policy, request: EpisodeRequest) -> Result<Trajectory> {
        let limit = self.config.protocol.max_question_chars;
        let chars = request.question.chars().count();
        if chars > limit {
            return Err(Error::QuestionTooLong { chars, limit });
        }
        let started = Instant::now();
        let started_at = Utc::now();
        let protocol = &self.config.protocol;
        let messages = [
            ChatMessage::new(
                Role::System,
                protocol.render_system_prompt(&self.tools.describe()),
            ),
            ChatMessage::new(Role::User, request.question.clone()),
        ];
        let prompt_text = policy.render_chat(&messages, true)?;
        let mut seq = SequenceBuilder::new(policy.tokenize(&prompt_text)?);
        let mut response_text = String::new();
        let mut tool_calls: Vec<ToolCallRecord> = Vec::new();
        let mut timing = Timing {
            started_at: Some(started_at),
            ..Timing::default()
        };
        let mut generated = 0usize;
        let mut turns = 0u32;
        let mut answer = None;
        let end = loop {
            let final_turn = turns as usize >= protocol.max_turns;
            let prefill = if final_turn {
                Some(protocol.final_turn_prefill.clone()).filter(|p| !p.is_empty())
            } else if tool_calls.is_empty() {
                protocol.first_turn_prefill.clone()
            } else {
                protocol.after_observation_prefill.clone()
            };
            let prefill = prefill.unwrap_or_default();
            if !prefill.is_empty() {
                seq.push(SegmentKind::Prefill, &policy.tokenize(&prefill)?);
                response_text.push_str(&prefill);
            }
            let budget = protocol
                .max_turn_tokens
                .min(protocol.max_episode_tokens.saturating_sub(generated))
                .min(policy.context_length().saturating_sub(seq.tokens().len()));
            if budget == 0 {
                break EpisodeEnd::TokenLimit;
            }
            let opened = opened_action(&prefill);
            let mut stop: Vec<String> = if final_turn {
                vec!["</answer>".to_string()]
            } else {
                CLOSING_TAGS.iter().map(|s| s.to_string()).collect()
            };
            if opened.is_some() {
                stop.extend(protocol.implicit_close_stops.iter().cloned());
            }
            let params = SamplingParams {
                max_tokens: budget,
                stop,
                seed: request.seed.map(|s| s.wrapping_add(u64::from(turns))),
                ..self.config.sampling.clone()
            };
            let model_started = Instant::now();
            let sample = policy
                .sample(seq.tokens(), &params, 1)
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| Error::Policy("the policy returned no sample".into()))?;
            timing.model_ms += model_started.elapsed().as_secs_f64() * 1e3;
            if sample.tokens.len() != sample.logprobs.len() {
                return Err(Error::Policy(format!(
                    "the policy returned {} log-probs for {} tokens",
                    sample.logprobs.len(),
                    sample.tokens.len()
                )));
            }
            seq.push_model(&sample.tokens, &sample.logprobs);
            response_text.push_str(&sample.text);
            generated += sample.tokens.len();
            turns += 1;

            let mut turn_text = format!("{prefill}{}", sample.text);
            if let Some(tag) = opened {
                let body = self.implicit_body(policy, &sample)?;
                if let Some(body) = body.filter(|_| !turn_text.contains(&format!("</{tag}>"))) {
                    turn_text = format!("{prefill}{body}</{tag}>");
                }
            }
            let action = parse_action(&turn_text);
            let call = match action {
                Action::Answer(text) => {
                    answer = Some(text);
                    break EpisodeEnd::Answered;
                }
                Action::Search { query } => Some(ToolCall::Search(query)),
                Action::Tool { name, arguments } => Some(ToolCall::Named { name, arguments }),
                Action::Invalid(reason) => {
                    tracing::debug!(%reason, "invalid action");
                    None
                }
            };
            if final_turn {
                break EpisodeEnd::NoAnswer;
            }
            let observation = match call {
                None => {
                    seq.push(
                        SegmentKind::Correction,
                        &policy.tokenize(&protocol.invalid_action_message)?,
                    );
                    response_text.push_str(&protocol.invalid_action_message);
                    if sample.finish == FinishReason::Length
                        && generated >= protocol.max_episode_tokens
                    {
                        break EpisodeEnd::TokenLimit;
                    }
                    continue;
                }
                Some(call) => {
                    let (tool, arguments, outcome) = self.call_tool(call).await;
                    timing.tool_ms += outcome.latency_ms;
                    let block = information_block(&outcome.observation);
                    tool_calls.push(ToolCallRecord {
                        tool,
                        arguments,
                        observation: outcome.observation,
                        ok: outcome.error.is_none(),
                        latency_ms: outcome.latency_ms,
                    });
                    block
                }
            };
            seq.push(SegmentKind::Observation, &policy.tokenize(&observation)?);
            response_text.push_str(&observation);
        };
        timing.total_ms = started.elapsed().as_secs_f64() * 1e3;

        let (tokens, segments, logprobs) = seq.finish();
        let mut trajectory = Trajectory {
            id: uuid::Uuid::now_v7().to_string(),
            created_at: started_at,
            question: request.question,
            prompt_text,
            response_text,
            task: request.task,
            tokens,
            segments,
            logprobs,
            tool_calls,
            answer,
            end,
            turns,
            model_id: policy.model_id().to_string(),
            adapter_version: policy.adapter_version(),
            replica_id: self.replica_id.clone(),
            sampling: self.config.sampling.clone(),
            group_id: request.group_id,
            timing,
            rewards: Vec::new(),
        };
        trajectory.rewards = self.episode_rewards(&trajectory);
        trajectory.validate()?;
        Ok(trajectory)
    }

    /// The text of a turn whose prefill opened an action tag, cut where the turn ended
    /// implicitly (at an implicit-close stop string or the end-of-sequence token), or `None`
    /// when it ended some other way.
    fn implicit_body(&self, policy: &dyn Policy, sample: &Sample) -> Result<Option<String>> {
        match &sample.finish {
            FinishReason::Stop(stop)
                if self.config.protocol.implicit_close_stops.contains(stop) =>
            {
                Ok(sample
                    .text
                    .find(stop.as_str())
                    .map(|at| sample.text[..at].to_string()))
            }
            FinishReason::Eos => {
                let eos = match sample.tokens.last() {
                    Some(&last) => policy.detokenize(&[last])?,
                    None => String::new(),
                };
                Ok(Some(
                    sample
                        .text
                        .strip_suffix(eos.as_str())
                        .unwrap_or(&sample.text)
                        .to_string(),
                ))
            }
            _ => Ok(None),
        }
    }

    /// Calls a tool. A `<search>` query becomes `{"query": q}` for the default tool; a `<tool>`
    /// call's text must be a JSON object. Returns the tool's name, the recorded arguments and
    /// the outcome.
    async fn call_tool(&self, call: ToolCall) -> (String, Value, ToolOutcome) {
        let (tool, arguments) = match call {
            ToolCall::Search(query) => (
                self.tools.default_tool().unwrap_or_default().to_string(),
                Ok(serde_json::json!({ "query": query })),
            ),
            ToolCall::Named { name, arguments } => {
                let parsed = match serde_json::from_str::<Value>(&arguments) {
                    Ok(v @ Value::Object(_)) => Ok(v),
                    Ok(_) => Err("arguments must be a JSON object".to_string()),
                    Err(e) => Err(format!("arguments are not JSON: {e}")),
                };
                (name, parsed.map_err(|m| (Value::String(arguments), m)))
            }
        };
        match arguments {
            Ok(args) => {
                let outcome = self.tools.invoke(&tool, args.clone()).await;
                (tool, args, outcome)
            }
            Err((recorded, message)) => {
                let error = ToolError::InvalidArguments(message);
                let outcome = ToolOutcome {
                    observation: format!("error: {error}"),
                    error: Some(error),
                    latency_ms: 0.0,
                };
                (tool, recorded, outcome)
            }
        }
    }

    fn episode_rewards(&self, t: &Trajectory) -> Vec<RewardEntry> {
        let w = &self.config.rewards;
        let answered = t.end == EpisodeEnd::Answered;
        let mut rewards = vec![RewardEntry::now(
            source::FORMAT,
            if answered { 1.0 } else { 0.0 },
            w.format,
        )];
        if let Some(task) = t.task.as_ref().filter(|task| !task.gold_answers.is_empty()) {
            let answer = t.answer.as_deref().unwrap_or("");
            rewards.push(RewardEntry::now(
                source::EXACT_MATCH,
                exact_match(answer, &task.gold_answers),
                w.exact_match,
            ));
            rewards.push(RewardEntry::now(
                source::F1,
                f1_score(answer, &task.gold_answers),
                w.f1,
            ));
        }
        if let Some(task) = t.task.as_ref().filter(|task| !task.tools.is_empty())
            && w.tool_choice > 0.0
        {
            rewards.push(RewardEntry::now(
                source::TOOL_CHOICE,
                if t.called_every_tool(&task.tools) {
                    1.0
                } else {
                    0.0
                },
                w.tool_choice,
            ));
        }
        rewards
    }
}

#[cfg(test)]
mod tests;
