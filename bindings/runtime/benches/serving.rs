//! Serving speed of the engines in one run, on the embedded model and the real retail catalog
//! tool: the candle engine (batched decoding, reused prefixes) against mistral.rs (one sequence
//! at a time on the CPU) and llama.cpp's `llama-server` (the same GGUF through its
//! `/completion` endpoint with its prompt cache, at `--parallel 1` and `--parallel 8`), as
//! ratios to the first engine named.
//!
//! For each engine, on a warm model:
//! - single episodes: held-out questions one after another (latency);
//! - a replay group: `--group` episodes of each of `--prompts` train questions, all at once,
//!   as a training round samples them (episodes per second);
//! - concurrent askers: `--askers` held-out questions at once, as the HTTP server would run
//!   them (requests per second and median latency).
//!
//! `cargo bench -p searchloop-runtime --bench serving [-- --episodes 12 --prompts 4 --group 8
//! --askers 8 --engines candle,mistralrs,llama-server:1,llama-server:8 --llama-server PATH]`
//!
//! The `llama-server:P` engines need the binary `scripts/llama-server.sh` builds.

// A benchmark reports by panicking on a broken setup, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
mod peer;

use std::{sync::Arc, time::Instant};

use common::Workspace;
use futures::future::join_all;
use searchloop_core::{SegmentKind, Trajectory};
use searchloop_demo::retail::{Question, Split};
use searchloop_runtime::{ModelLoader, PolicyLoader, Runtime, config::Engine};

/// What one engine measured.
struct EngineFigures {
    engine: String,
    single_mean_s: f64,
    replay_episodes_per_s: f64,
    replay_tokens: usize,
    askers_per_s: f64,
    askers_p50_s: f64,
    /// Mean seconds of the first engine's single episodes replayed token for token (the
    /// `llama-server` engines only).
    replayed_single_mean_s: Option<f64>,
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `questions` at once (question `i` with seed `seed + i`) and returns the wall time, each
/// episode's latency and the tokens generated.
async fn all_at_once(
    runtime: &Runtime,
    ws: &Workspace,
    questions: &[&Question],
    seed: u64,
) -> (f64, Vec<f64>, usize) {
    let started = Instant::now();
    let runs = questions.iter().enumerate().map(|(i, q)| async move {
        let t = Instant::now();
        let trajectory = runtime.run(ws.request(q, seed + i as u64)).await.unwrap();
        (
            t.elapsed().as_secs_f64(),
            trajectory.tokens_of(SegmentKind::Model).len(),
        )
    });
    let results = join_all(runs).await;
    let latencies = results.iter().map(|(s, _)| *s).collect();
    let tokens = results.iter().map(|(_, n)| *n).sum();
    (started.elapsed().as_secs_f64(), latencies, tokens)
}

/// The engines the benchmark can measure.
enum Served {
    /// One of the runtime's own engines.
    Own(Engine),
    /// `llama-server` with this many parallel slots.
    LlamaServer(usize),
}

async fn measure(
    served: &Served,
    name: &str,
    episodes: usize,
    prompts: usize,
    group: usize,
    askers: usize,
    reference: &[Trajectory],
) -> (EngineFigures, Vec<Trajectory>) {
    let mut ws = Workspace::new(600);
    // The peer's server lives as long as the runtime serves through it.
    let mut server = None;
    let loader: Arc<dyn PolicyLoader> = match served {
        Served::Own(engine) => {
            ws.config.model.engine = *engine;
            Arc::new(ModelLoader::new(ws.config.model.clone()))
        }
        Served::LlamaServer(parallel) => {
            let binary = peer::binary(&arg("--llama-server", ""));
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let started =
                peer::LlamaServer::start(&binary, &common::model_path(), threads, *parallel);
            let loader = peer::LlamaServerLoader {
                section: ws.config.model.clone(),
                url: started.url.clone(),
            };
            server = Some(started);
            Arc::new(loader)
        }
    };
    let runtime = Runtime::start_with(ws.config.clone(), Vec::new(), loader)
        .await
        .unwrap();
    let heldout: Vec<&Question> = ws
        .questions
        .iter()
        .filter(|q| q.split == Split::Heldout)
        .collect();
    let train: Vec<&Question> = ws
        .questions
        .iter()
        .filter(|q| q.split == Split::Train)
        .collect();

    // One episode first, so every phase runs on a warm model.
    runtime.run(ws.request(heldout[0], 0)).await.unwrap();

    let mut single = Vec::new();
    let mut trajectories = Vec::new();
    // Tokens of each kind over the single episodes: what an episode asks of a model.
    let (mut prompt, mut generated, mut inserted, mut turns) = (0, 0, 0, 0);
    for (i, q) in heldout.iter().take(episodes).enumerate() {
        let t = Instant::now();
        let trajectory = runtime.run(ws.request(q, i as u64)).await.unwrap();
        single.push(t.elapsed().as_secs_f64());
        let prompted = trajectory.tokens_of(SegmentKind::Prompt).len();
        let sampled = trajectory.tokens_of(SegmentKind::Model).len();
        prompt += prompted;
        generated += sampled;
        inserted += trajectory.tokens.len() - prompted - sampled;
        turns += trajectory.turns;
        trajectories.push(trajectory);
    }
    let single_mean_s = single.iter().sum::<f64>() / single.len() as f64;
    let per_episode = |n: usize| n as f64 / single.len() as f64;
    println!(
        "{name}: single episodes, {} one after another: mean {single_mean_s:.2} s; per episode \
         {:.0} prompt tokens (system prompt and question), {:.1} turns, {:.0} tokens generated, \
         {:.0} inserted between turns (prefills, observations)",
        single.len(),
        per_episode(prompt),
        per_episode(turns as usize),
        per_episode(generated),
        per_episode(inserted)
    );

    let group_questions: Vec<&Question> = train
        .iter()
        .take(prompts)
        .flat_map(|q| std::iter::repeat_n(*q, group))
        .collect();
    let (wall, _, replay_tokens) = all_at_once(&runtime, &ws, &group_questions, 1000).await;
    let replay_episodes_per_s = group_questions.len() as f64 / wall;
    println!(
        "{name}: replay group {prompts} x {group}: {wall:.1} s, {replay_episodes_per_s:.3} episodes/s, \
         {replay_tokens} tokens generated"
    );

    let asked: Vec<&Question> = heldout
        .iter()
        .skip(episodes)
        .take(askers)
        .copied()
        .collect();
    let (wall, mut latencies, _) = all_at_once(&runtime, &ws, &asked, 2000).await;
    let askers_per_s = asked.len() as f64 / wall;
    let askers_p50_s = median(&mut latencies);
    println!(
        "{name}: {askers} concurrent askers: {askers_per_s:.3} req/s, p50 {askers_p50_s:.2} s"
    );
    // The same token work as the first engine's episodes, when this is the peer and there is
    // a first engine: sampling differs between engines, so their own episodes differ in length.
    let replayed_single_mean_s = match (&server, reference.is_empty()) {
        (Some(server), false) => {
            let mut seconds = 0.0;
            for trajectory in reference {
                seconds += server
                    .replay(trajectory, ws.config.agent.sampling.temperature)
                    .await;
            }
            let mean = seconds / reference.len() as f64;
            println!(
                "{name}: the first engine's {} single episodes replayed token for token: mean \
                 {mean:.2} s",
                reference.len()
            );
            Some(mean)
        }
        _ => None,
    };
    (
        EngineFigures {
            engine: name.to_string(),
            single_mean_s,
            replay_episodes_per_s,
            replay_tokens,
            askers_per_s,
            askers_p50_s,
            replayed_single_mean_s,
        },
        trajectories,
    )
}

fn main() {
    let episodes: usize = arg("--episodes", "12").parse().unwrap();
    let prompts: usize = arg("--prompts", "4").parse().unwrap();
    let group: usize = arg("--group", "8").parse().unwrap();
    let askers: usize = arg("--askers", "8").parse().unwrap();
    let engines = arg("--engines", "candle,mistralrs");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "the embedded model (f32 weights for the project's engines), the retail catalog tool, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut reference: Vec<Trajectory> = Vec::new();
    let figures: Vec<EngineFigures> = engines
        .split(',')
        .map(|name| {
            let served = match name {
                "candle" => Served::Own(Engine::Candle),
                "mistralrs" => Served::Own(Engine::MistralRs),
                other => match other.strip_prefix("llama-server:").map(str::parse) {
                    Some(Ok(parallel)) => Served::LlamaServer(parallel),
                    _ => panic!("unknown engine {other}: candle, mistralrs or llama-server:SLOTS"),
                },
            };
            let (figures, trajectories) = runtime.block_on(measure(
                &served, name, episodes, prompts, group, askers, &reference,
            ));
            if reference.is_empty() {
                reference = trajectories;
            }
            figures
        })
        .collect();
    println!(
        "\n| engine | single episode s | replay {prompts}x{group} episodes/s | tokens | {askers} askers req/s | p50 s |"
    );
    println!("|---|---|---|---|---|---|");
    for f in &figures {
        println!(
            "| {} | {:.2} | {:.3} | {} | {:.3} | {:.2} |",
            f.engine,
            f.single_mean_s,
            f.replay_episodes_per_s,
            f.replay_tokens,
            f.askers_per_s,
            f.askers_p50_s
        );
    }
    if let [ours, peers @ ..] = &figures[..] {
        for peer in peers {
            println!(
                "{} against {}: single episode latency {:.2}x lower, replay {:.2}x the \
                 episodes/s, askers {:.2}x the req/s",
                ours.engine,
                peer.engine,
                peer.single_mean_s / ours.single_mean_s,
                ours.replay_episodes_per_s / peer.replay_episodes_per_s,
                ours.askers_per_s / peer.askers_per_s
            );
            if let Some(replayed) = peer.replayed_single_mean_s {
                println!(
                    "{} against {} on the same episodes' token work: single episode latency \
                     {:.2}x lower ({:.2} s against {:.2} s)",
                    ours.engine,
                    peer.engine,
                    replayed / ours.single_mean_s,
                    ours.single_mean_s,
                    replayed
                );
            }
        }
    }
}
