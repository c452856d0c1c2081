//! Latency of the inventory tool under 16 concurrent callers, through `DynTool::call_json`, on
//! the retail inventory seeded from the generator's default data set (2,400 products, 8
//! stores): SQLite, then PostgreSQL (`SEARCHLOOP_PG_URL`, in a throwaway schema).
//!
//! `cargo bench -p searchloop-search-sql --bench sql` prints p50/p99/mean per query and the
//! calls per second. Without `--bench` (as `cargo test --benches` runs it) it makes a few calls
//! only, so CI checks that it works without paying for the measurement.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use searchloop_core::DynTool;
use searchloop_demo::retail::{GeneratorConfig, RetailDataset, generate};
use searchloop_demo::seed_retail_inventory;
use searchloop_search_sql::{InventoryConfig, InventoryTool};
use serde_json::{Value, json};
use sqlx::{Connection, postgres::PgConnection};

/// Concurrent callers.
const CALLERS: usize = 16;

/// The three query shapes measured: a point lookup, a three-table join by name, and a
/// filtered aggregate over a category.
fn workload(data: &RetailDataset, i: usize) -> (&'static str, Value) {
    let product = &data.products[(i * 7919) % data.products.len()];
    let store = &data.stores[i % data.stores.len()];
    match i % 3 {
        0 => (
            "stock_by_sku",
            json!({"query": "stock_by_sku", "sku": product.sku}),
        ),
        1 => (
            "stock_in_store",
            json!({"query": "stock_in_store", "product_name": product.name, "city": store.city}),
        ),
        _ => (
            "find_products",
            json!({
                "query": "find_products",
                "category": product.category,
                "max_price": 150.0,
                "in_stock": true,
            }),
        ),
    }
}

/// Runs `calls_per_caller` calls on each of `callers` tasks; returns each call's query name and
/// latency, and the wall time.
async fn measure(
    tool: Arc<InventoryTool>,
    data: Arc<RetailDataset>,
    callers: usize,
    calls_per_caller: usize,
) -> Result<(Vec<(&'static str, Duration)>, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let tool = tool.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(calls_per_caller);
            for n in 0..calls_per_caller {
                let (name, args) = workload(&data, caller * calls_per_caller + n);
                let call_started = Instant::now();
                tool.call_json(args)
                    .await
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                latencies.push((name, call_started.elapsed()));
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok((latencies, started.elapsed()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(backend: &str, callers: usize, latencies: &[(&'static str, Duration)], wall: Duration) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{backend}: {} calls by {callers} caller(s) in {:.2} s: {:.0} calls/s",
        latencies.len(),
        wall.as_secs_f64(),
        latencies.len() as f64 / wall.as_secs_f64()
    );
    for name in ["stock_by_sku", "stock_in_store", "find_products", "all"] {
        let mut of_query: Vec<Duration> = latencies
            .iter()
            .filter(|(n, _)| name == "all" || *n == name)
            .map(|(_, d)| *d)
            .collect();
        of_query.sort_unstable();
        let mean = of_query.iter().sum::<Duration>() / of_query.len() as u32;
        println!(
            "  {name:<15} p50 {:>7.3} ms  p99 {:>7.3} ms  mean {:>7.3} ms",
            ms(percentile(&of_query, 0.5)),
            ms(percentile(&of_query, 0.99)),
            ms(mean)
        );
    }
}

async fn run_backend(
    backend: &str,
    database: &str,
    data: Arc<RetailDataset>,
    calls_per_caller: usize,
) -> Result<()> {
    let mut config = InventoryConfig::from_toml_str(searchloop_demo::INVENTORY_CONFIG_TOML)?;
    config.database = database.to_string();
    // One connection per caller, so the figures are the database's and the tool's, not a queue.
    config.limits.max_connections = CALLERS as u32;
    let tool = Arc::new(InventoryTool::connect(config).await?);
    // Warm-up: every connection opened and every statement prepared once.
    measure(tool.clone(), data.clone(), CALLERS, 3).await?;
    let (latencies, wall) = measure(tool.clone(), data.clone(), CALLERS, calls_per_caller).await?;
    report(backend, CALLERS, &latencies, wall);
    // One caller: the latency without contention for the machine's cores.
    let (latencies, wall) = measure(tool.clone(), data, 1, calls_per_caller * 4).await?;
    report(backend, 1, &latencies, wall);
    tool.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let calls_per_caller = if full { 300 } else { 2 };
    let data = Arc::new(generate(&GeneratorConfig::default()));
    let dir = tempfile::tempdir()?;
    data.write_to(dir.path())?;

    let sqlite = format!("sqlite://{}", dir.path().join("inventory.db").display());
    seed_retail_inventory(&sqlite, dir.path()).await?;
    run_backend("SQLite", &sqlite, data.clone(), calls_per_caller).await?;

    let server = std::env::var("SEARCHLOOP_PG_URL").context(
        "SEARCHLOOP_PG_URL is not set: start a server with `eval \"$(scripts/postgres.sh start)\"`",
    )?;
    let schema = format!("search_sql_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&server).await?;
    for statement in [
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        format!("CREATE SCHEMA {schema}"),
    ] {
        sqlx::query(&statement).execute(&mut admin).await?;
    }
    let mut url = url::Url::parse(&server)?;
    url.query_pairs_mut()
        .append_pair("options", &format!("-c search_path={schema}"));
    let result = async {
        seed_retail_inventory(url.as_str(), dir.path()).await?;
        run_backend("PostgreSQL", url.as_str(), data, calls_per_caller).await
    }
    .await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await?;
    result
}
