//! Latency of the HTTP search tool under 16 concurrent callers, through `DynTool::call_json`,
//! against a local axum server answering a SearxNG-style JSON page of 10 results; beside it,
//! the same requests made directly with reqwest (GET and read the body, no tool), and the
//! server's own handler time, so the tool's overhead shows.
//!
//! `cargo bench -p searchloop-search-http --bench http` prints the figures. Without `--bench`
//! (as `cargo test --benches` runs it) it makes a few calls only.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use axum::{Json, Router, extract::Query, routing::get};
use searchloop_core::DynTool;
use searchloop_search_http::{HttpSearchConfig, HttpSearchTool};
use serde_json::{Value, json};

/// Concurrent callers.
const CALLERS: usize = 16;

/// Handler times in nanoseconds, summed, and the number of requests.
static HANDLER_NANOS: AtomicUsize = AtomicUsize::new(0);
static HANDLER_CALLS: AtomicUsize = AtomicUsize::new(0);

async fn search(Query(params): Query<Vec<(String, String)>>) -> Json<Value> {
    let started = Instant::now();
    let query = params
        .into_iter()
        .find(|(k, _)| k == "q")
        .map(|(_, v)| v)
        .unwrap_or_default();
    let results: Vec<Value> = (1..=10)
        .map(|n| {
            json!({
                "title": format!("Result {n} for {query}"),
                "content": format!("A paragraph about {query}, result number {n}, long enough to be cut to the snippet limit of the tool's default configuration, which keeps observations short for a small model."),
                "url": format!("https://shop.example/products/{n}"),
                "engine": "bench",
                "score": 1.0 / n as f64,
            })
        })
        .collect();
    let body = json!({"query": query, "number_of_results": 10, "results": results});
    HANDLER_NANOS.fetch_add(started.elapsed().as_nanos() as usize, Ordering::Relaxed);
    HANDLER_CALLS.fetch_add(1, Ordering::Relaxed);
    Json(body)
}

/// Calls `call` `per_caller` times on each of `callers` tasks; returns the sorted latencies
/// and the wall time.
async fn measure<F, Fut>(
    callers: usize,
    per_caller: usize,
    call: F,
) -> Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let call = Arc::new(call);
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(callers * per_caller)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let call = call.clone();
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut own = Vec::with_capacity(per_caller);
            for n in 0..per_caller {
                let call_started = Instant::now();
                call(caller * per_caller + n).await?;
                own.push(call_started.elapsed());
            }
            latencies
                .lock()
                .map_err(|_| anyhow::anyhow!("latency list poisoned"))?
                .extend(own);
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let wall = started.elapsed();
    let mut latencies = std::mem::take(
        &mut *latencies
            .lock()
            .map_err(|_| anyhow::anyhow!("latency list poisoned"))?,
    );
    latencies.sort_unstable();
    Ok((latencies, wall))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(label: &str, latencies: &[Duration], wall: Duration) -> Duration {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    let p50 = percentile(latencies, 0.5);
    println!(
        "  {label:<28} p50 {:>7.3} ms  p99 {:>7.3} ms  mean {:>7.3} ms  {:>6.0} calls/s",
        ms(p50),
        ms(percentile(latencies, 0.99)),
        ms(mean),
        latencies.len() as f64 / wall.as_secs_f64()
    );
    p50
}

#[tokio::main]
async fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let per_caller = if full { 500 } else { 2 };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        axum::serve(listener, Router::new().route("/search", get(search))).await
    });

    let config = HttpSearchConfig::from_toml_str(&format!(
        r#"
        name = "web"
        description = "Bench search."
        url = "http://{addr}/search?format=json&q={{query}}"
        [results]
        list = "/results"
        title = "/title"
        snippet = "/content"
        url = "/url"
        [limits]
        max_concurrent_requests = {CALLERS}
        [security]
        allowed_hosts = ["127.0.0.1"]
        allow_private = true
        "#
    ))?;
    let tool = Arc::new(HttpSearchTool::new(config)?);
    let raw = reqwest::Client::builder().no_proxy().build()?;

    let query = |i: usize| format!("black leather tote {}", i % 97);
    let direct = {
        let raw = raw.clone();
        move |i: usize| {
            let raw = raw.clone();
            async move {
                let url = format!(
                    "http://{addr}/search?format=json&q={}",
                    query(i).replace(' ', "+")
                );
                raw.get(url)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                anyhow::Ok(())
            }
        }
    };
    let through_tool = {
        let tool = tool.clone();
        move |i: usize| {
            let tool = tool.clone();
            async move {
                tool.call_json(json!({"query": query(i)}))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                anyhow::Ok(())
            }
        }
    };

    // Warm-up: connections opened on both clients.
    measure(CALLERS, 2, direct.clone()).await?;
    measure(CALLERS, 2, through_tool.clone()).await?;

    // 16 callers is the figure asked for; one caller shows the overhead without CPU contention
    // (client, server and tool share the machine's cores).
    for callers in [CALLERS, 1] {
        HANDLER_NANOS.store(0, Ordering::Relaxed);
        HANDLER_CALLS.store(0, Ordering::Relaxed);
        let calls = if callers == 1 {
            per_caller * 4
        } else {
            per_caller
        };
        println!("HTTP search, {callers} concurrent caller(s), {calls} calls each:");
        let (latencies, wall) = measure(callers, calls, direct.clone()).await?;
        let raw_p50 = report("direct reqwest GET (no tool)", &latencies, wall);
        let (latencies, wall) = measure(callers, calls, through_tool.clone()).await?;
        let tool_p50 = report("HttpSearchTool::call_json", &latencies, wall);
        let handler_mean_us = HANDLER_NANOS.load(Ordering::Relaxed) as f64
            / HANDLER_CALLS.load(Ordering::Relaxed).max(1) as f64
            / 1e3;
        println!("  server handler time, mean     {handler_mean_us:.1} µs");
        println!(
            "  tool overhead over direct GET, p50: {:.3} ms",
            (tool_p50.as_secs_f64() - raw_p50.as_secs_f64()) * 1e3
        );
    }
    Ok(())
}
