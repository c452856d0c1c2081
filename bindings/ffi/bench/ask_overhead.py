"""The FFI overhead of `ask`: the same scripted episode timed from Python, through the
generated bindings, and from Rust, through the same `searchloop-ffi` API without crossing the
FFI (the `ask_overhead` example). The scripted policy has a fixed cost (`--turn-delay-ms`), so
the difference is the bindings' own: lowering and lifting the arguments and the answer, and
driving the Rust future from Python's event loop.

    scripts/bindings.sh
    cargo build --release -p searchloop-ffi --example ask_overhead
    target/release/searchloop demo --workdir searchloop-data --questions 0
    PYTHONPATH=target/bindings/python python3 bindings/ffi/bench/ask_overhead.py \
        --config searchloop-data/searchloop.toml

Both halves use the config's tools and store (each episode searches the catalog and is stored,
as in production); only the model is replaced.
"""

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import time

import searchloop

REPO = pathlib.Path(__file__).resolve().parents[3]
QUESTION = "What colour is the Nova Tote?"


def python_latencies(agent, asks):
    loop = asyncio.new_event_loop()
    # One warm-up ask, as in the Rust half.
    loop.run_until_complete(agent.ask(QUESTION))
    latencies = []
    for _ in range(asks):
        started = time.perf_counter()
        loop.run_until_complete(agent.ask(QUESTION))
        latencies.append((time.perf_counter() - started) * 1e3)
    loop.close()
    return latencies


def sync_call_us(agent, calls=20_000):
    """Microseconds of one synchronous round trip that returns a string (`model_id`)."""
    started = time.perf_counter()
    for _ in range(calls):
        agent.model_id()
    return (time.perf_counter() - started) / calls * 1e6


def summary(latencies):
    ordered = sorted(latencies)
    at = lambda q: ordered[min(int(len(ordered) * q), len(ordered) - 1)]  # noqa: E731
    return {"mean_ms": statistics.fmean(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99)}


def rust_latencies(binary, config, asks, turn_delay_ms):
    result = subprocess.run(
        [str(binary), config, str(asks), str(turn_delay_ms)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["latencies_ms"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a searchloop.toml with a catalog")
    parser.add_argument("--asks", type=int, default=200)
    parser.add_argument("--turn-delay-ms", type=int, default=0)
    parser.add_argument(
        "--rust-binary",
        default=str(REPO / "target/release/examples/ask_overhead"),
        help="the built ask_overhead example",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternate the two callers this many times, so a burst of load on the machine "
        "hits both",
    )
    args = parser.parse_args()
    options = searchloop.AgentOptions(config_path=args.config)
    script = searchloop.ScriptedPolicyOptions(turn_delay_ms=args.turn_delay_ms)
    agent = searchloop.Agent.scripted(options, script)
    latencies = {"rust": [], "python": []}
    for _ in range(args.rounds):
        latencies["rust"] += rust_latencies(
            args.rust_binary, args.config, args.asks, args.turn_delay_ms
        )
        latencies["python"] += python_latencies(agent, args.asks)
    rows = {caller: summary(values) for caller, values in latencies.items()}
    print(
        f"ask latency, scripted policy ({args.turn_delay_ms} ms per turn), "
        f"{args.rounds} x {args.asks} asks per caller"
    )
    print(f"{'caller':8} {'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9}")
    for caller, row in rows.items():
        print(f"{caller:8} {row['mean_ms']:9.3f} {row['p50_ms']:9.3f} {row['p99_ms']:9.3f}")
    for stat in ("mean_ms", "p50_ms"):
        overhead = rows["python"][stat] - rows["rust"][stat]
        print(f"FFI overhead of ask ({stat[:-3]}): {overhead * 1e3:.0f} µs")
    print(f"synchronous FFI round trip (model_id): {sync_call_us(agent):.1f} µs")


if __name__ == "__main__":
    main()
