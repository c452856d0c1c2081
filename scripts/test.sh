#!/usr/bin/env bash
# The project's test command (README, .ci/run): starts PostgreSQL, checks formatting and the
# dependency invariants, builds every target once in the release profile, runs clippy on every
# target, fetches the default model through the project's own fetcher, and runs the Rust tests
# and the Python binding tests.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "PostgreSQL for the store and inventory tests"
eval "$(scripts/postgres.sh start)"
export SEARCHLOOP_PG_URL

step "Formatting and the dependency invariants (ARCHITECTURE.md)"
cargo fmt --all --check
scripts/check-invariants.sh

step "Build (release profile, every target: libraries, binaries, tests, examples, benchmarks)"
cargo build --release --workspace --all-targets --locked

step "Lints: clippy on every target, warnings are errors"
# The release profile shares build scripts and proc-macros with the build above.
cargo clippy --release --workspace --all-targets --locked -- -D warnings

step "Default model"
# Every test finds the model here, whatever cache directory the machine's environment names.
SEARCHLOOP_MODEL=$(target/release/searchloop model fetch)
export SEARCHLOOP_MODEL
echo "model: $SEARCHLOOP_MODEL"

step "Rust tests"
cargo test --release --workspace --locked --no-fail-fast

if [ -x scripts/test-python.sh ]; then
    step "Python binding tests"
    scripts/test-python.sh
fi
