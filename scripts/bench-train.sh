#!/usr/bin/env bash
# Training-round benchmark of the candle trainer against a PyTorch + PEFT peer on the same batch.
#
#   scripts/bench-train.sh [--threads N] [--group-size G] [--prompts P] [--micro-batch-tokens N]
#
# 1. the `round` bench of searchloop-learn samples G episodes for each of P train
#    questions with the embedded model (mistral.rs, f32), trains one GRPO + SAPO pass over them,
#    and dumps the trained batch;
# 2. the same bench with `--train-batch` trains on that batch alone, in a process without the
#    serving model, so its peak RSS compares with the peer's: once with the peer's micro-batches
#    of two sequences, once with micro-batches cut at N packed tokens (default 2048);
# 3. plugins/learn/benches/torch_peer.py trains a PEFT LoRA on the same batch with the same loss,
#    optimizer and batching, with the same thread count.
#
# The peer's packages (torch, peft, transformers, gguf) come from PyPI into a virtual environment
# cached under .cache/torch-venv. The model comes from SEARCHLOOP_MODEL or the project's cache
# (scripts/test.sh fetches it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/torch-venv"
cd "$root"

threads=$(nproc)
micro_batch_tokens=2048
round_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --group-size|--prompts) round_args+=("$1" "$2"); shift 2 ;;
        --micro-batch-tokens) micro_batch_tokens="$2"; shift 2 ;;
        *) echo "bench-train.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "bench-train.sh: $*" >&2; }

scripts/torch-venv.sh

round_bench="$(scripts/built-target.sh bench round)"
model="${SEARCHLOOP_MODEL:-$("$(scripts/built-target.sh bin searchloop)" model fetch)}"
batch="$(mktemp -d)/batch.json"

log "round: rollouts with the serving model, then one training pass ($threads threads)"
"$round_bench" --model "$model" --threads "$threads" --dump-batch "$batch" "${round_args[@]}"

log "candle trainer alone on the dumped batch, micro-batches of 2 sequences"
"$round_bench" --model "$model" --threads "$threads" --train-batch "$batch"

log "candle trainer alone on the dumped batch, micro-batches of $micro_batch_tokens packed tokens"
"$round_bench" --model "$model" --threads "$threads" --train-batch "$batch" \
    --micro-batch-tokens "$micro_batch_tokens"

log "PyTorch + PEFT peer on the same batch"
"$venv/bin/python" plugins/learn/benches/torch_peer.py "$batch" --model "$model" --threads "$threads"
