//! Shared helpers for the end-to-end tests: locating and running the `searchloop` binary that
//! the same `cargo test` invocation built, and a PostgreSQL schema of a test's own.

// Only tests call these helpers, and a failed setup is clearest as a panic with its error there.
#![allow(clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The `searchloop` binary of the profile these tests were built in.
///
/// Test executables live in `target/<profile>/deps/`, and cargo places the workspace's binaries
/// one level up, so the binary is found beside the test's own directory. It is built by
/// `cargo build --workspace` (the project's test script does that before `cargo test`).
pub fn searchloop_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let binary = profile_dir.join("searchloop");
    assert!(
        binary.is_file(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`)",
        binary.display()
    );
    binary
}

/// Runs `searchloop` with `args` and extra environment variables, and returns its output.
pub fn run_searchloop(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_searchloop_in(None, args, env)
}

/// [`run_searchloop`] in the working folder `dir` (the test's own when `None`).
pub fn run_searchloop_in(dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(searchloop_binary());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    // The tool finds its model as on a user's machine (the default cache) unless a test says
    // otherwise: the test script's SEARCHLOOP_MODEL would bypass the fetcher under test.
    command.args(args).env_remove("SEARCHLOOP_MODEL");
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run searchloop {args:?}: {e}"))
}

/// Runs `searchloop demo --workdir WORKDIR --questions N`, as a user's first command, and fails
/// the test unless it succeeds: the data set, the inventory database and the config are then in
/// `workdir`.
pub fn prepare_demo(workdir: &Path, questions: usize) {
    let workdir = workdir.to_string_lossy();
    let questions = questions.to_string();
    let demo = run_searchloop(
        &["demo", "--workdir", &workdir, "--questions", &questions],
        &[],
    );
    assert!(demo.status.success(), "{}", stderr_of(&demo));
}

/// Standard output as text.
pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A PostgreSQL schema of one test's own in `SEARCHLOOP_PG_URL`'s database (started by
/// `scripts/postgres.sh`), so the tests of a fleet's store run beside every other test.
pub struct PgSchema {
    admin: sqlx::PgConnection,
    name: String,
    /// The store URL that selects it.
    pub url: String,
}

impl PgSchema {
    /// Creates a fresh schema named after `prefix`, this process and a counter.
    pub async fn create(prefix: &str) -> Self {
        use sqlx::Connection;

        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base = std::env::var("SEARCHLOOP_PG_URL")
            .expect("SEARCHLOOP_PG_URL is not set: start PostgreSQL with scripts/postgres.sh");
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut admin = sqlx::PgConnection::connect(&base)
            .await
            .expect("cannot connect to SEARCHLOOP_PG_URL");
        sqlx::raw_sql(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))
        .execute(&mut admin)
        .await
        .expect("cannot create a schema");
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options[search_path]={name}");
        Self { admin, name, url }
    }

    /// Drops the schema and everything in it.
    pub async fn drop(mut self) {
        sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", self.name))
            .execute(&mut self.admin)
            .await
            .expect("cannot drop a schema");
    }
}
