#!/usr/bin/env bash
# Tests the Python bindings for real: builds the library and generates the Python, Kotlin and
# Swift bindings (scripts/bindings.sh), checks the Kotlin and Swift files exist (there is no
# Kotlin or Swift toolchain to run them), then runs pytest over the Python module with the real
# embedded model and a real SQLite store. pytest comes from PyPI into a git-ignored `.venv`.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --disable-pip-version-check -q "pytest>=8,<9"

scripts/bindings.sh
for generated in \
    target/bindings/python/searchloop.py \
    target/bindings/kotlin/uniffi/searchloop/searchloop.kt \
    target/bindings/swift/searchloop.swift \
    target/bindings/swift/searchloopFFI.h \
    target/bindings/swift/searchloopFFI.modulemap; do
    if [ ! -s "$generated" ]; then
        echo "bindings: $generated was not generated" >&2
        exit 1
    fi
done

# The tests prepare the demo work folder with the real command-line tool, which the build in
# scripts/bindings.sh made.
PYTHONPATH=target/bindings/python .venv/bin/python -m pytest -q bindings/ffi/tests/python "$@"
