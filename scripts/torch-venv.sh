#!/usr/bin/env bash
# Installs the PyTorch peer's packages (torch, peft, transformers, gguf) from PyPI into
# .cache/torch-venv unless they are there already. Used by scripts/bench-train.sh and
# scripts/check-peft.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/torch-venv"
if ! "$venv/bin/python" -c "import torch, peft, transformers, gguf" >/dev/null 2>&1; then
    echo "torch-venv.sh: installing torch, peft, transformers and gguf into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --disable-pip-version-check --quiet \
        "torch==2.15.0" "peft==0.21.2" "transformers==5.24.0" "gguf==0.19.0" \
        "sentencepiece==0.2.3" >&2
fi
