//! Store benchmark on SQLite and PostgreSQL, with realistic trajectories (1-2k tokens, tool
//! calls, three episode rewards): durable inserts per second (one per commit, and a sampled
//! group of eight per commit), feedback writes per second, the time to stream 100k trajectories
//! into training groups, and bytes on disk per trajectory.
//!
//! `cargo bench -p searchloop-store-sql --bench store` with `SEARCHLOOP_PG_URL` set (start a
//! server with `eval "$(scripts/postgres.sh start)"`). `SEARCHLOOP_BENCH_TRAJECTORIES` changes
//! the size of the streamed store (default 100000).

#[path = "../tests/common/sample.rs"]
mod sample;

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sample::Shape;
use searchloop_core::Trajectory;
use searchloop_store_sql::{Cursor, FeedbackInput, GroupQuery, SqliteSync, Store, StoreOptions};
use sqlx::Connection;

/// Distinct trajectory bodies; the stored ones are copies with their own ids and groups, so
/// generating 100k random sequences does not dominate the run.
const TEMPLATES: usize = 512;
const GROUP_SIZE: usize = 8;
const SINGLE_INSERTS: usize = 1000;
const FEEDBACK_WRITES: usize = 2000;

/// One backend's figures.
struct Figures {
    name: String,
    single_per_s: f64,
    grouped_per_s: f64,
    feedback_per_s: f64,
    stream_s: f64,
    streamed: usize,
    bytes_per_trajectory: f64,
}

fn templates() -> Vec<Trajectory> {
    (0..TEMPLATES)
        .map(|i| sample::trajectory(&format!("template-{i}"), &Shape::default()))
        .collect()
}

fn copy(template: &Trajectory, id: String, group: String) -> Trajectory {
    Trajectory {
        id,
        group_id: Some(group),
        ..template.clone()
    }
}

async fn run(
    name: &str,
    location: &str,
    options: StoreOptions,
    templates: &[Trajectory],
    total: usize,
) -> Result<Figures> {
    let store = Store::open_with(location, options.clone()).await?;

    // Grouped inserts fill the store that is then streamed.
    let started = Instant::now();
    let mut n = 0;
    while n < total {
        let group: Vec<Trajectory> = (0..GROUP_SIZE.min(total - n))
            .map(|k| {
                copy(
                    &templates[(n + k) % templates.len()],
                    format!("fill-{}", n + k),
                    format!("g{}", n / GROUP_SIZE),
                )
            })
            .collect();
        n += group.len();
        store.insert_trajectories(&group).await?;
    }
    let grouped_per_s = total as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut stream = store
        .rewarded_groups(GroupQuery {
            since: Cursor::START,
            ..GroupQuery::default()
        })
        .await?;
    let mut streamed = 0;
    while let Some(group) = stream.next().await {
        streamed += group?.members.len();
    }
    let stream_s = started.elapsed().as_secs_f64();
    ensure!(
        streamed == total,
        "streamed {streamed} of {total} trajectories"
    );

    let bytes = if location.starts_with("postgres") {
        store.stats().await?.size_bytes
    } else {
        // Closing checkpoints the WAL into the file, so the file alone is the store.
        store.close().await;
        std::fs::metadata(location)?.len()
    };
    let bytes_per_trajectory = bytes as f64 / total as f64;
    let store = Store::open_with(location, options).await?;

    let started = Instant::now();
    for i in 0..SINGLE_INSERTS {
        store
            .insert_trajectory(&copy(
                &templates[i % templates.len()],
                format!("single-{i}"),
                format!("s{i}"),
            ))
            .await?;
    }
    let single_per_s = SINGLE_INSERTS as f64 / started.elapsed().as_secs_f64();

    let mut rng = StdRng::seed_from_u64(7);
    let started = Instant::now();
    for i in 0..FEEDBACK_WRITES {
        let id = format!("fill-{}", rng.random_range(0..total));
        store
            .add_feedback(
                &id,
                FeedbackInput::new("purchase", rng.random_range(-1.0..=1.0))
                    .with_key(format!("order-{i}")),
            )
            .await?;
    }
    let feedback_per_s = FEEDBACK_WRITES as f64 / started.elapsed().as_secs_f64();
    store.close().await;
    Ok(Figures {
        name: name.to_string(),
        single_per_s,
        grouped_per_s,
        feedback_per_s,
        stream_s,
        streamed,
        bytes_per_trajectory,
    })
}

fn main() -> Result<()> {
    let pg = std::env::var("SEARCHLOOP_PG_URL").context(
        "SEARCHLOOP_PG_URL is not set: the benchmark measures PostgreSQL too; start a server with \
         `eval \"$(scripts/postgres.sh start)\"`",
    )?;
    let total: usize = match std::env::var("SEARCHLOOP_BENCH_TRAJECTORIES") {
        Ok(n) => n
            .parse()
            .context("SEARCHLOOP_BENCH_TRAJECTORIES must be a number")?,
        Err(_) => 100_000,
    };
    let templates = templates();
    let tokens: usize = templates.iter().map(|t| t.tokens.len()).sum();
    println!(
        "{total} trajectories of {} tokens on average ({}..{} tokens), {} tool calls each on average",
        tokens / templates.len(),
        templates.iter().map(|t| t.tokens.len()).min().unwrap_or(0),
        templates.iter().map(|t| t.tokens.len()).max().unwrap_or(0),
        templates.iter().map(|t| t.tool_calls.len()).sum::<usize>() / templates.len(),
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let figures = runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let mut figures = Vec::new();
        for (name, sync) in [
            ("SQLite, synchronous=FULL (default)", SqliteSync::Full),
            ("SQLite, synchronous=NORMAL", SqliteSync::Normal),
        ] {
            let path = dir.path().join(format!("{sync:?}.db"));
            let options = StoreOptions {
                sqlite_sync: sync,
                ..StoreOptions::default()
            };
            figures.push(
                run(
                    name,
                    path.to_str().context("temporary path is not UTF-8")?,
                    options,
                    &templates,
                    total,
                )
                .await?,
            );
        }

        let schema = format!("store_bench_{}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(&pg).await?;
        sqlx::raw_sql(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .execute(&mut admin)
        .await?;
        let sep = if pg.contains('?') { '&' } else { '?' };
        let location = format!("{pg}{sep}options[search_path]={schema}");
        let result = run(
            "PostgreSQL 15 (local, fsync on)",
            &location,
            StoreOptions::default(),
            &templates,
            total,
        )
        .await;
        sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut admin)
            .await?;
        figures.push(result?);
        anyhow::Ok(figures)
    })?;

    println!(
        "\n| backend | inserts/s (1 per commit) | inserts/s (group of {GROUP_SIZE} per commit) | feedback writes/s | stream {total} into groups | bytes on disk per trajectory |"
    );
    println!("|---|---|---|---|---|---|");
    for f in &figures {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} s ({:.0} trajectories/s) | {:.0} |",
            f.name,
            f.single_per_s,
            f.grouped_per_s,
            f.feedback_per_s,
            f.stream_s,
            f.streamed as f64 / f.stream_s,
            f.bytes_per_trajectory
        );
    }
    Ok(())
}
