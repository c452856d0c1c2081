//! Held-out evaluation: run the agent on fixed questions with fixed seeds and score the answers
//! by Search-R1 exact match and token F1. Two models evaluated on the same items with the same
//! seed see the same questions and the same random streams, so their scores are comparable.

use searchloop_core::{Agent, EpisodeRequest, RewardPolicy, Split, TaskInfo, Trajectory, reward};
use serde::{Deserialize, Serialize};

use crate::{error::Result, prompts::EvalItem};

/// Scores over a set of held-out items.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Items evaluated.
    pub n: usize,
    /// Mean exact match.
    pub em: f64,
    /// Mean token F1.
    pub f1: f64,
    /// Mean episode reward (the agent's exact-match, F1 and format rewards, weighted).
    pub mean_reward: f64,
}

/// Evaluates `agent` on `items`: item `i` runs with seed `seed + i`.
pub async fn evaluate(agent: &Agent, items: &[EvalItem], seed: u64) -> Result<EvalReport> {
    evaluate_observed(agent, items, seed, &|_, _| {}).await
}

/// [`evaluate`], calling `on_episode(i, trajectory)` after item `i`.
pub async fn evaluate_observed(
    agent: &Agent,
    items: &[EvalItem],
    seed: u64,
    on_episode: &(dyn Fn(usize, &Trajectory) + Sync),
) -> Result<EvalReport> {
    let policy = RewardPolicy::default();
    let (mut em, mut f1, mut total_reward) = (0.0, 0.0, 0.0);
    for (i, item) in items.iter().enumerate() {
        let request = EpisodeRequest {
            question: item.question.clone(),
            task: Some(TaskInfo {
                task_id: format!("eval-{i}"),
                gold_answers: item.answers.clone(),
                split: Split::Heldout,
                kind: "eval".into(),
            }),
            group_id: None,
            seed: Some(seed.wrapping_add(i as u64)),
        };
        let t = agent.run(request).await?;
        let answer = t.answer.as_deref().unwrap_or("");
        em += reward::exact_match(answer, &item.answers);
        f1 += reward::f1_score(answer, &item.answers);
        total_reward += policy.combine(&t.rewards).unwrap_or(0.0);
        on_episode(i, &t);
    }
    let n = items.len().max(1) as f64;
    Ok(EvalReport {
        n: items.len(),
        em: em / n,
        f1: f1 / n,
        mean_reward: total_reward / n,
    })
}
