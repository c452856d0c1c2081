//! Killing the process with SIGKILL during promotions and during a training round, then
//! restarting: exactly one adapter is promoted, it loads, and no acknowledged trajectory is lost.
//!
//! This test binary is its own child process (it runs without the libtest harness): with
//! `SEARCHLOOP_CRASH_CHILD` set it serves and promotes (or trains) until it is killed, printing
//! one line per acknowledged event; without it, it runs the tests, which start and kill such
//! children.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use common::{ScriptedLoader, Workspace, model_path, register, write_candidate};
use searchloop_core::SamplingParams;
use searchloop_learn::GroupSource;
use searchloop_runtime::{AppConfig, Runtime};
use searchloop_store_sql::{AdapterStatus, Store};

const CHILD_ENV: &str = "SEARCHLOOP_CRASH_CHILD";
const CONFIG_ENV: &str = "SEARCHLOOP_CRASH_CONFIG";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    match std::env::var(CHILD_ENV).as_deref() {
        Ok("promote") => runtime.block_on(child_promote()),
        Ok("round") => runtime.block_on(child_round()),
        _ => {
            run_test(
                "sigkill_during_promotions_keeps_one_promoted_adapter_and_every_trajectory",
                || runtime.block_on(sigkill_during_promotions()),
            );
            run_test(
                "sigkill_during_a_round_leaves_no_trace_and_loses_no_trajectory",
                || runtime.block_on(sigkill_during_a_round()),
            );
        }
    }
}

/// Runs `test` unless the command line names tests (as `cargo test NAME` does) and none of the
/// names is part of this one.
fn run_test(name: &str, test: impl FnOnce()) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
        return;
    }
    let started = Instant::now();
    test();
    println!(
        "test {name} ... ok ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// Prints one line and flushes it, so the parent sees exactly what happened before a kill. A
/// child whose parent is gone (the pipe is closed) has no one to report to and exits.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn child_config() -> AppConfig {
    let path = PathBuf::from(std::env::var_os(CONFIG_ENV).unwrap());
    AppConfig::load(&path).unwrap()
}

/// Serves 4 askers on scripted models while promoting the next candidate and rolling it back,
/// over and over, until killed.
async fn child_promote() {
    let loader = Arc::new(
        ScriptedLoader::naming_versions()
            .with_delays(Duration::from_millis(100), Duration::from_millis(5)),
    );
    let runtime = Arc::new(
        Runtime::start_with(child_config(), Vec::new(), loader)
            .await
            .unwrap(),
    );
    say("ready");
    for i in 0..4 {
        let runtime = runtime.clone();
        tokio::spawn(async move {
            loop {
                let t = runtime.ask(&format!("question {i}")).await.unwrap();
                say(&format!("ok {}", t.id));
            }
        });
    }
    loop {
        let next = runtime
            .adapters()
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.status == AdapterStatus::Candidate);
        let Some(next) = next else {
            say("out of candidates");
            std::future::pending::<()>().await;
            return;
        };
        say(&format!("promote-begin {}", next.version));
        runtime.promote(next.version).await.unwrap();
        say(&format!("promote-end {}", next.version));
        say("rollback-begin");
        runtime.rollback(None).await.unwrap();
        say("rollback-end");
    }
}

/// Serves one asker on the real model while a real training round runs, until killed.
async fn child_round() {
    let runtime = Arc::new(Runtime::start(child_config()).await.unwrap());
    say("ready");
    let asker = runtime.clone();
    tokio::spawn(async move {
        loop {
            let t = asker.ask("Which bags are red?").await.unwrap();
            say(&format!("ok {}", t.id));
        }
    });
    say("round-begin");
    let outcome = runtime.train_now().await;
    say(&format!("round-end {outcome:?}"));
    std::future::pending::<()>().await;
}

/// A child process and the lines it printed.
struct ChildProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildProcess {
    fn start(mode: &str, config: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, mode)
            .env(CONFIG_ENV, config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until a printed line satisfies `want`, for at most `timeout`.
    fn wait_for(&mut self, timeout: Duration, mut want: impl FnMut(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = want(&line);
                    self.seen.push(line);
                    if done {
                        return;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    panic!(
                        "the child did not get there ({e}); it printed {:?}",
                        self.seen
                    );
                }
            }
        }
    }

    /// The lines printed since the last look, without waiting.
    fn poll(&mut self) -> &[String] {
        let from = self.seen.len();
        self.seen.extend(self.lines.try_iter());
        &self.seen[from..]
    }

    /// SIGKILLs the child and returns every line it printed.
    fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        // The reader thread drains what was printed before the kill, then ends.
        self.seen.extend(self.lines.iter());
        std::mem::take(&mut self.seen)
    }
}

impl Drop for ChildProcess {
    /// A failing test must not leave its child running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ids of the trajectories the child acknowledged.
fn acknowledged(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ok ").map(str::to_string))
        .collect()
}

/// Checks what any restart relies on: exactly one promoted adapter, every acknowledged
/// trajectory stored, the store intact.
async fn check_store(config: &AppConfig, acked: &[String]) -> u64 {
    let store = Store::open(&config.store.url).await.unwrap();
    store.check_integrity().await.unwrap();
    let promoted: Vec<_> = store
        .list_adapters()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.status == AdapterStatus::Promoted)
        .collect();
    assert_eq!(promoted.len(), 1, "exactly one promoted adapter");
    for id in acked {
        assert!(
            store.get_trajectory(id).await.unwrap().is_some(),
            "acknowledged trajectory {id} was lost"
        );
    }
    store.close().await;
    promoted[0].version
}

/// Starts the real runtime on `config` and checks that it serves `version` and samples.
async fn restart_serves(config: &AppConfig, version: u64) -> Runtime {
    let runtime = Runtime::start(config.clone()).await.unwrap();
    let policy = runtime.agent().policy().current();
    assert_eq!(policy.adapter_version(), Some(version));
    let params = SamplingParams {
        max_tokens: 4,
        seed: Some(3),
        ..SamplingParams::default()
    };
    let prompt = policy.tokenize("Hello").unwrap();
    let samples = policy.sample(&prompt, &params, 1).await.unwrap();
    assert!(!samples[0].tokens.is_empty());
    runtime
}

fn save_config(config: &AppConfig, dir: &Path) -> PathBuf {
    let path = dir.join("child.json");
    std::fs::write(&path, serde_json::to_string(config).unwrap()).unwrap();
    path
}

async fn sigkill_during_promotions() {
    let ws = Workspace::new(120);
    // Sixteen registered candidates share one real merged model (folders linked to v1's), so
    // the final restart really loads whichever ends up promoted.
    let adapters = ws.adapters_dir();
    write_candidate(&model_path(), &adapters.join("v1"), None);
    let store = Store::open(&ws.config.store.url).await.unwrap();
    for v in 1..=16 {
        let folder = adapters.join(format!("v{v}"));
        if v > 1 {
            std::os::unix::fs::symlink(adapters.join("v1"), &folder).unwrap();
        }
        register(&store, &folder, None).await;
    }
    store.promote(1).await.unwrap();
    store.close().await;
    let config_file = save_config(&ws.config, ws.dir.path());

    let mut acked = Vec::new();
    // Kill after the n-th promotion began, plus a delay: during the 100 ms model load, around
    // the registry commit and the swap, and during a rollback.
    for (n, delay_ms) in [(1, 0), (1, 60), (2, 100), (1, 104), (2, 140), (1, 180)] {
        let mut child = ChildProcess::start("promote", &config_file);
        child.wait_for(Duration::from_secs(60), |l| l == "ready");
        let mut begun = 0;
        child.wait_for(Duration::from_secs(30), |l| {
            if l.starts_with("promote-begin") {
                begun += 1;
            }
            begun == n
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        acked.extend(acknowledged(&child.kill()));
        let promoted = check_store(&ws.config, &acked).await;
        // A restart serves exactly the registry's promoted adapter.
        let runtime = Runtime::start_with(
            ws.config.clone(),
            Vec::new(),
            Arc::new(ScriptedLoader::naming_versions()),
        )
        .await
        .unwrap();
        assert_eq!(runtime.loop_metrics().serving_version, Some(promoted));
        runtime.store().close().await;
    }
    assert!(acked.len() > 10, "the askers answered: {acked:?}");
    let promoted = check_store(&ws.config, &acked).await;
    restart_serves(&ws.config, promoted).await;
}

async fn sigkill_during_a_round() {
    let mut ws = Workspace::new(120);
    let adapters = ws.adapters_dir();
    write_candidate(&model_path(), &adapters.join("v1"), None);
    let store = Store::open(&ws.config.store.url).await.unwrap();
    register(&store, &adapters.join("v1"), None).await;
    store.promote(1).await.unwrap();
    store.close().await;
    let mut learn = ws.learn_config(1);
    learn.round.source = GroupSource::Replay;
    learn.round.prompts = Some(ws.questions_file());
    learn.round.group_size = 2;
    learn.round.prompts_per_round = 1;
    learn.round.threads = 1;
    // Two episodes often earn equal rewards; train on them anyway, so the round surely
    // reaches its training step, where the kill is aimed.
    learn.round.trainer.advantages.skip_zero_std_groups = false;
    ws.config.learn = Some(learn);
    let config_file = save_config(&ws.config, ws.dir.path());

    let mut child = ChildProcess::start("round", &config_file);
    child.wait_for(Duration::from_secs(120), |l| l == "round-begin");
    // Kill once the round trains: its staging folder exists from then on.
    let staging = || {
        std::fs::read_dir(&adapters)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".round-"))
    };
    let deadline = Instant::now() + Duration::from_secs(150);
    while !staging() {
        if let Some(end) = child.poll().iter().find(|l| l.starts_with("round-end")) {
            panic!("the round ended before it trained: {end}");
        }
        assert!(
            Instant::now() < deadline,
            "the round never started training"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let lines = child.kill();
    assert!(
        !lines.iter().any(|l| l.starts_with("round-end")),
        "the round finished before the kill: {lines:?}"
    );
    let acked = acknowledged(&lines);
    let promoted = check_store(&ws.config, &acked).await;
    assert_eq!(promoted, 1);
    let store = Store::open(&ws.config.store.url).await.unwrap();
    assert_eq!(
        store.list_adapters().await.unwrap().len(),
        1,
        "no trace in the registry"
    );
    store.close().await;
    let runtime = restart_serves(&ws.config, 1).await;
    // Attaching the scheduler clears what the killed round left on disk.
    let mut learn = ws.config.learn.clone().unwrap();
    learn.trigger.poll_seconds = 3600.0;
    runtime.attach_scheduler(learn).await.unwrap();
    assert!(!staging(), "the killed round's folder is removed");
    runtime.detach_scheduler().await;
    eprintln!("acknowledged episodes while the round ran: {}", acked.len());
}
