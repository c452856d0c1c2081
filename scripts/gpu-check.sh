#!/usr/bin/env bash
# One measuring run of the `cuda` build on a lent GPU machine, sized for a 15-minute lease.
#
#   scripts/gpu-check.sh pack [CAP]   # here: split the model and the binary into .gpu/call1, .gpu/call2
#   scripts/gpu-check.sh receive      # device call 1 (carry .gpu/call1): keep the model's first part
#   scripts/gpu-check.sh run          # device call 2 (carry .gpu/call2): the whole check
#   scripts/gpu-check.sh dry-run      # here, on the CPU: the same steps with the CPU build, tiny sizes
#
# A device call carries at most 64 MiB and the lent machine has no Rust toolchain and no
# network, so the stripped, xz-compressed binary from scripts/build-cuda.sh and the embedded
# model (98 MB) travel in two calls; files outside $OUT stay on the machine while it is warm.
# The machine's PyTorch environment provides the CUDA 13 libraries; the binary needs no others.
#
# `run` measures, each step under its own timeout and going on when one fails:
#   1. a demo episode on the GPU (f32 weights);
#   2. held-out evaluation with f32, the file's Q4_1 and Q8_0 weights, and the mistral.rs engine;
#   3. a replay group round (16 prompts × 8 episodes) and its training;
#   4. the HTTP server under 1 and 8 concurrent askers on the same questions (the issue's
#      serving target is their ratio), then 16 and 64;
#   5. `searchloop learn`'s GPU profile (SAPO and GRPO, 3 seeds), in the time that is left.
# Everything goes to $OUT/log, step times to $OUT/steps.tsv, and the learning report to
# $OUT/learn. `dry-run` runs the same script on this machine's CPU build with tiny sizes, so a
# lent session spends its minutes measuring rather than debugging.
set -uo pipefail

mode="${1:-}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
say() { echo "gpu-check.sh: $*" >&2; }
# The model's first part: what fits one call beside the working tree.
first_part_bytes=$((60 * 1024 * 1024))

case "$mode" in
pack)
    cap="${2:-90}"
    binary="$repo/target/cuda/searchloop-cuda-sm$cap.xz"
    [ -f "$binary" ] || { say "no $binary: run scripts/build-cuda.sh $cap first"; exit 1; }
    model="${SEARCHLOOP_MODEL:-$("$repo/target/release/searchloop" model fetch 2>/dev/null | tail -1)}"
    [ -f "$model" ] || { say "cannot find the embedded model (set SEARCHLOOP_MODEL, or build the CLI)"; exit 1; }
    rm -rf "$repo/.gpu" && mkdir -p "$repo/.gpu/call1" "$repo/.gpu/call2"
    head -c "$first_part_bytes" "$model" >"$repo/.gpu/call1/model.part1"
    tail -c +$((first_part_bytes + 1)) "$model" >"$repo/.gpu/call2/model.part2"
    sha256sum "$model" | cut -d' ' -f1 >"$repo/.gpu/call2/model.sha256"
    cp "$binary" "$repo/.gpu/call2/searchloop.xz"
    du -sh "$repo/.gpu/call1" "$repo/.gpu/call2" >&2
    say "now: run 'scripts/gpu-check.sh receive' carrying .gpu/call1, then at once"
    say "'scripts/gpu-check.sh run' carrying .gpu/call2"
    exit 0
    ;;
receive)
    mkdir -p /root/gpu && cp "$repo/.gpu/call1/model.part1" /root/gpu/ && ls -la /root/gpu
    exit $?
    ;;
run)
    work=/root/gpu
    [ -n "${OUT:-}" ] || { say "OUT is not set (the device tool sets it)"; exit 2; }
    device=cuda:0
    nv="$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia 2>/dev/null | head -1)"
    export LD_LIBRARY_PATH="$nv/cu13/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # Sizes of the real run.
    demo_questions=12 eval_questions=32 prompts=16 group=8 asks=64 learn_seeds=3 learn_eval=64
    learn_generalization=32 warm_start=64 budget_s=560
    ;;
dry-run)
    work="$(mktemp -d)"
    export OUT="${OUT:-$work/out}"
    mkdir -p "$OUT"
    device=cpu
    demo_questions=2 eval_questions=2 prompts=2 group=2 asks=4 learn_seeds=1 learn_eval=2
    learn_generalization=2 warm_start=2 budget_s=600
    ;;
*)
    sed -n '2,7p' "$0" >&2
    exit 2
    ;;
esac

exec > >(tee -a "$OUT/log") 2>&1
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
steps="$OUT/steps.tsv"
printf 'step\tseconds\texit\n' >"$steps"
# `step NAME TIMEOUT COMMAND...`: runs one measurement under a timeout, logs its time and status.
step() {
    local name="$1" limit="$2" t0 rc
    shift 2
    echo
    echo "== [$(elapsed)s] $name"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    awk -v name="$name" -v t0="$t0" -v t1="$(date +%s.%N)" -v rc="$rc" \
        'BEGIN { printf "%s\t%.1f\t%d\n", name, t1 - t0, rc }' >>"$steps"
    return 0
}

mkdir -p "$work" && cd "$work" || exit 1
if [ "$mode" = run ]; then
    cat /root/gpu/model.part1 "$repo/.gpu/call2/model.part2" >model.gguf || exit 1
    if [ "$(sha256sum model.gguf | cut -d' ' -f1)" != "$(cat "$repo/.gpu/call2/model.sha256")" ]; then
        say "the reassembled model does not match its checksum"
        exit 1
    fi
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open('searchloop', 'wb'))" \
        "$repo/.gpu/call2/searchloop.xz" && chmod +x searchloop || exit 1
    bin="$work/searchloop"
    export SEARCHLOOP_MODEL="$work/model.gguf"
    ldd "$bin" | grep -E "not found|cuda|cublas|curand"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
else
    bin="$repo/target/release/searchloop"
    [ -x "$bin" ] || { say "no CPU build: cargo build --release -p searchloop-cli"; exit 1; }
fi
ws="$work/ws"

step "prepare the retail work folder (CPU)" 300 "$bin" demo --workdir "$ws" --questions 0
config="$ws/searchloop.toml"
# One config per weight encoding and engine; the help center is only served by demo and learn,
# so evaluations here score the help tool's questions as failed calls, alike for every variant.
variant() {
    local name="$1" engine="$2" weights="$3"
    sed "s/^\[model\]$/[model]\nengine = \"$engine\"\nweights = \"$weights\"/" "$config" >"$ws/$name.toml"
    printf '\n[learn.eval]\nset = "data/questions.jsonl"\n' >>"$ws/$name.toml"
}
variant f32 candle f32
variant q4_1 candle original
variant q8_0 candle q8_0
variant mistralrs mistralrs f32

step "demo, $demo_questions questions, f32" 120 "$bin" --device "$device" demo --workdir "$ws" --questions "$demo_questions"
for v in f32 q4_1 q8_0 mistralrs; do
    step "eval $eval_questions held-out, $v" 75 "$bin" --config "$ws/$v.toml" --device "$device" eval --questions "$eval_questions"
done
# The f32 round at full size; the Q4_1 round at half, for its sampler/trainer gap.
for v in f32 q4_1; do
    n=$prompts
    [ "$v" = q4_1 ] && n=$(((prompts + 1) / 2))
    step "replay round $n x $group + training, $v" 120 "$bin" --config "$ws/$v.toml" --device "$device" \
        train --once --from-base --source replay --prompts "$n" --group-size "$group" --steps 4 --lr 2e-4
done

# The server under concurrent askers, in a steady load: each asker takes the next question when
# its answer is in. One asker and then eight ask the same 16 questions with the same seed, so
# they do the same episodes and their ratio is the issue's serving target; each of the two
# passes gets a server of its own, since the second would otherwise find the first's episodes
# among its cached prefixes. The second server then takes 16 and 64 askers, the overload.
cat >"$work/ask.py" <<'PY'
import json, sys, time, urllib.request, concurrent.futures as cf
port, path, first, count, askers = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
questions = [json.loads(line)["question"] for line in open(path)]
asked = questions[first : first + count]
def ask(q):
    body = json.dumps({"question": q, "seed": 1}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/ask", body, {"content-type": "application/json"})
    t = time.time()
    try:
        urllib.request.urlopen(req, timeout=200).read()
        return time.time() - t, True
    except Exception as e:
        print("ask failed:", e)
        return time.time() - t, False
t0 = time.time()
with cf.ThreadPoolExecutor(askers) as pool:
    results = list(pool.map(ask, asked))
wall = time.time() - t0
lat = sorted(r[0] for r in results)
ok = sum(r[1] for r in results)
print(f"askers {askers}: {len(results)} asks ({ok} ok) in {wall:.1f} s = {len(results) / wall:.2f} req/s, "
      f"p50 {lat[len(lat) // 2]:.2f} s, max {lat[-1]:.2f} s", flush=True)
print(f"{askers}\t{len(results) / wall:.4f}\t{lat[len(lat) // 2]:.4f}", file=open(sys.argv[6], "a"))
PY
port=18093
serve() {
    "$bin" --config "$ws/f32.toml" --device "$device" serve --bind "127.0.0.1:$port" >>"$OUT/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=2)" 2>/dev/null && break
        sleep 1
    done
    # One question outside the measured ones, so that the system prompt is cached for both passes.
    python3 "$work/ask.py" "$port" "$ws/data/questions.jsonl" "$asks" 1 1 /dev/null >/dev/null
}
unserve() {
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
}
rates="$OUT/askers.tsv"
same=$((asks < 16 ? asks : 16))
serve
step "HTTP 1 asker, $same questions" 100 python3 "$work/ask.py" "$port" "$ws/data/questions.jsonl" 0 "$same" 1 "$rates"
unserve
serve
step "HTTP 8 askers, the same $same questions" 60 python3 "$work/ask.py" "$port" "$ws/data/questions.jsonl" 0 "$same" 8 "$rates"
step "HTTP 16 askers, $((2 * same)) questions" 60 python3 "$work/ask.py" "$port" "$ws/data/questions.jsonl" 0 $((2 * same)) 16 "$rates"
step "HTTP 64 askers, $asks questions" 100 python3 "$work/ask.py" "$port" "$ws/data/questions.jsonl" 0 "$asks" 64 "$rates"
unserve
awk -F'\t' '$1 == 1 { r1 = $2; p1 = $3 } $1 == 8 { r8 = $2; p8 = $3 }
    END { if (r1 > 0 && p1 > 0) printf "8 askers against 1 on the same questions: %.2fx the req/s, p50 %.2fx\n", r8 / r1, p8 / p1 }' "$rates"
tail -3 "$OUT/serve.log"

# The learning benchmark's GPU profile in the time that is left: six runs, each starting with a
# warm start of worked solutions (64; 2 in a dry run), replaying single-hop, multi-hop and
# inventory questions (the CPU's best measured setting), and stopping its rounds at its share of
# the minutes.
left=$((budget_s - $(elapsed) - 30))
runs=$((2 * learn_seeds))
minutes=$(awk -v left="$left" -v runs="$runs" 'BEGIN { printf "%.2f", left / runs / 60 * 0.5 }')
echo "learn: ${left}s left, rounds start within ${minutes} min of each of $runs runs"
if [ "$left" -gt 60 ]; then
    step "learn sapo,grpo x $learn_seeds seeds" "$left" "$bin" --device "$device" learn --workdir "$work/learn" \
        --arms sapo,grpo --seeds "$learn_seeds" --rounds 20 --minutes "$minutes" --eval "$learn_eval" \
        --generalization "$learn_generalization" --prompts "$prompts" --group-size "$group" --threads 8 \
        --warm-start "$warm_start" --prompt-kinds inventory,single_hop,multi_hop \
        --out "$OUT/learn"
    # The runs' records, so that a report can be rebuilt even when the time ran out first.
    for run in "$work"/learn/runs/*/; do
        for f in rounds.jsonl run.json; do
            [ -f "$run$f" ] && cp "$run$f" "$OUT/learn-$(basename "$run")-$f"
        done
    done
fi
echo
echo "== [$(elapsed)s] done"
cat "$steps"
