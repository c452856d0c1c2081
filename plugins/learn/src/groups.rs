//! Gathering a round's GRPO groups: replay groups sampled now through the serving agent, and
//! logged episodes with host feedback read from the store.

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::{AtomicBool, Ordering},
};

use futures::StreamExt;
use searchloop_core::{
    Agent, AgentConfig, EpisodeRequest, RewardPolicy, SamplingParams, Split, Trajectory,
};
use searchloop_store_sql::{Cursor, GroupQuery, RunningMean, Store};
use sha2::{Digest, Sha256};

use crate::{
    batch::{BatchBuilder, Origin, SequenceLimits, has_host_feedback},
    config::RoundConfig,
    demonstration::{Demonstrated, demonstrate},
    error::{LearnError, Result},
    questions::Question,
};

/// What sampling the replay groups produced.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ReplayStats {
    /// Episodes sampled.
    pub episodes: usize,
    /// Tokens the model generated in them.
    pub generated_tokens: usize,
    /// Wall time of the sampling.
    pub seconds: f64,
    /// Prompts a group was sampled for.
    pub prompts: usize,
    /// Groups whose rewards differ (the ones with an advantage).
    pub informative_groups: usize,
    /// Teacher demonstrations added to groups that found no answer as good.
    pub demonstrations: usize,
    /// Worked solutions the protocol could not play.
    pub unfit_solutions: usize,
    /// Worked solutions played through whose observations held no gold answer.
    pub ungrounded_solutions: usize,
}

/// The agent replay episodes run through: the serving agent's tools, protocol, rewards and
/// sink, sampling at the round's temperature over the whole distribution (no top-p or top-k,
/// whose truncated log-probs the trainer could not reproduce).
pub(crate) fn replay_agent(serving: &Agent, config: &RoundConfig) -> Result<Agent> {
    let served = &serving.config().sampling;
    let temperature = config.rollout_temperature.unwrap_or(served.temperature);
    if temperature <= 0.0 {
        return Err(LearnError::Config(
            "the serving agent samples greedily (temperature 0), which gives no distribution to \
             train: set rollout_temperature"
                .into(),
        ));
    }
    let agent_config = AgentConfig {
        sampling: SamplingParams {
            temperature,
            top_p: 1.0,
            top_k: 0,
            ..served.clone()
        },
        ..serving.config().clone()
    };
    Ok(serving.reconfigured(agent_config)?)
}

/// The seed of prompt `k` of round `round`: distinct per round and prompt, reproducible.
fn replay_seed(seed: u64, round: u64, k: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update((k as u64).to_le_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // Episode seeds are `seed + 1000 * i`; keeping the top bits clear avoids wrapping.
    u64::from_le_bytes(bytes) >> 8
}

/// Where a round's replay episodes go, and what gathering them reports to.
pub(crate) struct Gathering<'a> {
    /// The round's number, which seeds its episodes.
    pub round: u64,
    /// Turns an episode's reward ledger into its training reward.
    pub reward_policy: &'a RewardPolicy,
    /// Episodes past these are left out of the batch.
    pub limits: SequenceLimits,
    /// The round's batch.
    pub batch: &'a mut BatchBuilder,
    /// Checked between waves of episodes.
    pub cancel: &'a AtomicBool,
    /// Told the episodes done and the episodes planned.
    pub progress: &'a (dyn Fn(usize, usize) + Sync),
}

/// Samples groups of `config.group_size` episodes and adds them to `batch`: one group for
/// each of the first `config.prompts_per_round` prompts, all at once so a batching engine
/// decodes them together. With dynamic sampling, a group whose episodes all earn the same
/// reward does not count, and further prompts are sampled in waves until
/// `prompts_per_round` groups have spread or the prompts run out. With demonstrations, a
/// group whose episodes all earned less than a teacher playing its question's worked solution
/// gets the teacher's episode (see [`crate::RoundConfig::demonstrations`]). Checks `cancel`
/// between waves and reports progress after each group.
pub(crate) async fn replay_groups(
    agent: &Agent,
    prompts: &[Question],
    config: &RoundConfig,
    out: &mut Gathering<'_>,
) -> Result<ReplayStats> {
    let started = std::time::Instant::now();
    let mut stats = ReplayStats::default();
    let target = config.prompts_per_round.min(prompts.len());
    let total = target * config.group_size;
    let mut next = 0;
    while stats.informative_groups < target && next < prompts.len() {
        if out.cancel.load(Ordering::SeqCst) {
            return Err(LearnError::Cancelled);
        }
        let wave = (target - stats.informative_groups).min(prompts.len() - next);
        let groups = futures::future::join_all((next..next + wave).map(|k| {
            let request = EpisodeRequest {
                question: prompts[k].question.clone(),
                task: Some(prompts[k].task_info(Split::Train)),
                group_id: None,
                seed: Some(replay_seed(config.seed, out.round, k)),
            };
            agent.run_group(request, config.group_size)
        }))
        .await;
        let first = next;
        next += wave;
        for (k, group) in (first..).zip(groups) {
            let group = group?;
            stats.prompts += 1;
            let mut rewards = Vec::with_capacity(group.len());
            let group_id = group
                .first()
                .and_then(|t| t.group_id.clone())
                .unwrap_or_default();
            for t in &group {
                stats.episodes += 1;
                stats.generated_tokens += t.loss_mask().iter().filter(|&&m| m).count();
                let Some(reward) = out.reward_policy.combine(&t.rewards) else {
                    continue;
                };
                rewards.push(reward);
                out.batch
                    .push(t, reward, &group_id, None, Origin::Replay, out.limits);
            }
            if config.demonstrations && !prompts[k].solution.is_empty() {
                let best = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let seed = replay_seed(config.seed, out.round, k);
                let played = demonstration(agent, &prompts[k], seed, &mut stats).await?;
                // Only a group that found nothing as good needs to be shown.
                if let Some(t) = played
                    && let Some(reward) = out
                        .reward_policy
                        .combine(&t.rewards)
                        .filter(|&r| r > best + 1e-9)
                {
                    rewards.push(reward);
                    stats.demonstrations += 1;
                    out.batch.push(
                        &t,
                        reward,
                        &group_id,
                        None,
                        Origin::Demonstration,
                        out.limits,
                    );
                }
            }
            let spread = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                - rewards.iter().copied().fold(f64::INFINITY, f64::min);
            // Without dynamic sampling every group counts, informative or not.
            if spread > 1e-9 || !config.dynamic_sampling {
                stats.informative_groups += 1;
            }
            (out.progress)(stats.episodes.min(total), total);
        }
    }
    stats.seconds = started.elapsed().as_secs_f64();
    if config.demonstrations {
        tracing::info!(
            added = stats.demonstrations,
            unfit = stats.unfit_solutions,
            ungrounded = stats.ungrounded_solutions,
            "demonstrations"
        );
    }
    Ok(stats)
}

/// Plays the worked solutions of `prompts` (those that carry one, in order) until
/// `config.warm_start` demonstrations are in `batch` or the prompts run out, for a warm-start
/// round (see [`crate::RoundConfig::warm_start`]). Each is trained alone, with its reward as
/// its advantage: the group-relative baseline needs samples, and a warm start has none. A
/// solution the protocol cannot play, or that does not reach its answer, is counted and
/// skipped. No prompt with a solution is an error: a warm start that shows nothing would train
/// an empty round.
pub(crate) async fn warm_start_demonstrations(
    agent: &Agent,
    prompts: &[Question],
    config: &RoundConfig,
    out: &mut Gathering<'_>,
) -> Result<ReplayStats> {
    let started = std::time::Instant::now();
    let mut stats = ReplayStats::default();
    let solved: Vec<&Question> = prompts.iter().filter(|q| !q.solution.is_empty()).collect();
    if solved.is_empty() {
        return Err(LearnError::Config(format!(
            "warm_start is {} but no train-split prompt of the round's kinds carries a worked \
             solution",
            config.warm_start
        )));
    }
    for (k, question) in solved.into_iter().enumerate() {
        if stats.demonstrations >= config.warm_start {
            break;
        }
        if out.cancel.load(Ordering::SeqCst) {
            return Err(LearnError::Cancelled);
        }
        stats.prompts += 1;
        let seed = replay_seed(config.seed, out.round, k);
        let Some(t) = demonstration(agent, question, seed, &mut stats).await? else {
            continue;
        };
        match out.reward_policy.combine(&t.rewards) {
            Some(reward) if reward > 0.0 => {
                stats.episodes += 1;
                stats.demonstrations += 1;
                stats.informative_groups += 1;
                let group_id = format!("warm-start-{}-{k}", out.round);
                out.batch.push(
                    &t,
                    reward,
                    &group_id,
                    Some(0.0),
                    Origin::Demonstration,
                    out.limits,
                );
                (out.progress)(stats.demonstrations, config.warm_start);
            }
            // An answer read from the tools that the reward policy does not reward would be
            // imitated against its own reward: left out, and said.
            reward => {
                tracing::warn!(question = %question.id, ?reward, "a demonstration earned no reward")
            }
        }
    }
    stats.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        added = stats.demonstrations,
        unfit = stats.unfit_solutions,
        ungrounded = stats.ungrounded_solutions,
        "warm-start demonstrations"
    );
    Ok(stats)
}

/// The episode of a teacher playing `question`'s worked solution, or `None` (counted in
/// `stats`) when the protocol cannot play it or it does not reach its answer.
async fn demonstration(
    agent: &Agent,
    question: &Question,
    seed: u64,
    stats: &mut ReplayStats,
) -> Result<Option<Box<Trajectory>>> {
    Ok(match demonstrate(agent, question, seed).await? {
        Demonstrated::Episode(t) => Some(t),
        Demonstrated::Unfit(reason) => {
            stats.unfit_solutions += 1;
            tracing::debug!(question = %question.id, %reason, "unfit solution");
            None
        }
        Demonstrated::Ungrounded => {
            stats.ungrounded_solutions += 1;
            tracing::debug!(question = %question.id, "ungrounded solution");
            None
        }
    })
}

/// Running feedback baselines by task kind, carried from round to round in the adapter
/// registry next to the feedback cursor.
pub type FeedbackBaselines = BTreeMap<String, RunningMean>;

/// Adds the logged episodes with host feedback whose ledgers changed after `since` (at most
/// `config.max_feedback_episodes`, the newest) to `batch`, and returns where the next round
/// should resume and the baselines updated with this round's feedback.
///
/// Episodes of one group id stay together when at least two of them carry feedback. The rest
/// are grouped by their exact prompt where it repeats. An episode whose prompt is unique has
/// no group: its advantage is its reward minus the running mean feedback reward of its task
/// kind in `baselines` (the parent round's, so an episode's own reward never sits in its
/// baseline). A kind without history yet falls back to the in-batch mean: its unique episodes
/// form one group.
pub(crate) async fn feedback_groups(
    store: &Store,
    since: Cursor,
    baselines: &FeedbackBaselines,
    config: &RoundConfig,
    limits: SequenceLimits,
    batch: &mut BatchBuilder,
    cancel: &AtomicBool,
) -> Result<(Cursor, FeedbackBaselines)> {
    let mut stream = store
        .rewarded_groups(GroupQuery {
            since,
            min_group_size: 1,
            ..GroupQuery::default()
        })
        .await?;
    let mut members: Vec<(Trajectory, f64)> = Vec::new();
    while let Some(group) = stream.next().await {
        if cancel.load(Ordering::SeqCst) {
            return Err(LearnError::Cancelled);
        }
        for m in group?.members {
            if has_host_feedback(&m.trajectory) {
                members.push((m.trajectory, m.reward));
            }
        }
    }
    let next = stream.next_cursor();
    // Newest first, then keep the budget; ids are UUIDv7, so they break ties in time order.
    members.sort_by(|a, b| (b.0.created_at, &b.0.id).cmp(&(a.0.created_at, &a.0.id)));
    members.truncate(config.max_feedback_episodes);
    for (t, reward, group, baseline) in assign_feedback_groups(&members, baselines) {
        batch.push(t, reward, &group, baseline, Origin::Feedback, limits);
    }
    Ok((next, updated_baselines(baselines, &members)))
}

/// The task kind a feedback episode is baselined by ("" without task metadata).
fn task_kind(t: &Trajectory) -> &str {
    t.task.as_ref().map_or("", |task| task.kind.as_str())
}

/// `baselines` with the rewards of `members` (newest first) added, oldest first. Every episode
/// with host feedback counts, trainable or not (a greedy one still shows how the policy does);
/// one whose feedback changed after an earlier round counts again, with its new reward.
fn updated_baselines(
    baselines: &FeedbackBaselines,
    members: &[(Trajectory, f64)],
) -> FeedbackBaselines {
    let mut updated = baselines.clone();
    for (t, reward) in members.iter().rev() {
        updated
            .entry(task_kind(t).to_string())
            .or_default()
            .add(*reward);
    }
    updated
}

/// The group each feedback episode trains in, and its baseline when it trains against one
/// instead (see [`feedback_groups`]).
fn assign_feedback_groups<'a>(
    members: &'a [(Trajectory, f64)],
    baselines: &FeedbackBaselines,
) -> Vec<(&'a Trajectory, f64, String, Option<f64>)> {
    let mut by_group: HashMap<&str, usize> = HashMap::new();
    for (t, _) in members {
        if let Some(g) = t.group_id.as_deref() {
            *by_group.entry(g).or_default() += 1;
        }
    }
    let mut by_prompt: HashMap<&str, usize> = HashMap::new();
    for (t, _) in members {
        if t.group_id.as_deref().is_none_or(|g| by_group[g] < 2) {
            *by_prompt.entry(t.prompt_text.as_str()).or_default() += 1;
        }
    }
    members
        .iter()
        .map(|(t, reward)| {
            let (group, baseline) = match t.group_id.as_deref() {
                Some(g) if by_group[g] >= 2 => (format!("feedback:group:{g}"), None),
                _ if by_prompt[t.prompt_text.as_str()] >= 2 => (
                    format!("feedback:prompt:{}", short_hash(&t.prompt_text)),
                    None,
                ),
                _ => {
                    let kind = task_kind(t);
                    let history = baselines.get(kind).filter(|b| b.count > 0);
                    (format!("feedback:kind:{kind}"), history.map(|b| b.mean))
                }
            };
            (t, *reward, group, baseline)
        })
        .collect()
}

fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use searchloop_core::{EpisodeEnd, Split, TaskInfo, Timing, trajectory::SequenceBuilder};

    use super::*;

    fn episode(id: &str, group: Option<&str>, prompt: &str, kind: &str) -> Trajectory {
        let mut b = SequenceBuilder::new(vec![1, 2]);
        b.push_model(&[3], &[-0.5]);
        let (tokens, segments, logprobs) = b.finish();
        Trajectory {
            id: id.into(),
            created_at: Utc::now(),
            question: prompt.into(),
            prompt_text: prompt.into(),
            response_text: String::new(),
            task: Some(TaskInfo {
                task_id: id.into(),
                gold_answers: vec![],
                split: Split::Train,
                kind: kind.into(),
                tools: Vec::new(),
            }),
            tokens,
            segments,
            logprobs,
            tool_calls: vec![],
            answer: None,
            end: EpisodeEnd::Answered,
            turns: 1,
            model_id: "m".into(),
            adapter_version: None,
            replica_id: None,
            sampling: SamplingParams::default(),
            group_id: group.map(str::to_string),
            timing: Timing::default(),
            rewards: vec![],
        }
    }

    /// A catalog tool that echoes its query; the scripted answers below never call it, and a
    /// worked solution's query shows the answer it names.
    struct EchoCatalog;

    impl searchloop_core::Tool for EchoCatalog {
        type Args = serde_json::Value;
        fn name(&self) -> &str {
            "catalog"
        }
        fn description(&self) -> &str {
            "Finds products."
        }
        fn parameters(&self) -> serde_json::Value {
            serde_json::json!({"type": "object"})
        }
        async fn call(
            &self,
            args: serde_json::Value,
        ) -> std::result::Result<String, searchloop_core::ToolError> {
            Ok(format!("found: {}", args["query"]))
        }
    }

    /// An agent whose scripted model answers "steady" questions right every time, "varied"
    /// ones right on every other call, so only varied groups have reward spread, and "hard"
    /// ones never.
    fn scripted_agent(serving_temperature: f32) -> Agent {
        use std::sync::{Arc, atomic::AtomicUsize};

        let calls = AtomicUsize::new(0);
        let policy = searchloop_core::scripted::ScriptedPolicy::new(move |context: &str| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if context.contains("hard") || (context.contains("varied") && n % 2 == 1) {
                "<answer>wrong</answer>".into()
            } else {
                "<answer>right</answer>".into()
            }
        });
        let mut registry = searchloop_core::ToolRegistry::new();
        registry.register(Arc::new(EchoCatalog)).unwrap();
        let mut config = AgentConfig::default();
        config.protocol.first_turn_prefill = None;
        config.protocol.after_observation_prefill = None;
        config.protocol.max_turn_tokens = 100;
        config.protocol.max_episode_tokens = 1_000;
        config.sampling.temperature = serving_temperature;
        let slot = Arc::new(searchloop_core::PolicySlot::new(Arc::new(policy)));
        Agent::new(slot, Arc::new(registry), config).unwrap()
    }

    fn question(id: &str, text: &str) -> Question {
        Question {
            id: id.into(),
            question: text.into(),
            answers: vec!["right".into()],
            kind: String::new(),
            tools: Vec::new(),
            solution: Vec::new(),
        }
    }

    /// A question whose worked solution searches the catalog for `input`.
    fn solved(id: &str, text: &str, input: &str) -> Question {
        Question {
            solution: vec![searchloop_core::SolutionStep {
                tool: "catalog".into(),
                input: input.into(),
            }],
            ..question(id, text)
        }
    }

    const TEST_LIMITS: SequenceLimits = SequenceLimits {
        vocab_size: 256,
        max_tokens: 100_000,
    };

    /// Gathers round 0's replay episodes over `prompts` (a warm start's demonstrations when
    /// `warm_start`, else sampled groups) and returns what that did, with the batch it filled.
    async fn gather(
        agent: &Agent,
        prompts: &[Question],
        config: &RoundConfig,
        warm_start: bool,
    ) -> Result<(ReplayStats, BatchBuilder)> {
        let mut batch = BatchBuilder::default();
        let (reward_policy, cancel) = (RewardPolicy::default(), AtomicBool::new(false));
        let mut out = Gathering {
            round: 0,
            reward_policy: &reward_policy,
            limits: TEST_LIMITS,
            batch: &mut batch,
            cancel: &cancel,
            progress: &|_, _| {},
        };
        let stats = if warm_start {
            warm_start_demonstrations(agent, prompts, config, &mut out).await?
        } else {
            replay_groups(agent, prompts, config, &mut out).await?
        };
        Ok((stats, batch))
    }

    /// Samples the replay groups of round 0 over `prompts`.
    async fn sample(
        agent: &Agent,
        prompts: &[Question],
        config: &RoundConfig,
    ) -> (ReplayStats, BatchBuilder) {
        gather(agent, prompts, config, false).await.unwrap()
    }

    #[tokio::test]
    async fn dynamic_sampling_replaces_groups_without_spread_from_further_prompts() {
        let agent = replay_agent(&scripted_agent(0.3), &RoundConfig::default()).unwrap();
        let prompts = [
            question("s1", "a steady question"),
            question("s2", "another steady question"),
            question("v1", "a varied question"),
            question("v2", "another varied question"),
            question("v3", "a third varied question"),
        ];
        let mut config = RoundConfig {
            prompts_per_round: 2,
            group_size: 4,
            dynamic_sampling: false,
            ..RoundConfig::default()
        };
        // Without it, the first two prompts make the round, spread or not.
        let (stats, batch) = sample(&agent, &prompts, &config).await;
        assert_eq!((stats.prompts, stats.informative_groups), (2, 2));
        assert_eq!((stats.episodes, batch.len()), (8, 8));

        // With it, the two steady groups do not count, and a second wave samples the next
        // two prompts, which have spread; the fifth prompt is never needed.
        config.dynamic_sampling = true;
        let (stats, batch) = sample(&agent, &prompts, &config).await;
        assert_eq!(stats.prompts, 4, "{stats:?}");
        assert_eq!(stats.informative_groups, 2, "{stats:?}");
        assert_eq!((stats.episodes, batch.len()), (16, 16));

        // Prompts that run out end the round with what it has.
        let steady_only = &prompts[..2];
        let (stats, _) = sample(&agent, steady_only, &config).await;
        assert_eq!((stats.prompts, stats.informative_groups), (2, 0));
    }

    #[tokio::test]
    async fn a_demonstration_joins_only_a_group_that_found_no_answer_as_good() {
        let agent = replay_agent(&scripted_agent(0.3), &RoundConfig::default()).unwrap();
        let prompts = [
            solved("h1", "a hard question", "the right one"),
            solved("v1", "a varied question", "the right one"),
            question("h2", "another hard question"),
        ];
        let mut config = RoundConfig {
            prompts_per_round: 3,
            group_size: 4,
            dynamic_sampling: true,
            demonstrations: true,
            ..RoundConfig::default()
        };
        let (stats, batch) = sample(&agent, &prompts, &config).await;
        // The hard group with a solution gets the teacher's episode and so has spread; the
        // varied group already answered right; the hard group without a solution stays flat.
        assert_eq!(stats.demonstrations, 1, "{stats:?}");
        assert_eq!(stats.informative_groups, 2, "{stats:?}");
        let (sequences, batch_stats) = batch.finish();
        assert_eq!(
            (sequences.len(), batch_stats.demonstration_sequences),
            (13, 1)
        );
        let demonstration = sequences.iter().find(|s| s.demonstration).unwrap();
        let first_hard = &sequences[0];
        assert_eq!(demonstration.group_id, first_hard.group_id);
        assert!(demonstration.reward > first_hard.reward);

        // Off by default.
        config.demonstrations = false;
        let (stats, batch) = sample(&agent, &prompts, &config).await;
        assert_eq!((stats.demonstrations, batch.len()), (0, 12));
    }

    #[tokio::test]
    async fn a_warm_start_trains_each_grounded_demonstration_alone_against_a_zero_baseline() {
        let agent = scripted_agent(0.3);
        let prompts = [
            question("n1", "a hard question without a solution"),
            solved("u1", "a hard question", "somewhere else"),
            solved("h1", "a hard question", "the right one"),
            solved("h2", "another hard question", "the right one"),
            solved("h3", "a third hard question", "the right one"),
        ];
        let config = RoundConfig {
            warm_start: 2,
            ..RoundConfig::default()
        };
        let (stats, batch) = gather(&agent, &prompts, &config, true).await.unwrap();
        // The prompt without a solution is passed over, the ungrounded one (its search shows
        // no gold answer) is counted and skipped, and the third solved one is not needed.
        assert_eq!(stats.ungrounded_solutions, 1, "{stats:?}");
        assert_eq!((stats.prompts, stats.demonstrations), (3, 2), "{stats:?}");
        let (sequences, batch_stats) = batch.finish();
        assert_eq!(batch_stats.demonstration_sequences, 2);
        for s in &sequences {
            assert!(s.demonstration);
            assert_eq!(s.baseline, Some(0.0));
            assert!(s.reward > 0.0, "{}", s.reward);
        }
        assert_ne!(sequences[0].group_id, sequences[1].group_id);

        // Prompts without a worked solution cannot warm-start a round.
        let err = gather(&agent, &prompts[..1], &config, true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("warm_start is 2"), "{err}");
    }

    #[test]
    fn a_warm_start_round_trains_under_cispo() {
        let config = RoundConfig {
            warm_start: 4,
            ..RoundConfig::default()
        };
        assert_eq!(
            config.trainer.loss.kind,
            searchloop_train_sapo::LossKind::Sapo
        );
        let warm = config.for_warm_start();
        assert_eq!(
            warm.trainer.loss.kind,
            searchloop_train_sapo::LossKind::Cispo
        );
        assert_eq!(warm.trainer.learning_rate, config.trainer.learning_rate);
    }

    #[tokio::test]
    async fn replay_episodes_sample_at_the_rollout_temperature_not_the_serving_one() {
        let serving = scripted_agent(0.3);
        let config = RoundConfig {
            rollout_temperature: Some(1.0),
            prompts_per_round: 1,
            group_size: 2,
            ..RoundConfig::default()
        };
        let agent = replay_agent(&serving, &config).unwrap();
        assert_eq!(agent.config().sampling.temperature, 1.0);
        assert_eq!(agent.config().sampling.top_p, 1.0);
        // The serving agent is left as it was.
        assert_eq!(serving.config().sampling.temperature, 0.3);
        let (_, batch) = sample(&agent, &[question("v1", "a varied question")], &config).await;
        let (sequences, stats) = batch.finish();
        assert_eq!(sequences.len(), 2);
        // Each episode records the temperature it was sampled at, which the trainer scores at.
        assert!(sequences.iter().all(|s| s.temperature == 1.0));
        assert_eq!(stats.temperature_mean, 1.0);

        // Without a rollout temperature the serving one is used; a greedy server has none to
        // give, which is one clear error.
        let unset = RoundConfig::default();
        assert_eq!(
            replay_agent(&serving, &unset)
                .unwrap()
                .config()
                .sampling
                .temperature,
            0.3
        );
        let err = replay_agent(&scripted_agent(0.0), &unset).unwrap_err();
        assert!(err.to_string().contains("rollout_temperature"), "{err}");
    }

    #[test]
    fn feedback_episodes_group_by_group_then_prompt_then_kind() {
        let members: Vec<(Trajectory, f64)> = [
            episode("a1", Some("g1"), "p1", "single_hop"),
            episode("a2", Some("g1"), "p9", "single_hop"),
            episode("b1", Some("g2"), "p2", "inventory"),
            episode("c1", None, "p2", "inventory"),
            episode("d1", None, "p3", "inventory"),
            episode("e1", None, "p4", "inventory"),
            episode("f1", None, "p5", "single_hop"),
        ]
        .into_iter()
        .map(|t| (t, 1.0))
        .collect();
        // No history yet: unique prompts fall back to one in-batch group per kind.
        let assigned = assign_feedback_groups(&members, &FeedbackBaselines::new());
        let groups: Vec<&str> = assigned.iter().map(|(_, _, g, _)| g.as_str()).collect();
        assert_eq!(groups[0], "feedback:group:g1");
        assert_eq!(groups[1], "feedback:group:g1");
        // g2 has one feedback member, so it joins the other episode of its prompt.
        assert!(groups[2].starts_with("feedback:prompt:"));
        assert_eq!(groups[2], groups[3]);
        assert_eq!(groups[4], "feedback:kind:inventory");
        assert_eq!(groups[5], "feedback:kind:inventory");
        assert_eq!(groups[6], "feedback:kind:single_hop");
        assert!(assigned.iter().all(|(_, _, _, b)| b.is_none()));

        // With a running mean for inventory, its unique episodes train against it; grouped
        // episodes and kinds without history are unchanged.
        let mut baselines = FeedbackBaselines::new();
        baselines.insert(
            "inventory".into(),
            RunningMean {
                mean: 0.25,
                count: 3,
            },
        );
        let assigned = assign_feedback_groups(&members, &baselines);
        let with: Vec<Option<f64>> = assigned.iter().map(|(_, _, _, b)| *b).collect();
        assert_eq!(with, [None, None, None, None, Some(0.25), Some(0.25), None]);
        assert_eq!(assigned[6].2, "feedback:kind:single_hop");
    }

    #[test]
    fn running_means_average_then_follow_recent_rewards() {
        let mut m = RunningMean::default();
        for r in [1.0, 0.0, 0.5] {
            m.add(r);
        }
        assert!((m.mean - 0.5).abs() < 1e-12 && m.count == 3);
        // Past the window, a reward moves the mean by 1/RunningMean::WINDOW of its distance.
        let mut full = RunningMean {
            mean: 0.0,
            count: RunningMean::WINDOW,
        };
        full.add(1.0);
        assert!((full.mean - 1.0 / RunningMean::WINDOW as f64).abs() < 1e-12);

        // Updating adds every member's reward to its kind, oldest first.
        let members: Vec<(Trajectory, f64)> = vec![
            (episode("n", None, "p1", "toy"), 1.0),
            (episode("o", None, "p2", "toy"), 0.0),
            (episode("x", None, "p3", "other"), -1.0),
        ];
        let mut before = FeedbackBaselines::new();
        before.insert(
            "toy".into(),
            RunningMean {
                mean: 0.5,
                count: 2,
            },
        );
        let after = updated_baselines(&before, &members);
        assert_eq!(after["toy"].count, 4);
        assert!((after["toy"].mean - 0.5).abs() < 1e-12);
        assert_eq!(
            after["other"],
            RunningMean {
                mean: -1.0,
                count: 1
            }
        );
        // The parent's baselines are not changed in place.
        assert_eq!(before["toy"].count, 2);
    }

    #[test]
    fn replay_seeds_differ_per_round_and_prompt_and_leave_room() {
        let a = replay_seed(1, 0, 0);
        assert_eq!(a, replay_seed(1, 0, 0));
        assert_ne!(a, replay_seed(1, 1, 0));
        assert_ne!(a, replay_seed(1, 0, 1));
        assert_ne!(a, replay_seed(2, 0, 0));
        assert!(a.checked_add(1000 * 64).is_some());
    }
}
