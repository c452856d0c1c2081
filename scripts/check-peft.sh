#!/usr/bin/env bash
# Checks that Hugging Face peft loads the trainer's PEFT adapters as the trainer means them: the
# trainer writes an adapter with every factor non-zero and its per-token log-probs
# (plugins/llama/examples/peft_export.rs), and transformers + peft load the same GGUF and
# adapter and must compute the same log-probs (peft_check.py beside it).
#
#   scripts/check-peft.sh
#
# torch, peft, transformers and gguf come from PyPI into .cache/torch-venv (shared with
# scripts/bench-train.sh); they are several GB, which is why the test command does not run this.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/torch-venv.sh
model="${SEARCHLOOP_MODEL:-$("$(scripts/built-target.sh bin searchloop)" model fetch)}"
out="$(mktemp -d)"
"$(scripts/built-target.sh example peft_export)" "$model" "$out"
.cache/torch-venv/bin/python plugins/llama/examples/peft_check.py "$model" "$out"
