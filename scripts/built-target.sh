#!/usr/bin/env bash
# Prints the path of a built executable target (a bench, example or binary) of the workspace.
#
#   scripts/built-target.sh KIND NAME      # e.g. bench round, example peft_export, bin searchloop
#
# It runs the test command's own build (release profile, every target of the workspace), which is
# a no-op after scripts/test.sh, and reads the executable's path from cargo: running a bench or
# example through `cargo bench -p CRATE` or `cargo run -p CRATE` instead would resolve dependency
# features for that crate alone and rebuild much of the tree.
set -euo pipefail
kind="$1"
name="$2"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked --workspace --all-targets --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
kind, name = sys.argv[1], sys.argv[2]
found = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["target"]["name"] == name and kind in m["target"]["kind"]]
if len(found) != 1:
    sys.exit(f"built-target.sh: {len(found)} {kind} targets named {name}")
print(found[0])
' "$kind" "$name"
