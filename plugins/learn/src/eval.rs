//! Held-out evaluation: run the agent on fixed questions with fixed seeds and score the answers
//! by Search-R1 exact match and token F1, overall and per question kind, with how often the
//! episode called the tools its question needs. Two models evaluated on the same items with
//! the same seed see the same questions and the same random streams, so their scores are
//! comparable.

use std::collections::BTreeMap;

use futures::{StreamExt, stream::FuturesUnordered};
use searchloop_core::{Agent, EpisodeRequest, RewardPolicy, Split, Trajectory, reward};
use serde::{Deserialize, Serialize};

use crate::{error::Result, questions::Question};

/// Episodes of an evaluation run at once by default: a batching engine decodes them together,
/// one that serves a request at a time queues them.
pub const EVAL_CONCURRENCY: usize = 8;

/// Scores over a set of held-out items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Items evaluated.
    pub n: usize,
    /// Mean exact match.
    pub em: f64,
    /// Mean token F1.
    pub f1: f64,
    /// Mean episode reward (the agent's exact-match, F1 and format rewards, weighted).
    pub mean_reward: f64,
    /// Among the items whose question names the tools it needs, the share whose episode called
    /// every one of them (`None`: no item names its tools).
    #[serde(default)]
    pub right_tools: Option<f64>,
    /// The same scores per question kind (items without a kind under `""`).
    #[serde(default)]
    pub by_kind: BTreeMap<String, KindReport>,
}

/// Scores of the items of one question kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KindReport {
    /// Items of this kind.
    pub n: usize,
    /// Mean exact match.
    pub em: f64,
    /// Mean token F1.
    pub f1: f64,
    /// The share of items that name their tools whose episode called them all.
    pub right_tools: Option<f64>,
}

/// Running sums behind a report.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    n: usize,
    em: f64,
    f1: f64,
    reward: f64,
    with_tools: usize,
    right_tools: usize,
}

impl Sums {
    fn add(&mut self, score: &ItemScore) {
        self.n += 1;
        self.em += score.em;
        self.f1 += score.f1;
        self.reward += score.reward;
        if let Some(right) = score.right_tools {
            self.with_tools += 1;
            self.right_tools += usize::from(right);
        }
    }

    fn mean(&self, total: f64) -> f64 {
        total / self.n.max(1) as f64
    }

    fn right_tools(&self) -> Option<f64> {
        (self.with_tools > 0).then(|| self.right_tools as f64 / self.with_tools as f64)
    }
}

/// One item's scores.
struct ItemScore {
    em: f64,
    f1: f64,
    reward: f64,
    /// Whether the episode called every tool the item names (`None`: it names none).
    right_tools: Option<bool>,
}

/// Whether `trajectory` called every tool in `tools` at least once.
pub fn called_every_tool(trajectory: &Trajectory, tools: &[String]) -> bool {
    tools
        .iter()
        .all(|tool| trajectory.tool_calls.iter().any(|call| &call.tool == tool))
}

/// Runs item `i` with seed `seed + i`.
async fn run_item(
    agent: &Agent,
    item: &Question,
    i: usize,
    seed: u64,
) -> (usize, searchloop_core::Result<Trajectory>) {
    let request = EpisodeRequest {
        question: item.question.clone(),
        task: Some(item.task_info(Split::Heldout)),
        group_id: None,
        seed: Some(seed.wrapping_add(i as u64)),
    };
    (i, agent.run(request).await)
}

/// Evaluates `agent` on `items`: item `i` runs with seed `seed + i`, [`EVAL_CONCURRENCY`] at
/// a time.
pub async fn evaluate(agent: &Agent, items: &[Question], seed: u64) -> Result<EvalReport> {
    evaluate_observed(agent, items, seed, EVAL_CONCURRENCY, &|_, _| {}).await
}

/// [`evaluate`] with `concurrency` episodes at a time, calling `on_episode(i, trajectory)` as
/// item `i` finishes. The scores do not depend on the concurrency: every item has its own seed.
pub async fn evaluate_observed(
    agent: &Agent,
    items: &[Question],
    seed: u64,
    concurrency: usize,
    on_episode: &(dyn Fn(usize, &Trajectory) + Sync),
) -> Result<EvalReport> {
    let policy = RewardPolicy::default();
    let mut scores: Vec<Option<ItemScore>> = items.iter().map(|_| None).collect();
    let mut running = FuturesUnordered::new();
    let mut next = 0;
    loop {
        while next < items.len() && running.len() < concurrency.max(1) {
            running.push(run_item(agent, &items[next], next, seed));
            next += 1;
        }
        let Some((i, episode)) = running.next().await else {
            break;
        };
        let t = episode?;
        let item = &items[i];
        let answer = t.answer.as_deref().unwrap_or("");
        scores[i] = Some(ItemScore {
            em: reward::exact_match(answer, &item.answers),
            f1: reward::f1_score(answer, &item.answers),
            reward: policy.combine(&t.rewards).unwrap_or(0.0),
            right_tools: (!item.tools.is_empty()).then(|| called_every_tool(&t, &item.tools)),
        });
        on_episode(i, &t);
    }
    let mut all = Sums::default();
    let mut kinds: BTreeMap<String, Sums> = BTreeMap::new();
    for (item, score) in items.iter().zip(scores.iter().flatten()) {
        all.add(score);
        kinds.entry(item.kind.clone()).or_default().add(score);
    }
    Ok(EvalReport {
        n: items.len(),
        em: all.mean(all.em),
        f1: all.mean(all.f1),
        mean_reward: all.mean(all.reward),
        right_tools: all.right_tools(),
        by_kind: kinds
            .into_iter()
            .map(|(kind, s)| {
                let report = KindReport {
                    n: s.n,
                    em: s.mean(s.em),
                    f1: s.mean(s.f1),
                    right_tools: s.right_tools(),
                };
                (kind, report)
            })
            .collect(),
    })
}
