#!/usr/bin/env bash
# Builds the `searchloop` binary with the `cuda` feature on a machine without a GPU or an
# NVIDIA toolkit, from PyPI packages alone, and packs it for carrying to a GPU machine.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]      # default 90 (H100, H200); 80 for A100, 89 for L4
#
# 1. Lays out CUDA 13.0.2 from its PyPI wheels in .cache/cuda (git-ignored), once: the
#    toolkit's bin/include/nvvm/lib64 as links into the wheels, the unversioned .so links the
#    linker wants, and a link-only libcuda.so stub (the GPU machine's driver provides the real
#    one; the stub is never shipped).
# 2. Builds with CUDA_COMPUTE_CAP set, into target/cuda (its own target folder, so the CPU
#    build in target/release stays as it is).
# 3. Strips the binary and compresses it: target/cuda/searchloop-cuda-smCAP.xz.
#
# The toolkit is pinned to 13.0.x: mistralrs-quant's build script refuses nvcc newer than 13.2,
# and the lent GPU machines' driver (580, CUDA 13.0) cannot load PTX from a newer toolkit.
# Not part of the test command: a cold build takes about 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

cap="${1:-90}"
case "$cap" in
    [0-9][0-9] | [0-9][0-9][0-9]) ;;
    *) echo "build-cuda.sh: the compute capability must be a number like 90 (got '$cap')" >&2; exit 2 ;;
esac
prefix="$PWD/.cache/cuda"
toolkit='cuda-toolkit[nvcc,cccl,crt,nvvm,cudart,cublas,curand,nvrtc,nvjitlink]==13.0.2'
say() { echo "build-cuda.sh: $*" >&2; }

# The link stub is laid out last, so its presence means an earlier layout finished; a layout
# that was interrupted is redone from the start.
if [ ! -f "$prefix/cuda/lib64/stubs/libcuda.so" ]; then
    rm -rf "$prefix/cuda"
    say "laying out $toolkit in $prefix"
    mkdir -p "$prefix"
    [ -x "$prefix/venv/bin/pip" ] || python3 -m venv "$prefix/venv"
    if ! "$prefix/venv/bin/pip" install --quiet --disable-pip-version-check "$toolkit"; then
        say "cannot install $toolkit from the Python package registry (is it reachable? pip's"
        say "error is above); nothing was built"
        exit 1
    fi
    wheels="$("$prefix/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
    cuda="$prefix/cuda"
    mkdir -p "$cuda/lib64/stubs"
    for dir in bin include nvvm; do ln -sfn "$wheels/$dir" "$cuda/$dir"; done
    for f in "$wheels"/lib/*.so.* "$wheels"/lib/*.a; do ln -sfn "$f" "$cuda/lib64/"; done
    for lib in cudart:13 cublas:13 cublasLt:13 nvrtc:13 nvJitLink:13 curand:10; do
        ln -sfn "lib${lib%%:*}.so.${lib##*:}" "$cuda/lib64/lib${lib%%:*}.so"
    done
    # The driver API's link-time stub: every cu* function cuda.h declares, the profiler's
    # three, and every name cudarc's driver bindings import (when its source is downloaded).
    symbols="$(mktemp)"
    echo '#include <cuda.h>' | gcc -E -P -I"$cuda/include" -x c - |
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed -E 's/\s*\($//' >"$symbols"
    printf '%s\n' cuProfilerInitialize cuProfilerStart cuProfilerStop >>"$symbols"
    cargo fetch --locked >/dev/null 2>&1 || true
    for bindings in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.*/src/driver/sys/mod.rs; do
        # `|| true`: a cudarc version whose bindings declare no such name adds nothing.
        [ -f "$bindings" ] && { grep -ohE '\bfn cu[A-Za-z0-9_]+\(' "$bindings" || true; } |
            sed -E 's/^fn (cu[A-Za-z0-9_]+)\(/\1/' >>"$symbols"
    done
    sort -u "$symbols" | awk '{print "void " $1 "(void){}"}' >"$cuda/lib64/stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib64/stubs/libcuda.so" \
        "$cuda/lib64/stubs/libcuda_stub.c"
    rm -f "$symbols"
fi
"$prefix/cuda/bin/nvcc" --version | sed -n 4p >&2

say "building searchloop with the cuda feature for sm_$cap into target/cuda"
export PATH="$prefix/cuda/bin:$PATH" CUDA_ROOT="$prefix/cuda" CUDA_PATH="$prefix/cuda"
export CUDA_COMPUTE_CAP="$cap"
export LIBRARY_PATH="$prefix/cuda/lib64:$prefix/cuda/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
# RUSTFLAGS stays unset: it would replace .cargo/config.toml's target-cpu for the host code.
CARGO_TARGET_DIR=target/cuda cargo build --release --locked -p searchloop-cli --features cuda

out="target/cuda/searchloop-cuda-sm$cap"
strip -o "$out" target/cuda/release/searchloop
xz -6 -T2 -f -k "$out"
say "$(du -h "$out" | cut -f1) stripped, $(du -h "$out.xz" | cut -f1) compressed: $out.xz"
say "it needs libcudart.so.13, libcublas(Lt).so.13 and libcurand.so.10 on the GPU machine"
say "(a PyTorch cu13 environment has them) and the driver's libcuda.so.1"
echo "$out.xz"
