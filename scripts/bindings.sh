#!/usr/bin/env bash
# Builds the searchloop-ffi library (release profile) and generates its Python, Kotlin and Swift
# bindings with the workspace's own uniffi-bindgen, into target/bindings/{python,kotlin,swift}.
# The Python folder also gets the library, so it is importable as it is:
#   PYTHONPATH=target/bindings/python python3 -c "import searchloop"
# Kotlin needs the library on JNA's path and Swift links it with the generated header and module
# map; neither toolchain runs here, so those two are generated and checked, not executed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The same build as the test command's, so the library comes from the artifacts it already made:
# a build of this crate alone would resolve dependency features differently and rebuild half the
# tree.
cargo build --release --locked --workspace --all-targets

case "$(uname -s)" in
    Darwin) library=target/release/libsearchloop_ffi.dylib ;;
    *) library=target/release/libsearchloop_ffi.so ;;
esac
out=target/bindings
rm -rf "$out"
for language in python kotlin swift; do
    # --no-format: the formatters (ktlint, swiftformat) are not installed, and the bindings work
    # unformatted.
    target/release/uniffi-bindgen generate --library "$library" --language "$language" \
        --no-format --metadata-no-deps --out-dir "$out/$language"
done
cp "$library" "$out/python/"
echo "bindings in $out: $(cd "$out" && find . -type f | sort | tr '\n' ' ')"
