//! Shared helpers for the end-to-end tests: locating and running the `searchloop` binary that
//! the same `cargo test` invocation built.

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

/// Standard output as text.
pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
