//! The learning loop with scripted models and stand-in rounds: start-up validation, the
//! scheduler's trigger, the live monitor's automatic rollback, one round at a time,
//! cancellation, the memory cap, and the ISDD alarm.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use common::{Craft, CraftedRound, ScriptedLoader, Workspace, step};
use searchloop_demo::retail::Split;
use searchloop_e2e::PgSchema;
use searchloop_loop::{GateVerdict, LoopError};
use searchloop_runtime::{AppConfig, LoopMetrics, Runtime, RuntimeError};
use searchloop_store_sql::AdapterStatus;

/// Polls `metrics` until `done` holds, failing after `timeout`.
async fn wait_for(runtime: &Runtime, timeout: Duration, done: impl Fn(&LoopMetrics) -> bool) {
    let started = Instant::now();
    loop {
        let metrics = runtime.loop_metrics();
        if done(&metrics) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out; the loop is at {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scripted(ws: &Workspace) -> (Runtime, Arc<ScriptedLoader>) {
    let loader = Arc::new(ScriptedLoader::naming_versions());
    let runtime = Runtime::start_with(ws.config.clone(), Vec::new(), loader.clone())
        .await
        .unwrap();
    (runtime, loader)
}

/// A change that makes a `[learn]` section invalid.
type Spoil = Box<dyn Fn(&mut searchloop_runtime::SchedulerConfig)>;

#[tokio::test]
async fn bad_learn_configs_fail_at_start_up_with_one_clear_error() {
    let ws = Workspace::new(60);
    let cases: Vec<(Spoil, &str)> = vec![
        (
            Box::new(|l| l.trigger.new_rewarded = Some(0)),
            "learn.trigger.new_rewarded must be at least 1",
        ),
        (
            Box::new(|l| {
                l.trigger.new_rewarded = None;
                l.trigger.interval_minutes = None;
            }),
            "needs new_rewarded or interval_minutes",
        ),
        (
            Box::new(|l| {
                l.trigger.interval_minutes = Some(5.0);
                l.trigger.min_rewarded = 0;
            }),
            "learn.trigger.min_rewarded",
        ),
        (
            Box::new(|l| l.eval.set = l.eval.set.with_file_name("missing.jsonl")),
            "missing.jsonl",
        ),
        (Box::new(|l| l.round.group_size = 1), "learn.round"),
        (Box::new(|l| l.monitor.window = 0), "learn.monitor.window"),
    ];
    for (spoil, expected) in cases {
        let mut config = ws.config.clone();
        let mut learn = ws.learn_config(2);
        spoil(&mut learn);
        config.learn = Some(learn.clone());
        // Before any model is loaded: the loader would fail the test if it were called.
        let loader = Arc::new(ScriptedLoader::naming_versions());
        let err = Runtime::start_with(config, Vec::new(), loader.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Config(_)), "{err}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
        assert_eq!(loader.loads.load(Ordering::SeqCst), 0);
        // Attaching the same section to a running process fails the same way.
        let (runtime, _) = scripted(&ws).await;
        let err = runtime.attach_scheduler(learn).await.unwrap_err();
        assert!(err.to_string().contains(expected), "{expected}: {err}");
        assert!(!runtime.scheduler_attached());
    }
    // A config file with a bad [learn] section is refused when it is read, naming the file.
    let path = ws.dir.path().join("searchloop.toml");
    std::fs::write(
        &path,
        "[[tools]]\nkind = \"catalog\"\nindex = \"index\"\n\
         [learn.eval]\nset = \"data/questions.jsonl\"\n[learn.trigger]\nnew_rewarded = 0\n",
    )
    .unwrap();
    let err = AppConfig::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("searchloop.toml") && err.contains("new_rewarded"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_data_starts_a_round_and_an_online_regression_rolls_it_back() {
    let mut ws = Workspace::new(60);
    // Every model answers held-out questions right; on train-split (traffic) questions the
    // base model is right and v1 wrong: v1 passes the gate and then fails online.
    let gold: HashMap<String, (Split, String)> = ws
        .questions
        .iter()
        .map(|q| (q.question.clone(), (q.split, q.answers[0].clone())))
        .collect();
    let loader = Arc::new(ScriptedLoader::new(move |version, question| {
        match gold.get(question) {
            Some((Split::Train, _)) if version.is_some() => "no idea".to_string(),
            Some((_, answer)) => answer.clone(),
            None => "unknown question".to_string(),
        }
    }));
    let mut learn = ws.learn_config(2);
    learn.trigger.new_rewarded = Some(4);
    learn.monitor.window = 3;
    learn.monitor.margin = 0.1;
    ws.config.learn = Some(learn.clone());
    let runtime = Runtime::start_with(ws.config.clone(), Vec::new(), loader)
        .await
        .unwrap();
    runtime.set_round_runner(Arc::new(CraftedRound::new(Craft::Stub)));
    runtime.attach_scheduler(learn).await.unwrap();
    let traffic: Vec<_> = ws
        .questions
        .iter()
        .filter(|q| q.split == Split::Train)
        .take(7)
        .collect();

    for (i, q) in traffic[..4].iter().enumerate() {
        let t = runtime.run(ws.request(q, i as u64)).await.unwrap();
        assert_eq!(t.adapter_version, None);
    }
    wait_for(&runtime, Duration::from_secs(10), |m| {
        m.serving_version == Some(1)
    })
    .await;
    let metrics = runtime.loop_metrics();
    assert_eq!(
        (metrics.rounds_completed, metrics.candidates_promoted),
        (1, 1)
    );

    for (i, q) in traffic[4..].iter().enumerate() {
        let t = runtime.run(ws.request(q, 10 + i as u64)).await.unwrap();
        assert_eq!(t.adapter_version, Some(1));
        assert_eq!(t.answer.as_deref(), Some("no idea"));
    }
    wait_for(&runtime, Duration::from_secs(10), |m| m.auto_rollbacks == 1).await;
    let metrics = runtime.loop_metrics();
    assert_eq!(metrics.serving_version, None);
    assert_eq!((metrics.swaps, metrics.rollbacks), (2, 1));
    let v1 = runtime.store().get_adapter(1).await.unwrap().unwrap();
    assert_eq!(v1.status, AdapterStatus::RolledBack);
    let reason = v1.status_reason.unwrap();
    assert!(reason.contains("automatic rollback"), "{reason}");
    // No second round: the round's own episodes and the three new ones stay below the trigger.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runtime.loop_metrics().rounds_started, 1);
    runtime.detach_scheduler().await;
    assert!(!runtime.scheduler_attached());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_run_one_at_a_time_and_a_cancelled_one_leaves_no_trace() {
    let mut ws = Workspace::new(60);
    ws.config.learn = Some(ws.learn_config(2));
    let (runtime, _) = scripted(&ws).await;
    let runtime = Arc::new(runtime);
    runtime.set_round_runner(Arc::new(CraftedRound {
        wait_for_cancel: true,
        ..CraftedRound::new(Craft::Stub)
    }));
    let first = {
        let runtime = runtime.clone();
        tokio::spawn(async move { runtime.train_now().await })
    };
    wait_for(&runtime, Duration::from_secs(5), |m| m.round_running).await;
    assert!(matches!(
        runtime.train_now().await,
        Err(RuntimeError::Loop(LoopError::RoundBusy))
    ));
    // Serving keeps answering while the round runs.
    runtime.ask(&ws.questions[0].question).await.unwrap();
    assert!(runtime.cancel_round());
    assert!(matches!(
        first.await.unwrap(),
        Err(RuntimeError::Loop(LoopError::RoundCancelled))
    ));
    assert!(runtime.store().list_adapters().await.unwrap().is_empty());
    let metrics = runtime.loop_metrics();
    assert_eq!(
        (
            metrics.rounds_started,
            metrics.rounds_cancelled,
            metrics.round_running
        ),
        (1, 1, false)
    );
    assert!(!runtime.cancel_round(), "no round is running any more");
}

/// Resident memory of this process in MiB.
fn resident_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_outgrows_the_memory_cap_is_stopped() {
    let mut ws = Workspace::new(60);
    let mut learn = ws.learn_config(2);
    learn.memory_cap_mb = resident_mb() + 300;
    ws.config.learn = Some(learn);
    let (runtime, _) = scripted(&ws).await;
    runtime.set_round_runner(Arc::new(CraftedRound {
        wait_for_cancel: true,
        hold_bytes: 600 << 20,
        ..CraftedRound::new(Craft::Stub)
    }));
    let err = tokio::time::timeout(Duration::from_secs(20), runtime.train_now())
        .await
        .expect("the cap stops the round")
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::Loop(LoopError::MemoryCap { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("memory_cap_mb"), "{err}");
    assert!(runtime.store().list_adapters().await.unwrap().is_empty());
    assert_eq!(runtime.loop_metrics().rounds_failed, 1);
}

#[tokio::test]
async fn the_isdd_alarm_rejects_a_candidate_without_evaluating_it() {
    let mut ws = Workspace::new(60);
    ws.config.learn = Some(ws.learn_config(2));
    let (runtime, loader) = scripted(&ws).await;
    runtime.set_round_runner(Arc::new(CraftedRound {
        steps: vec![step(1, 1.0, 0.0, 1.0), step(2, 0.6, 0.4, 1.1)],
        ..CraftedRound::new(Craft::Stub)
    }));
    let report = runtime.train_now().await.unwrap();
    let GateVerdict::Reject { reason } = &report.verdict else {
        panic!("promoted despite the alarm: {report:?}");
    };
    assert!(reason.contains("ISDD alarm at step 2"), "{reason}");
    assert_eq!((report.candidate_eval, report.incumbent_eval), (None, None));
    // Only the base model was ever loaded: the candidate was not even evaluated.
    assert_eq!(loader.loads.load(Ordering::SeqCst), 1);
    let record = runtime
        .store()
        .get_adapter(report.candidate)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, AdapterStatus::Rejected);
    assert_eq!(record.status_reason.as_deref(), Some(reason.as_str()));
    assert_eq!(runtime.agent().policy().current().adapter_version(), None);
}

#[tokio::test]
async fn a_warm_start_candidate_is_judged_by_its_evaluation_not_the_isdd_alarm() {
    let mut ws = Workspace::new(60);
    ws.config.learn = Some(ws.learn_config(2));
    let (runtime, loader) = scripted(&ws).await;
    // The alarming steps of the test above, from a batch of demonstrations only: its ratios
    // measure how far it imitated, and the gate evaluates it instead.
    let batch = |demonstrations: usize| {
        serde_json::from_value::<searchloop_learn::RoundSummary>(serde_json::json!({
            "round": 0, "parent": null, "steps": 2, "trained_sequences": 4,
            "logprob_gap": null, "logprob_gap_max": null, "rollout_episodes": 0,
            "rollout_tokens": 0, "rollout_seconds": 0.0, "train_seconds": 1.0,
            "trained_tokens": 100, "threads": 1,
            "batch": {
                "sequences": 4, "replay_sequences": 4 - demonstrations,
                "feedback_sequences": 0, "demonstration_sequences": demonstrations,
                "groups": 4, "zero_std_groups": 0, "zero_std_frac": 0.0, "reward_mean": 1.0,
                "reward_std": 0.0, "response_len_mean": 5.0, "sequence_len_mean": 25.0,
                "tool_calls_mean": 1.0, "temperature_mean": 0.7, "skipped": {}
            }
        }))
        .unwrap()
    };
    let alarming = vec![step(1, 1.0, 0.0, 1.0), step(2, 0.6, 0.4, 1.1)];
    runtime.set_round_runner(Arc::new(CraftedRound {
        steps: alarming.clone(),
        summary: Some(batch(4)),
        ..CraftedRound::new(Craft::Stub)
    }));
    let report = runtime.train_now().await.unwrap();
    assert!(
        report.candidate_eval.is_some() && report.incumbent_eval.is_some(),
        "{report:?}"
    );
    if let GateVerdict::Reject { reason } = &report.verdict {
        assert!(!reason.contains("ISDD"), "{reason}");
    }
    assert_eq!(
        loader.loads.load(Ordering::SeqCst),
        2,
        "the candidate was loaded"
    );

    // One sampled sequence among them and the alarm judges again.
    runtime.set_round_runner(Arc::new(CraftedRound {
        steps: alarming,
        summary: Some(batch(3)),
        ..CraftedRound::new(Craft::Stub)
    }));
    let report = runtime.train_now().await.unwrap();
    let GateVerdict::Reject { reason } = &report.verdict else {
        panic!("promoted despite the alarm: {report:?}");
    };
    assert!(reason.contains("ISDD alarm at step 2"), "{reason}");
}

/// A fleet's store on PostgreSQL (a schema of its own in `SEARCHLOOP_PG_URL`'s database): one
/// process trains at a time; a second one is refused while the first holds the trainer lease,
/// and takes over once the first gives it up or dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_trains_per_postgres_store_and_another_takes_over() {
    let schema = PgSchema::create("runtime_test").await;
    let mut ws = Workspace::new(60);
    ws.config.store.url = schema.url.clone();
    ws.config.learn = Some(ws.learn_config(2));
    let start = || async {
        let (runtime, _) = scripted(&ws).await;
        runtime.set_round_runner(Arc::new(CraftedRound::new(Craft::Stub)));
        runtime
    };
    let (first, second) = (start().await, start().await);

    first.train_now().await.unwrap();
    let refused = second.train_now().await;
    assert!(
        matches!(
            refused,
            Err(RuntimeError::Loop(LoopError::TrainerElsewhere))
        ),
        "{refused:?}"
    );
    // The trainer keeps its lease from round to round.
    first.train_now().await.unwrap();

    // A trainer that stops gives the lease up, and the other one trains at once.
    first.learning().release_trainer_lease().await.unwrap();
    second.train_now().await.unwrap();
    assert!(matches!(
        first.train_now().await,
        Err(RuntimeError::Loop(LoopError::TrainerElsewhere))
    ));

    // A trainer that dies without a word: its database session ends with it, and the database
    // releases the lease (dropping the process's runtime closes the session, as a kill does).
    drop(second);
    let started = Instant::now();
    loop {
        match first.train_now().await {
            Ok(_) => break,
            Err(RuntimeError::Loop(LoopError::TrainerElsewhere)) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the dead trainer's lease was never released"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(first.store().list_adapters().await.unwrap().len(), 4);
    first.store().close().await;
    drop(first);
    schema.drop().await;
}

/// A serving replica follows the registry: what the fleet's trainer promotes (in another
/// process, on the same PostgreSQL store) is served by the replica within a few polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_what_the_trainer_promotes() {
    let schema = PgSchema::create("runtime_test").await;
    let mut ws = Workspace::new(60);
    ws.config.store.url = schema.url.clone();
    ws.config.learn = Some(ws.learn_config(2));
    let (trainer, _) = scripted(&ws).await;
    trainer.set_round_runner(Arc::new(CraftedRound::new(Craft::Stub)));
    let (replica, _) = scripted(&ws).await;
    assert_eq!(replica.loop_metrics().serving_version, None);

    let report = trainer.train_now().await.unwrap();
    assert!(matches!(report.verdict, GateVerdict::Promote), "{report:?}");
    let promoted = Some(report.candidate);

    // A replica that cannot load the promoted adapter keeps serving its own and says why.
    let record = trainer.store().promoted().await.unwrap().unwrap();
    let merged = std::path::Path::new(&record.path).join(searchloop_loop::adapters::MERGED_FILE);
    let away = merged.with_extension("away");
    std::fs::rename(&merged, &away).unwrap();
    assert!(replica.sync_adapters().await.is_err());
    let metrics = replica.loop_metrics();
    assert_eq!(metrics.serving_version, None);
    assert_eq!(metrics.registry_sync_failures, 1);
    let reason = metrics.registry_sync_error.unwrap();
    assert!(reason.contains("missing"), "{reason}");
    replica.ask(&ws.questions[0].question).await.unwrap();
    std::fs::rename(&away, &merged).unwrap();

    replica
        .learning()
        .follow_registry(Duration::from_millis(100));
    wait_for(&replica, Duration::from_secs(10), |m| {
        m.serving_version == promoted
    })
    .await;
    // New episodes on the replica are served, and recorded, by the promoted adapter.
    let t = replica.ask(&ws.questions[0].question).await.unwrap();
    assert_eq!(t.adapter_version, promoted);
    assert_eq!(replica.loop_metrics().registry_sync_error, None);

    // A rollback on the trainer reaches the replica too.
    trainer.rollback(None).await.unwrap();
    wait_for(&replica, Duration::from_secs(10), |m| {
        m.serving_version.is_none()
    })
    .await;

    // With a poll far away, the registry's notification alone brings the next promotion.
    replica
        .learning()
        .follow_registry(Duration::from_secs(3600));
    // The new follower listens once it has started.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = trainer.train_now().await.unwrap();
    assert!(matches!(next.verdict, GateVerdict::Promote), "{next:?}");
    wait_for(&replica, Duration::from_secs(5), |m| {
        m.serving_version == Some(next.candidate)
    })
    .await;
    drop((trainer, replica));
    schema.drop().await;
}
