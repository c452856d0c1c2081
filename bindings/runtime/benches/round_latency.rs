//! Serving latency while a training round runs in the background, on the embedded model.
//!
//! Runs the same held-out episodes (same questions, same seeds) three ways and prints the
//! latency of each: alone; while a real training round (searchloop-learn: replay groups sampled
//! through the serving agent, then GRPO + SAPO training on the round's thread budget) runs in
//! the same process; and alone again. The round's own phases are timed too.
//!
//! `cargo bench -p searchloop-runtime --bench round_latency [-- --episodes N --threads T]`

// A benchmark reports by panicking on a broken setup, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::Workspace;
use searchloop_demo::retail::Split;
use searchloop_learn::GroupSource;
use searchloop_runtime::Runtime;

/// When each of `count` held-out episodes, run one after the other, started and how many
/// seconds it took.
async fn episodes(runtime: &Runtime, ws: &Workspace, count: usize) -> Vec<(Instant, f64)> {
    let questions: Vec<_> = ws
        .questions
        .iter()
        .filter(|q| q.split == Split::Heldout)
        .take(count)
        .collect();
    let mut seconds = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let started = Instant::now();
        runtime.run(ws.request(q, i as u64)).await.unwrap();
        seconds.push((started, started.elapsed().as_secs_f64()));
    }
    seconds
}

fn latencies(timed: &[(Instant, f64)]) -> Vec<f64> {
    timed.iter().map(|(_, s)| *s).collect()
}

/// Peak resident memory of this process in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn summary(name: &str, seconds: &[f64]) {
    if seconds.is_empty() {
        println!("{name:<28} n=0");
        return;
    }
    let mut sorted = seconds.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
    println!(
        "{name:<28} n={:<3} mean {mean:6.2} s  median {:6.2} s  max {:6.2} s",
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().unwrap())
}

fn main() {
    let count = arg("--episodes", 6);
    let threads = arg("--threads", 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut ws = Workspace::new(600);
        let mut learn = ws.learn_config(1);
        learn.round.source = GroupSource::Replay;
        learn.round.prompts = Some(ws.questions_file());
        learn.round.group_size = 2;
        learn.round.prompts_per_round = 2;
        learn.round.threads = threads;
        // One sequence per forward pass and an optimizer step every two: the round's memory
        // stays small, and the memory cap can stop it between steps.
        learn.round.trainer.mini_batch_size = 2;
        learn.round.trainer.micro_batch_size = 1;
        // One sequence per micro-batch, as when these figures were first recorded.
        learn.round.trainer.micro_batch_tokens = 0;
        learn.round.trainer.advantages.skip_zero_std_groups = false;
        ws.config.learn = Some(learn);
        let runtime = Arc::new(Runtime::start(ws.config.clone()).await.unwrap());
        println!(
            "{count} held-out episodes per phase; round: 2 prompts x 2 replay episodes, trainer on \
             {threads} thread(s), {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        // One episode first, so every phase runs on a warm model.
        episodes(&runtime, &ws, 1).await;
        let before = episodes(&runtime, &ws, count).await;

        let round_started = Instant::now();
        let round = {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                let report = runtime.train_now().await;
                (report, round_started.elapsed())
            })
        };
        // Serve until the round ends, repeating the same episodes.
        let mut during = Vec::new();
        while !round.is_finished() {
            during.extend(episodes(&runtime, &ws, count).await);
        }
        let (report, round_time) = round.await.unwrap();
        let after = episodes(&runtime, &ws, count).await;

        summary("alone, before the round", &latencies(&before));
        summary("during the round", &latencies(&during));
        if let Ok(report) = &report {
            // The round's summary says how long its replay sampling took; episodes that started
            // before then competed with replay episodes, the rest with training.
            let record = runtime.store().get_adapter(report.candidate).await.unwrap();
            let rollout = record
                .and_then(|r| r.metrics_summary.get("rollout_seconds")?.as_f64())
                .unwrap_or(0.0);
            let split = round_started + Duration::from_secs_f64(rollout);
            let (replay, training): (Vec<_>, Vec<_>) =
                during.iter().partition(|(started, _)| *started < split);
            summary("  while replay sampled", &latencies(&replay));
            summary("  while the trainer ran", &latencies(&training));
            println!("replay sampling took {rollout:.1} s");
        }
        summary("alone, after the round", &latencies(&after));
        println!("peak RSS {} MiB", peak_rss_mib());
        match report {
            Ok(report) => println!(
                "round: {:.1} s in all: training part {:.1} s (replay sampling + {} optimizer \
                 steps + writing), gate {:.1} s; verdict {:?}",
                round_time.as_secs_f64(),
                report.train_ms as f64 / 1e3,
                report.train.steps.len(),
                report.gate_ms as f64 / 1e3,
                report.verdict
            ),
            Err(e) => println!("round failed after {round_time:?}: {e}"),
        }
        let metrics = runtime.loop_metrics();
        println!("loop metrics: {metrics:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
