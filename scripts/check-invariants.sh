#!/usr/bin/env bash
# Checks the dependency invariants ARCHITECTURE.md states, from cargo's own view of the graph:
#   - core depends on no backend (no mistral.rs, candle, tantivy, sqlx, reqwest or uniffi);
#   - the closed loop (searchloop-loop) builds without a serving engine or a tool: no
#     mistral.rs, tantivy or reqwest, dev-dependencies included;
#   - only bindings/ffi knows uniffi;
#   - one candle in the tree (the trainer and the servers share its kernels).
# Exits non-zero naming the broken invariant.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "check-invariants: $*" >&2; exit 1; }

# The packages of a `cargo tree` selection, as `name version` lines.
packages() { cargo tree --locked --prefix none --format '{p}' "$@" | awk '{print $1, $2}' | sort -u; }

core=$(packages -p searchloop-core -e normal,build)
bad=$(grep -E '^(mistralrs|candle-|tantivy|sqlx|reqwest|uniffi)' <<<"$core" || true)
[ -z "$bad" ] || fail "searchloop-core depends on a backend: $(tr '\n' ' ' <<<"$bad")"

loop=$(packages -p searchloop-loop)
bad=$(grep -E '^(mistralrs|tantivy|reqwest)' <<<"$loop" || true)
[ -z "$bad" ] || fail "searchloop-loop pulls a serving engine or a tool: $(tr '\n' ' ' <<<"$bad")"

users=$(packages --workspace -e normal -i uniffi | awk '$1 ~ /^searchloop-/ {print $1}')
[ "$users" = "searchloop-ffi" ] || fail "uniffi is used by $(tr '\n' ' ' <<<"$users")(only searchloop-ffi may)"

candles=$(packages --workspace -e normal,build | awk '$1 == "candle-core"')
[ "$(wc -l <<<"$candles")" = 1 ] || fail "more than one candle in the tree: $(tr '\n' ' ' <<<"$candles")"

echo "check-invariants: core has no backend; the loop has no engine or tool; only the FFI crate knows uniffi; one candle ($candles)"
