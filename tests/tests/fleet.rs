//! A fleet on one machine, as real processes: PostgreSQL (`SEARCHLOOP_PG_URL`, a schema of
//! this test's own), three `searchloop serve` replicas on loopback ports and a trainer
//! (`serve --learn`) on the embedded model, plus a second trainer beside the first.
//!
//! Asks and feedback go to every replica; a round trains on the trainer, its candidate is
//! promoted, and every replica must serve it within 30 s, fetched from the registry into a
//! cache of its own (the replicas share no adapter folder with the trainer), while askers keep
//! every replica busy and no request fails. Then a replica is killed (SIGKILL) mid-swap and
//! the trainer mid-round: every acknowledged answer and feedback is still in the store, the
//! trainer lease passes to the second trainer, and the restarted replica serves the promoted
//! version.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use searchloop_e2e::{PgSchema, prepare_demo, searchloop_binary};
use serde_json::{Value, json};

/// How long a promotion may take to reach every replica on the CPU.
const PROPAGATION_BOUND: Duration = Duration::from_secs(30);

/// A `searchloop serve` process and its address.
struct Server {
    name: String,
    child: Child,
    url: String,
}

impl Server {
    /// Starts `searchloop --config CONFIG serve` with `extra` flags on a free loopback port and
    /// waits until it serves.
    fn start(name: &str, config: &Path, extra: &[&str], log: &Path) -> Self {
        let mut child = Command::new(searchloop_binary())
            .arg("--config")
            .arg(config)
            .args(["serve", "--bind", "127.0.0.1:0", "--replica-id", name])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("searchloop serving on ") {
                    let _ = sender.send(url.trim().to_string());
                }
            }
        });
        let url = receiver
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!(
                    "{name} did not start: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        Self {
            name: name.to_string(),
            child,
            url,
        }
    }

    fn kill(&mut self) {
        // `Child::kill` is SIGKILL on Unix: no shutdown code runs.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Value {
    let response = client.get(url).send().await.unwrap();
    assert!(response.status().is_success(), "GET {url}: {response:?}");
    response.json().await.unwrap()
}

/// POSTs `body` as JSON, or nothing when it is `None`; returns the status and the JSON answer.
async fn post(client: &reqwest::Client, url: &str, body: Option<Value>) -> (u16, Value) {
    let request = client.post(url);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn served_version(client: &reqwest::Client, server: &Server) -> Option<u64> {
    get(client, &format!("{}/healthz", server.url)).await["adapter_version"].as_u64()
}

/// Waits until `server` serves `version`; returns how long that took from `since`.
async fn wait_for_version(
    client: &reqwest::Client,
    server: &Server,
    version: u64,
    since: Instant,
) -> Duration {
    loop {
        if served_version(client, server).await == Some(version) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < PROPAGATION_BOUND,
            "{} still serves {:?}, not v{version}, after {PROPAGATION_BOUND:?}",
            server.name,
            served_version(client, server).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the round started over HTTP on `trainer` to end and returns its report.
async fn finished_round(client: &reqwest::Client, trainer: &Server) -> Value {
    let started = Instant::now();
    loop {
        let status = get(client, &format!("{}/v1/train", trainer.url)).await;
        if status["running"] == false && !status["last"].is_null() {
            let last = &status["last"];
            assert!(last["error"].is_null(), "the round failed: {last}");
            return last["report"].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the round did not end"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The config of one process: the demo's tools, the fleet's store, its own adapter cache and,
/// for a trainer, a `[learn]` section whose rounds start only over HTTP.
fn write_config(data: &Path, name: &str, store_url: &str, learn: bool) -> PathBuf {
    let mut text = std::fs::read_to_string(data.join("searchloop.toml")).unwrap();
    text = text.replace(
        "[store]\nurl = \"searchloop.db\"",
        &format!("[store]\nurl = \"{store_url}\"\nadapter_cache = \"cache-{name}\""),
    );
    assert!(
        text.contains(store_url),
        "the demo's config changed: {text}"
    );
    if learn {
        text.push_str(&format!(
            r#"
[learn]
adapters_dir = "adapters-{name}"
memory_cap_mb = 16384
[learn.trigger]
interval_minutes = 1e9
[learn.eval]
set = "data/questions.jsonl"
questions = 4
[learn.round]
source = "replay"
prompts = "data/questions.jsonl"
prompts_per_round = 1
group_size = 4
rollout_temperature = 1.0
[learn.round.trainer]
ppo_epochs = 1
# Four samples of one prompt often all earn the same reward; the round still makes a candidate
# (the fleet's mechanics are under test here, not learning).
[learn.round.trainer.advantages]
skip_zero_std_groups = false
"#
        ));
    }
    let path = data.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_of_three_replicas_follows_one_trainer_through_promotions_and_kills() {
    let schema = PgSchema::create("fleet_test").await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    prepare_demo(&data, 1);
    let log = |name: &str| work.path().join(format!("{name}.log"));
    let replica_configs: Vec<PathBuf> = (1..=3)
        .map(|i| write_config(&data, &format!("r{i}"), &schema.url, false))
        .collect();
    let trainer_config = write_config(&data, "trainer", &schema.url, true);
    let standby_config = write_config(&data, "standby", &schema.url, true);

    let mut replicas: Vec<Server> = replica_configs
        .iter()
        .enumerate()
        .map(|(i, config)| {
            let name = format!("r{}", i + 1);
            Server::start(&name, config, &["--follow", "2"], &log(&name))
        })
        .collect();
    let mut trainer = Server::start("trainer", &trainer_config, &["--learn"], &log("trainer"));
    let standby = Server::start("standby", &standby_config, &["--learn"], &log("standby"));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();

    // Asks and feedback across the three replicas, each answer recorded with its replica's id;
    // feedback may arrive at any replica, since they share the store.
    let mut acknowledged = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        let (status, answer) = post(
            &client,
            &format!("{}/v1/ask", replica.url),
            Some(json!({"question": "Which store is open on Sunday?"})),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let id = answer["trajectory_id"].as_str().unwrap().to_string();
        let other = &replicas[(i + 1) % replicas.len()];
        let (status, body) = post(
            &client,
            &format!("{}/v1/feedback", other.url),
            Some(json!({"trajectory_id": id, "source": "thumbs", "value": 1.0})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        acknowledged.push((id, replica.name.clone()));
    }
    for (id, name) in &acknowledged {
        let stored = get(&client, &format!("{}/v1/trajectories/{id}", trainer.url)).await;
        assert_eq!(stored["replica_id"], name.as_str(), "{stored}");
    }

    // A round on the trainer; then, while askers keep every replica busy, its candidate is
    // promoted (through the trainer, whatever the gate decided), and every replica must serve
    // it within the bound.
    let (status, body) = post(&client, &format!("{}/v1/train", trainer.url), None).await;
    assert_eq!(status, 202, "{body}");
    let report = finished_round(&client, &trainer).await;
    let candidate = report["candidate"].as_u64().unwrap();

    // Askers keep every replica busy through the promotion; none of their requests may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut askers = Vec::new();
    for replica in &replicas {
        let (client, url) = (client.clone(), replica.url.clone());
        let (stop, answered) = (stop.clone(), answered.clone());
        askers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = post(
                    &client,
                    &format!("{url}/v1/ask"),
                    Some(json!({"question": "Where is the Oslo store?"})),
                )
                .await;
                if status == 200 {
                    answered.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(format!("{url}: {status} {body}"));
                }
            }
            failures
        }));
    }

    let promoted_at = Instant::now();
    let (status, body) = post(
        &client,
        &format!("{}/v1/adapters/{candidate}/promote", trainer.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut propagation = Vec::new();
    for replica in &replicas {
        propagation.push(wait_for_version(&client, replica, candidate, promoted_at).await);
    }
    println!("promotion reached the replicas after {propagation:?}");

    // The second trainer stays idle: its round is refused while the first holds the lease.
    let (status, _) = post(&client, &format!("{}/v1/train", standby.url), None).await;
    assert_eq!(status, 202);
    let refused = loop {
        let status = get(&client, &format!("{}/v1/train", standby.url)).await;
        if status["running"] == false && !status["last"].is_null() {
            break status["last"]["error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.contains("trainer lease"), "{refused}");

    stop.store(true, Ordering::Relaxed);
    for asker in askers {
        let failures = asker.await.unwrap();
        assert!(
            failures.is_empty(),
            "requests failed during the swap: {failures:?}"
        );
    }
    assert!(
        answered.load(Ordering::Relaxed) >= 3,
        "the askers got no answers"
    );

    // Each replica made its model from the registry's copy of the adapter, in its own cache.
    for i in 1..=3 {
        let cache = data.join(format!("cache-r{i}"));
        let merged: Vec<PathBuf> = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| panic!("{}: {e}", cache.display()))
            .flatten()
            .map(|e| e.path().join("merged.gguf"))
            .filter(|p| p.is_file())
            .collect();
        assert_eq!(merged.len(), 1, "r{i}'s cache: {merged:?}");
    }

    // A replica killed mid-swap: a second round's candidate is promoted, and r3 is killed while
    // it fetches and merges it.
    let (status, body) = post(&client, &format!("{}/v1/train", trainer.url), None).await;
    assert_eq!(status, 202, "{body}");
    let second = finished_round(&client, &trainer).await["candidate"]
        .as_u64()
        .unwrap();
    let (status, body) = post(
        &client,
        &format!("{}/v1/adapters/{second}/promote", trainer.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicas[2].kill();

    // The trainer killed mid-round.
    let (status, body) = post(&client, &format!("{}/v1/train", trainer.url), None).await;
    assert_eq!(status, 202, "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get(&client, &format!("{}/v1/train", trainer.url)).await["running"],
        true
    );
    trainer.kill();

    // Nothing acknowledged is lost: every answer and its feedback are in the store.
    for (id, name) in &acknowledged {
        let stored = get(
            &client,
            &format!("{}/v1/trajectories/{id}", replicas[0].url),
        )
        .await;
        assert_eq!(stored["replica_id"], name.as_str());
        let sources: Vec<&str> = stored["rewards"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["source"].as_str())
            .collect();
        assert!(sources.contains(&"thumbs"), "{id}: {stored}");
    }

    // The dead trainer's lease is released by the database: the standby trains now.
    let taken_at = Instant::now();
    loop {
        let (status, body) = post(&client, &format!("{}/v1/train", standby.url), None).await;
        assert!(status == 202 || status == 409, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = get(&client, &format!("{}/v1/train", standby.url)).await;
        if status["running"] == true {
            break;
        }
        let error = status["last"]["error"].as_str().unwrap_or_default();
        assert!(error.contains("trainer lease"), "{status}");
        assert!(
            taken_at.elapsed() < Duration::from_secs(30),
            "the killed trainer's lease was never released"
        );
    }

    // The restarted replica comes up on the promoted version, from its cache.
    let restarted = Server::start(
        "r3",
        &replica_configs[2],
        &["--follow", "2"],
        &log("r3-restarted"),
    );
    assert_eq!(served_version(&client, &restarted).await, Some(second));
    replicas[2] = restarted;
    for replica in &replicas[..2] {
        wait_for_version(&client, replica, second, Instant::now()).await;
    }
    drop(standby);
    drop(replicas);
    schema.drop().await;
}
