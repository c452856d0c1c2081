//! Throughput and latency of the HTTP server: concurrent clients send `POST /v1/ask` and the
//! benchmark prints requests/s and latency percentiles.
//!
//! - `scripted`: the model is a scripted policy of fixed cost per turn, so the figures are the
//!   server's and the store's own overhead. The same episodes run in-process (`Agent::run`,
//!   same concurrency) as the baseline, with the store syncing every commit (`full`, the
//!   default) and without (`normal`).
//! - `model`: the embedded model with a catalog tool, sequential and 4 at a time.
//! - `fleet`: the scripted policy served by 1, then 3 replicas (each its own server, store
//!   connection pool and agent) on one PostgreSQL store (`SEARCHLOOP_PG_URL`, a fresh schema per
//!   run), the clients spread over the replicas: whether the shared store limits a fleet.
//!
//! ```text
//! cargo run --release -p searchloop-server --example http_bench -- [scripted|model|both|fleet]
//!     [--requests N] [--concurrency C] [--turn-ms MS] [--model-requests N]
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use searchloop_core::EpisodeRequest;
use searchloop_server::{AppState, ServerConfig, api::AskResponse};
use searchloop_store_sql::{SqliteSync, StoreOptions};
use tokio::sync::oneshot;

/// Command-line settings.
struct Settings {
    mode: String,
    requests: usize,
    concurrency: usize,
    turn_ms: u64,
    model_requests: usize,
}

fn settings() -> anyhow::Result<Settings> {
    let mut s = Settings {
        mode: "scripted".into(),
        requests: 3000,
        concurrency: 32,
        turn_ms: 5,
        model_requests: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            let v = args
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name}: '{v}' is not a number"))
        };
        match arg.as_str() {
            "scripted" | "model" | "both" | "fleet" => s.mode = arg,
            "--requests" => s.requests = value("--requests")?,
            "--concurrency" => s.concurrency = value("--concurrency")?,
            "--turn-ms" => s.turn_ms = value("--turn-ms")? as u64,
            "--model-requests" => s.model_requests = value("--model-requests")?,
            other => bail!("unknown argument '{other}' (see the example's doc comment)"),
        }
    }
    ensure!(
        s.concurrency > 0 && s.requests >= s.concurrency,
        "need requests >= concurrency > 0"
    );
    Ok(s)
}

/// Latencies of one run, and its wall time.
struct Run {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Run {
    fn print(&self, label: &str) {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let pct = |p: f64| {
            let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i].as_secs_f64() * 1e3
        };
        println!(
            "{label:<44} {:>6} req {:>9.2} req/s   p50 {:>8.2} ms   p90 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms",
            sorted.len(),
            sorted.len() as f64 / self.wall.as_secs_f64(),
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(1.0),
        );
    }
}

/// Runs `requests` calls of `call` from `concurrency` workers, each call timed.
async fn drive<F, Fut>(requests: usize, concurrency: usize, call: F) -> anyhow::Result<Run>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let workers = (0..concurrency).map(|w| {
        let call = call.clone();
        let share = requests / concurrency + usize::from(w < requests % concurrency);
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(share);
            for i in 0..share {
                let t = Instant::now();
                call(w, i).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        })
    });
    let mut latencies = Vec::with_capacity(requests);
    for worker in futures::future::join_all(workers).await {
        latencies.extend(worker??);
    }
    Ok(Run {
        latencies,
        wall: started.elapsed(),
    })
}

/// Starts a server over `state` on an ephemeral port; returns its base URL and the trigger and
/// task of its shutdown.
async fn start(
    state: AppState,
) -> anyhow::Result<(
    String,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<searchloop_server::Result<()>>,
)> {
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse()?,
        ..ServerConfig::default()
    };
    let listener = searchloop_server::bind(&config).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        searchloop_server::serve(listener, state, &config, async {
            let _ = rx.await;
        })
        .await
    });
    Ok((base, tx, task))
}

/// `POST /v1/ask` from one worker's own client, failing on anything but a 200 answer.
async fn ask(client: &reqwest::Client, url: &str, question: String) -> anyhow::Result<AskResponse> {
    let response = client
        .post(url)
        .json(&serde_json::json!({"question": question}))
        .send()
        .await?;
    ensure!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    Ok(response.json().await?)
}

async fn scripted(s: &Settings) -> anyhow::Result<()> {
    println!(
        "scripted policy: {} ms per turn, 2 turns + 1 catalog call per episode; {} concurrent clients",
        s.turn_ms, s.concurrency
    );
    for sync in [SqliteSync::Full, SqliteSync::Normal] {
        let dir = tempfile::tempdir()?;
        let options = StoreOptions {
            sqlite_sync: sync,
            ..StoreOptions::default()
        };
        let turn = Duration::from_millis(s.turn_ms);
        let (state, store) = support::scripted_state(dir.path(), turn, options).await;

        let agent_state = state.clone();
        let direct = drive(s.requests, s.concurrency, move |w, i| {
            let state = agent_state.clone();
            async move {
                state
                    .agent()
                    .run(EpisodeRequest::new(format!("Nova Tote {w}-{i}?")))
                    .await?;
                Ok(())
            }
        })
        .await?;

        let (base, stop, task) = start(state).await?;
        let url = format!("{base}/v1/ask");
        let clients: Arc<Vec<reqwest::Client>> =
            Arc::new((0..s.concurrency).map(|_| reqwest::Client::new()).collect());
        // Warm-up: open every client's connection.
        let warm = clients.clone();
        let warm_url = url.clone();
        drive(s.concurrency, s.concurrency, move |w, _| {
            let (clients, url) = (warm.clone(), warm_url.clone());
            async move { ask(&clients[w], &url, "warm-up".into()).await.map(drop) }
        })
        .await?;
        let http = drive(s.requests, s.concurrency, move |w, i| {
            let (clients, url) = (clients.clone(), url.clone());
            async move {
                ask(&clients[w], &url, format!("Nova Tote {w}-{i}?"))
                    .await
                    .map(drop)
            }
        })
        .await?;
        let _ = stop.send(());
        task.await??;
        let stored = store.stats().await?.trajectories as usize;
        ensure!(
            stored == 2 * s.requests + s.concurrency,
            "{stored} episodes stored"
        );
        let sync = format!("{sync:?}").to_lowercase();
        direct.print(&format!("in-process Agent::run, sqlite sync {sync}"));
        http.print(&format!("HTTP POST /v1/ask, sqlite sync {sync}"));
    }
    Ok(())
}

async fn fleet(s: &Settings) -> anyhow::Result<()> {
    println!(
        "scripted policy: {} ms per turn, 2 turns + 1 catalog call per episode; {} concurrent \
         clients spread over the replicas; one PostgreSQL store",
        s.turn_ms, s.concurrency
    );
    for replicas in [1, 3] {
        let schema = searchloop_e2e::PgSchema::create("http_bench").await;
        let turn = Duration::from_millis(s.turn_ms);
        let mut urls = Vec::new();
        let mut servers = Vec::new();
        let mut stores = Vec::new();
        for _ in 0..replicas {
            let (state, store) =
                support::scripted_state_at(&schema.url, turn, StoreOptions::default()).await;
            let (base, stop, task) = start(state).await?;
            urls.push(format!("{base}/v1/ask"));
            servers.push((stop, task));
            stores.push(store);
        }
        let urls = Arc::new(urls);
        let clients: Arc<Vec<reqwest::Client>> =
            Arc::new((0..s.concurrency).map(|_| reqwest::Client::new()).collect());
        let (warm, warm_urls) = (clients.clone(), urls.clone());
        drive(s.concurrency, s.concurrency, move |w, _| {
            let (clients, urls) = (warm.clone(), warm_urls.clone());
            async move {
                ask(&clients[w], &urls[w % urls.len()], "warm-up".into())
                    .await
                    .map(drop)
            }
        })
        .await?;
        let run_urls = urls.clone();
        let http = drive(s.requests, s.concurrency, move |w, i| {
            let (clients, urls) = (clients.clone(), run_urls.clone());
            async move {
                ask(
                    &clients[w],
                    &urls[w % urls.len()],
                    format!("Nova Tote {w}-{i}?"),
                )
                .await
                .map(drop)
            }
        })
        .await?;
        for (stop, task) in servers {
            let _ = stop.send(());
            task.await??;
        }
        let stored = stores[0].stats().await?.trajectories as usize;
        ensure!(
            stored == s.requests + s.concurrency,
            "{stored} episodes stored"
        );
        for store in &stores {
            store.close().await;
        }
        http.print(&format!(
            "HTTP POST /v1/ask, {replicas} replica(s), PostgreSQL"
        ));
        schema.drop().await;
    }
    Ok(())
}

async fn model(s: &Settings) -> anyhow::Result<()> {
    use searchloop_demo::retail::{QuestionKind, Split};
    let dir = tempfile::tempdir()?;
    let (config, dataset) = support::retail_config(dir.path());
    let runtime = Arc::new(searchloop_runtime::Runtime::start(config).await?);
    let questions: Arc<Vec<String>> = Arc::new(
        dataset
            .questions
            .iter()
            .filter(|q| q.kind == QuestionKind::SingleHop && q.split == Split::Heldout)
            .map(|q| q.question.clone())
            .collect(),
    );
    let (base, stop, task) = start(AppState::from_runtime(runtime.clone())).await?;
    let url = format!("{base}/v1/ask");
    println!(
        "embedded model ({}), catalog tool, {} questions per run",
        runtime.agent().policy().current().model_id(),
        s.model_requests
    );
    for concurrency in [1, 4] {
        let (questions, url) = (questions.clone(), url.clone());
        let server_ms = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = server_ms.clone();
        let run = drive(s.model_requests, concurrency, move |w, i| {
            let (questions, url, record) = (questions.clone(), url.clone(), record.clone());
            async move {
                let client = reqwest::Client::new();
                let question = questions[(w * 97 + i) % questions.len()].clone();
                let answer = ask(&client, &url, question).await?;
                println!(
                    "  {:>7.0} ms in the episode, {} turns, {} tool calls, {:?}: {:?}",
                    answer.latency_ms,
                    answer.turns,
                    answer.tool_calls.len(),
                    answer.end,
                    answer.answer.unwrap_or_default()
                );
                if let Ok(mut v) = record.lock() {
                    v.push(answer.latency_ms);
                }
                Ok(())
            }
        })
        .await?;
        run.print(&format!(
            "HTTP POST /v1/ask, real model, {concurrency} at a time"
        ));
        let server_ms = server_ms.lock().map(|v| v.clone()).unwrap_or_default();
        let client_ms: f64 = run.latencies.iter().map(|d| d.as_secs_f64() * 1e3).sum();
        println!(
            "  mean time outside the episode (HTTP, JSON, client): {:.2} ms per request",
            (client_ms - server_ms.iter().sum::<f64>()) / run.latencies.len() as f64
        );
    }
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = settings()?;
    if s.mode == "fleet" {
        return fleet(&s).await;
    }
    if s.mode != "model" {
        scripted(&s).await?;
    }
    if s.mode != "scripted" {
        model(&s).await?;
    }
    Ok(())
}
