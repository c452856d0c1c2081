//! The eval gate on the real model: a candidate that serves like the promoted model is promoted,
//! a damaged one (a LoRA with huge weights: garbage answers) is rejected with the reason, and
//! both evaluations are recorded in the registry.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Craft, CraftedRound, Workspace};
use searchloop_demo::retail::Split;
use searchloop_loop::{GateMetric, GateVerdict, scheduler::RoundTrigger};
use searchloop_runtime::Runtime;
use searchloop_store_sql::AdapterStatus;

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_promotes_a_good_candidate_and_rejects_a_damaged_one() {
    let mut ws = Workspace::new(120);
    // A wrecked model writes until every limit: keep the limits short.
    ws.config.agent.protocol.max_turns = 2;
    ws.config.agent.protocol.max_episode_tokens = 96;
    // One held-out question the base model answers well enough at the gate's seed, so a
    // damaged model can do measurably worse: the first of the held-out questions that it does.
    let probe = Runtime::start(ws.config.clone()).await.unwrap();
    // An agent that records nothing, like the gate's own.
    let agent = searchloop_core::Agent::new(
        Arc::new(searchloop_core::PolicySlot::new(
            probe.agent().policy().current(),
        )),
        probe.agent().tools().clone(),
        probe.agent().config().clone(),
    )
    .unwrap();
    let mut chosen = None;
    for question in ws
        .questions
        .iter()
        .filter(|q| q.split == Split::Heldout)
        .take(12)
    {
        let item = searchloop_learn::Question {
            id: question.id.clone(),
            question: question.question.clone(),
            answers: question.answers.clone(),
            kind: String::new(),
            tools: Vec::new(),
            solution: Vec::new(),
        };
        let report = searchloop_learn::evaluate(&agent, std::slice::from_ref(&item), 0)
            .await
            .unwrap();
        if report.mean_reward > 0.2 {
            chosen = Some(question.clone());
            break;
        }
    }
    drop(agent);
    probe.store().close().await;
    drop(probe);
    let question = chosen.expect("the base model answers none of twelve held-out questions");
    let eval_set = ws.dir.path().join("eval.jsonl");
    std::fs::write(
        &eval_set,
        serde_json::json!({"question": question.question, "answers": question.answers}).to_string(),
    )
    .unwrap();
    let mut learn = ws.learn_config(1);
    learn.eval.set = eval_set;
    learn.gate.metric = GateMetric::Reward;
    learn.gate.margin = 0.05;
    ws.config.learn = Some(learn);
    let runtime = Runtime::start(ws.config.clone()).await.unwrap();
    let store = runtime.store().clone();

    runtime.set_round_runner(Arc::new(CraftedRound::new(Craft::Good)));
    let good = runtime.train_now().await.unwrap();
    eprintln!(
        "good: {:?} candidate {:?} incumbent {:?} ({} ms)",
        good.verdict, good.candidate_eval, good.incumbent_eval, good.gate_ms
    );
    assert_eq!(good.trigger, RoundTrigger::Manual);
    assert_eq!(good.verdict, GateVerdict::Promote);
    let (candidate, incumbent) = (good.candidate_eval.unwrap(), good.incumbent_eval.unwrap());
    assert!(
        incumbent.mean_reward > 0.2,
        "the base model answers: {incumbent:?}"
    );
    assert_eq!(
        candidate, incumbent,
        "a zero LoRA serves exactly like the base model"
    );
    assert_eq!(
        good.swap.as_ref().map(|s| (s.from, s.to)),
        Some((None, Some(1)))
    );
    assert_eq!(
        runtime.agent().policy().current().adapter_version(),
        Some(1)
    );

    runtime.set_round_runner(Arc::new(CraftedRound::new(Craft::Damaged(1.0))));
    let bad = runtime.train_now().await.unwrap();
    eprintln!(
        "damaged: {:?} candidate {:?} incumbent {:?} ({} ms)",
        bad.verdict, bad.candidate_eval, bad.incumbent_eval, bad.gate_ms
    );
    let GateVerdict::Reject { reason } = &bad.verdict else {
        panic!("the damaged candidate was promoted: {bad:?}");
    };
    assert!(reason.contains("worse"), "{reason}");
    assert_eq!(bad.incumbent, Some(1));
    // v1's own gate evaluation is reused: same questions, seed and agent settings.
    assert_eq!(bad.incumbent_eval, Some(candidate.clone()));
    assert!(bad.candidate_eval.unwrap().mean_reward < candidate.mean_reward - 0.05);
    assert!(bad.swap.is_none());
    assert_eq!(
        runtime.agent().policy().current().adapter_version(),
        Some(1)
    );

    let v2 = store.get_adapter(2).await.unwrap().unwrap();
    assert_eq!(v2.status, AdapterStatus::Rejected);
    assert_eq!(v2.status_reason.as_deref(), Some(reason.as_str()));
    let results = v2.eval_results.unwrap();
    assert_eq!(results["verdict"]["decision"], "reject");
    assert_eq!(results["incumbent_version"], 1);
    let metrics = runtime.loop_metrics();
    assert_eq!(
        (
            metrics.rounds_completed,
            metrics.candidates_promoted,
            metrics.candidates_rejected
        ),
        (2, 1, 1)
    );
}
