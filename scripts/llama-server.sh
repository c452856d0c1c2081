#!/usr/bin/env bash
# Builds llama.cpp's `llama-server`, the episode-level serving peer, and prints its path.
#
#   scripts/llama-server.sh            # builds once into .cache/llama-server, then prints the binary
#
# The llama.cpp sources come from the llama-cpp-python sdist on PyPI (it vendors llama.cpp with
# `tools/server`), and cmake from its PyPI wheel, so nothing but the package registries is
# needed. A CPU build for this machine's instruction set; about ten minutes on two cores.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/llama-server"
llama_cpp_python_version=0.3.36
binary="$cache/build/bin/llama-server"

log() { echo "llama-server.sh: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi

if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
    log "a C/C++ compiler is missing; installing build-essential with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >&2
fi

mkdir -p "$cache"
if [ ! -x "$cache/venv/bin/cmake" ]; then
    log "installing cmake from PyPI into $cache/venv"
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install --quiet cmake ninja >&2
fi

sources="$cache/llama_cpp_python-$llama_cpp_python_version/vendor/llama.cpp"
if [ ! -f "$sources/CMakeLists.txt" ]; then
    log "downloading the llama-cpp-python $llama_cpp_python_version sdist"
    "$cache/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
        --dest "$cache" "llama-cpp-python==$llama_cpp_python_version" >&2
    tar -xzf "$cache/llama_cpp_python-$llama_cpp_python_version.tar.gz" -C "$cache"
fi
[ -f "$sources/tools/server/server.cpp" ] || {
    log "the sdist at $sources has no tools/server/server.cpp"
    exit 1
}

# Some virtual machines list the AMX instructions among the CPU's flags but do not enable their
# register state, so the first tile instruction stops the process (llama.cpp's AMX kernels run
# for Q4_1 matrices as soon as the native build includes them). A probe runs one tile
# instruction; where it fails, the build leaves AMX out and says so.
isa_flags=""
if grep -qw amx_tile /proc/cpuinfo; then
    probe="$cache/amx-probe"
    cat > "$probe.c" <<'PROBE'
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Asks the kernel for the tile data state, as llama.cpp does, then loads a tile configuration
   and zeroes a tile: an illegal instruction here is one in llama.cpp's AMX kernels too. */
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
        return 1;
    uint8_t config[64];
    memset(config, 0, sizeof config);
    config[0] = 1;
    config[16] = 64;
    config[48] = 16;
    _tile_loadconfig(config);
    _tile_zero(0);
    _tile_release();
    return 0;
}
PROBE
    if ! { cc -O1 -mamx-tile "$probe.c" -o "$probe" && "$probe"; } >/dev/null 2>&1; then
        log "the CPU lists AMX but cannot run its instructions here; building without AMX"
        isa_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
fi

log "building llama-server (CPU, native instruction set${isa_flags:+, without AMX})"
"$cache/venv/bin/cmake" -S "$sources" -B "$cache/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$cache/venv/bin/ninja" \
    -DCMAKE_C_FLAGS="$isa_flags" -DCMAKE_CXX_FLAGS="$isa_flags" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
"$cache/venv/bin/cmake" --build "$cache/build" --target llama-server -j "$(nproc)" >&2
echo "$binary"
