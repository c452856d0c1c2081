//! The Rust half of the FFI overhead benchmark: times `Agent::ask` called from Rust, through
//! the same `searchloop-ffi` API the Python half calls through the bindings
//! (`bindings/ffi/bench/ask_overhead.py` runs both and compares them).
//!
//! `cargo run --release -p searchloop-ffi --example ask_overhead -- CONFIG ASKS TURN_DELAY_MS`
//! prints one JSON line: `{"latencies_ms": [...]}`, one entry per timed ask.

use std::time::Instant;

use anyhow::Context;
use searchloop_ffi::{Agent, AgentOptions, ScriptedPolicyOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, asks, delay] = args.as_slice() else {
        anyhow::bail!("usage: ask_overhead CONFIG ASKS TURN_DELAY_MS");
    };
    let asks: usize = asks.parse().context("ASKS must be a whole number")?;
    anyhow::ensure!(asks > 0, "ASKS must be at least 1");
    let turn_delay_ms: u64 = delay
        .parse()
        .context("TURN_DELAY_MS must be a whole number")?;
    let options = AgentOptions {
        config_path: Some(config.clone()),
        ..AgentOptions::default()
    };
    let script = ScriptedPolicyOptions {
        answer: "scripted answer".into(),
        turn_delay_ms,
    };
    let agent = Agent::scripted(options, script, Vec::new())?;
    // The host's side of the call is a single-threaded executor awaiting the future, as
    // Python's event loop is on the other side.
    let executor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let question = "What colour is the Nova Tote?";
    // One warm-up ask opens the store's connections and the index readers.
    executor.block_on(agent.ask(question.to_string()))?;
    let mut latencies = Vec::with_capacity(asks);
    for _ in 0..asks {
        let started = Instant::now();
        executor.block_on(agent.ask(question.to_string()))?;
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    println!("{}", serde_json::json!({ "latencies_ms": latencies }));
    Ok(())
}
