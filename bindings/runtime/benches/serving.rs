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
//!   them (requests per second and median latency);
//! - a steady load: `--asked` other held-out questions, first through one asker, then through
//!   `--askers` askers that each ask the next question as soon as their previous answer is in.
//!   Question `i` has the same seed in both, so both do the same episodes, each pass on an
//!   engine started for it (its prefix cache holding only the system prompt), and the ratio
//!   of their rates is what concurrency buys on the same work. The burst above ends when its
//!   longest episode ends; a steady load is how a server is used.
//!
//! `cargo bench -p searchloop-runtime --bench serving [-- --episodes 12 --prompts 4 --group 8
//! --askers 8 --asked 32 --engines candle,mistralrs,llama-server:1,llama-server:8
//! --llama-server PATH]`
//!
//! The `llama-server:P` engines need the binary `scripts/llama-server.sh` builds.

// A benchmark reports by panicking on a broken setup, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
mod peer;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

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
    /// The steady load through one asker: requests per second, and tokens generated.
    steady_one: (f64, usize),
    /// The steady load through the askers: requests per second, median latency, and tokens
    /// generated.
    steady_many: (f64, f64, usize),
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

/// Asks `questions` through `askers` askers, each taking the next question as soon as its
/// previous answer is in (question `i` with seed `seed + i`, whoever asks it), and returns the
/// wall time, each request's latency and the tokens generated. With as many askers as
/// questions, every question is asked at once.
async fn ask_through(
    runtime: &Runtime,
    ws: &Workspace,
    questions: &[&Question],
    askers: usize,
    seed: u64,
) -> (f64, Vec<f64>, usize) {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let asker = |_| async {
        let mut asked = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(q) = questions.get(i) else {
                return asked;
            };
            let t = Instant::now();
            let trajectory = runtime.run(ws.request(q, seed + i as u64)).await.unwrap();
            asked.push((
                t.elapsed().as_secs_f64(),
                trajectory.tokens_of(SegmentKind::Model).len(),
            ));
        }
    };
    let results: Vec<(f64, usize)> = join_all((0..askers).map(asker))
        .await
        .into_iter()
        .flatten()
        .collect();
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

/// Starts `served` with `ws`'s config and runs one episode of `warm` on it, so that every phase
/// runs on a warm model with the system prompt cached. The peer's server, when there is one,
/// must live as long as the runtime serves through it.
async fn start(
    served: &Served,
    ws: &Workspace,
    warm: &Question,
) -> (Runtime, Option<peer::LlamaServer>) {
    let mut server = None;
    let loader: Arc<dyn PolicyLoader> = match served {
        Served::Own(_) => Arc::new(ModelLoader::new(ws.config.model.clone())),
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
    runtime.run(ws.request(warm, 0)).await.unwrap();
    (runtime, server)
}

/// How much each phase asks, from the command line.
#[derive(Clone, Copy)]
struct Sizes {
    episodes: usize,
    prompts: usize,
    group: usize,
    askers: usize,
    asked: usize,
}

async fn measure(
    served: &Served,
    name: &str,
    sizes: Sizes,
    reference: &[Trajectory],
) -> (EngineFigures, Vec<Trajectory>) {
    let Sizes {
        episodes,
        prompts,
        group,
        askers,
        asked,
    } = sizes;
    let mut ws = Workspace::new(600);
    if let Served::Own(engine) = served {
        ws.config.model.engine = *engine;
    }
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
    let (runtime, server) = start(served, &ws, heldout[0]).await;

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
    let (wall, _, replay_tokens) =
        ask_through(&runtime, &ws, &group_questions, group_questions.len(), 1000).await;
    let replay_episodes_per_s = group_questions.len() as f64 / wall;
    println!(
        "{name}: replay group {prompts} x {group}: {wall:.1} s, {replay_episodes_per_s:.3} episodes/s, \
         {replay_tokens} tokens generated"
    );

    let burst: Vec<&Question> = heldout
        .iter()
        .skip(episodes)
        .take(askers)
        .copied()
        .collect();
    let (wall, mut latencies, _) = ask_through(&runtime, &ws, &burst, burst.len(), 2000).await;
    let askers_per_s = burst.len() as f64 / wall;
    let askers_p50_s = median(&mut latencies);
    println!(
        "{name}: {askers} concurrent askers: {askers_per_s:.3} req/s, p50 {askers_p50_s:.2} s"
    );

    let load: Vec<&Question> = heldout
        .iter()
        .skip(episodes + askers)
        .take(asked)
        .copied()
        .collect();
    assert_eq!(
        load.len(),
        asked,
        "the data set has too few held-out questions for --asked {asked}"
    );
    // Each pass runs on an engine of its own: the second pass asks the first one's questions
    // with the first one's seeds, so on the same engine it would find their episodes among the
    // cached prefixes and skip most of their prefill.
    let (wall, _, one_tokens) = {
        let (fresh, _server) = start(served, &ws, heldout[0]).await;
        ask_through(&fresh, &ws, &load, 1, 3000).await
    };
    let one_per_s = load.len() as f64 / wall;
    println!(
        "{name}: steady load, {asked} questions through one asker: {one_per_s:.3} req/s, \
         {one_tokens} tokens generated"
    );
    let (wall, mut latencies, many_tokens) = {
        let (fresh, _server) = start(served, &ws, heldout[0]).await;
        ask_through(&fresh, &ws, &load, askers, 3000).await
    };
    let many_per_s = load.len() as f64 / wall;
    let many_p50_s = median(&mut latencies);
    println!(
        "{name}: steady load, the same {asked} questions through {askers} askers: \
         {many_per_s:.3} req/s, p50 {many_p50_s:.2} s, {many_tokens} tokens generated; \
         {:.2}x one asker's rate",
        many_per_s / one_per_s
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
            steady_one: (one_per_s, one_tokens),
            steady_many: (many_per_s, many_p50_s, many_tokens),
            replayed_single_mean_s,
        },
        trajectories,
    )
}

fn main() {
    let sizes = Sizes {
        episodes: arg("--episodes", "12").parse().unwrap(),
        prompts: arg("--prompts", "4").parse().unwrap(),
        group: arg("--group", "8").parse().unwrap(),
        askers: arg("--askers", "8").parse().unwrap(),
        asked: arg("--asked", "32").parse().unwrap(),
    };
    let Sizes {
        prompts,
        group,
        askers,
        ..
    } = sizes;
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
            let (figures, trajectories) =
                runtime.block_on(measure(&served, name, sizes, &reference));
            if reference.is_empty() {
                reference = trajectories;
            }
            figures
        })
        .collect();
    println!(
        "\n| engine | single episode s | replay {prompts}x{group} episodes/s | tokens | {askers} askers req/s | p50 s | steady, 1 asker req/s | tokens | steady, {askers} askers req/s | p50 s | tokens | {askers} against 1 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &figures {
        let (one_per_s, one_tokens) = f.steady_one;
        let (many_per_s, many_p50_s, many_tokens) = f.steady_many;
        println!(
            "| {} | {:.2} | {:.3} | {} | {:.3} | {:.2} | {one_per_s:.3} | {one_tokens} | {many_per_s:.3} | {many_p50_s:.2} | {many_tokens} | {:.2}x |",
            f.engine,
            f.single_mean_s,
            f.replay_episodes_per_s,
            f.replay_tokens,
            f.askers_per_s,
            f.askers_p50_s,
            many_per_s / one_per_s
        );
    }
    if let [ours, peers @ ..] = &figures[..] {
        for peer in peers {
            println!(
                "{} against {}: single episode latency {:.2}x lower, replay {:.2}x the \
                 episodes/s, askers {:.2}x the req/s, steady load {:.2}x the req/s with one \
                 asker and {:.2}x with {askers}",
                ours.engine,
                peer.engine,
                peer.single_mean_s / ours.single_mean_s,
                ours.replay_episodes_per_s / peer.replay_episodes_per_s,
                ours.askers_per_s / peer.askers_per_s,
                ours.steady_one.0 / peer.steady_one.0,
                ours.steady_many.0 / peer.steady_many.0
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
