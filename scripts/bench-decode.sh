#!/usr/bin/env bash
# Decode benchmark of the mistral.rs serving policy against llama.cpp on the same GGUF files.
#
#   scripts/bench-decode.sh [-- bench args, e.g. --weights original,q8_0 --tokens 128]
#
# Installs llama-cpp-python (which builds llama.cpp from source, several minutes on two cores)
# into a virtual environment cached under .cache/llama-venv, then runs
# `cargo bench -p searchloop-model-mistralrs --bench decode` with it. The model comes from
# SEARCHLOOP_MODEL or the project's cache path (scripts/test.sh fetches it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/llama-venv"
llama_cpp_python_version=0.3.36

log() { echo "bench-decode.sh: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
    log "a C/C++ compiler is missing; installing build-essential with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >&2
fi

if ! "$venv/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
    log "installing llama-cpp-python $llama_cpp_python_version into $venv (builds llama.cpp)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "llama-cpp-python==$llama_cpp_python_version" >&2
fi

[ "${1:-}" = "--" ] && shift
cd "$root"
exec cargo bench -p searchloop-model-mistralrs --bench decode -- --python "$venv/bin/python" "$@"
