//! Decode benchmark of the mistral.rs serving policy against llama.cpp on the same GGUF files.
//!
//! For each weights encoding (original, q8_0, q4_0, f32) a child process loads the model and
//! measures batch-1 decoding, a group of 8 samples, prompt processing and its peak RSS, and
//! scores a fixed text so the encodings' log-probabilities can be compared with the original's.
//! llama.cpp (llama-cpp-python, same thread count) then decodes the same file. Prints figures
//! only; nothing is asserted about speed.
//!
//! ```text
//! cargo bench -p searchloop-model-mistralrs --bench decode -- \
//!     [--model PATH] [--weights original,q8_0,q4_0,f32] [--tokens 128] [--threads 2] \
//!     [--python .cache/llama-venv/bin/python]
//! ```
//!
//! `scripts/bench-decode.sh` installs llama-cpp-python into a cached virtual environment and
//! runs this. Without a Python that has `llama_cpp`, the llama.cpp columns are left empty.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use searchloop_core::{Policy, SamplingParams};
use searchloop_model_mistralrs::{MistralRsConfig, MistralRsPolicy, WeightsEncoding};
use serde_json::{Value, json};

/// A prompt the model continues as plain text, so end-of-sequence is rare.
const DECODE_PROMPT: &str = "The history of the Roman Empire begins with";

/// Scored under every encoding to measure how far its log-probabilities move from the original.
const QUALITY_TEXT: &str = "Customer: Do you have the Trailblazer 40L hiking backpack in green, and is it waterproof? \
Assistant: Yes, the Trailblazer 40L comes in green, grey and orange. Its shell is water resistant \
and it ships with a rain cover, so your gear stays dry in heavy rain. It costs 89 dollars.";

/// Repeated to make the long prompt for measuring prompt processing.
const LONG_PROMPT_UNIT: &str = "Our store sells backpacks, tents, sleeping bags and stoves for hikers. \
Every product page lists the weight, the price, the colours in stock and the warranty. ";

struct Args {
    model: PathBuf,
    encodings: Vec<WeightsEncoding>,
    tokens: usize,
    threads: usize,
    python: Option<PathBuf>,
    child: Option<WeightsEncoding>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn parse_args() -> Result<Args> {
    let default_model = std::env::var_os("SEARCHLOOP_MODEL")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| {
                Path::new(&home).join(".cache/searchloop/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            })
        })
        .context("neither SEARCHLOOP_MODEL nor HOME is set")?;
    let default_python = workspace_root().join(".cache/llama-venv/bin/python");
    let mut args = Args {
        model: default_model,
        encodings: vec![
            WeightsEncoding::Original,
            WeightsEncoding::Q8_0,
            WeightsEncoding::Q4_0,
            WeightsEncoding::F32,
        ],
        tokens: 128,
        threads: 2,
        python: default_python.is_file().then_some(default_python),
        child: None,
    };
    let mut raw = std::env::args().skip(1);
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value()?),
            "--weights" => {
                args.encodings = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--tokens" => args.tokens = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--python" => args.python = Some(PathBuf::from(value()?)),
            "--child" => args.child = Some(value()?.parse()?),
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    let model = args.model.canonicalize();
    args.model = model.with_context(|| format!("model {}", args.model.display()))?;
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    match args.child {
        Some(encoding) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(measure(&args, encoding))?;
            println!("{report}");
            Ok(())
        }
        None => compare(&args),
    }
}

/// Peak resident set size of this process in MiB (VmHWM).
fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM line")?
        .parse()?;
    Ok(kib / 1024.0)
}

fn sampling(max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        max_tokens,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// Seconds of the fastest of `runs` calls of `f`, and its last output.
async fn best_of<T, F: std::future::Future<Output = Result<T>>>(
    runs: usize,
    mut f: impl FnMut() -> F,
) -> Result<(f64, T)> {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        let output = f().await?;
        best = best.min(started.elapsed().as_secs_f64());
        last = Some(output);
    }
    Ok((best, last.context("no run")?))
}

/// Decode tokens per second for `n` samples: the time of `tokens` new tokens minus the time of
/// one (which carries the same prompt processing), over the tokens decoded in between.
async fn decode_rate(
    policy: &MistralRsPolicy,
    prompt: &[u32],
    tokens: usize,
    n: usize,
    seed: u64,
) -> Result<f64> {
    // A group takes eight times as long; one run of it is steady enough.
    let runs = if n == 1 { 3 } else { 1 };
    let (first, _) = best_of(runs, || async {
        Ok(policy.sample(prompt, &sampling(1, seed), n).await?)
    })
    .await?;
    let (full, samples) = best_of(runs, || async {
        Ok(policy.sample(prompt, &sampling(tokens, seed), n).await?)
    })
    .await?;
    let decoded: usize = samples
        .iter()
        .map(|s| s.tokens.len().saturating_sub(1))
        .sum();
    Ok(decoded as f64 / (full - first))
}

/// A seed whose batch-1 sample runs to `tokens` without end-of-sequence, so every encoding is
/// timed over the full length.
async fn full_length_seed(policy: &MistralRsPolicy, prompt: &[u32], tokens: usize) -> Result<u64> {
    for seed in 0..64 {
        let sample = &policy.sample(prompt, &sampling(tokens, seed), 1).await?[0];
        if sample.tokens.len() == tokens {
            return Ok(seed);
        }
    }
    bail!("no seed in 0..64 decodes {tokens} tokens without end-of-sequence")
}

async fn measure(args: &Args, encoding: WeightsEncoding) -> Result<Value> {
    // The prefix cache is off by default, so every measured request prefills its own prompt.
    let mut config = MistralRsConfig::new(&args.model);
    config.weights = encoding;
    let started = Instant::now();
    let policy = MistralRsPolicy::load(&config).await?;
    let load_seconds = started.elapsed().as_secs_f64();

    let prompt = policy.tokenize(DECODE_PROMPT)?;
    policy.sample(&prompt, &sampling(8, 0), 1).await?;
    let seed = full_length_seed(&policy, &prompt, args.tokens).await?;
    let batch1 = decode_rate(&policy, &prompt, args.tokens, 1, seed).await?;
    let group8 = decode_rate(&policy, &prompt, args.tokens, 8, seed).await?;

    let long_prompt = policy.tokenize(&LONG_PROMPT_UNIT.repeat(12))?;
    let (prefill, _) = best_of(3, || async {
        Ok(policy.sample(&long_prompt, &sampling(1, 0), 1).await?)
    })
    .await?;

    let text = policy.tokenize(QUALITY_TEXT)?;
    let mut logprobs = Vec::with_capacity(text.len());
    for position in 1..text.len() {
        let logits = policy.next_token_logits(&text[..position]).await?;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_total = logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        logprobs.push(logits[text[position] as usize] as f64 - log_total);
    }

    Ok(json!({
        "encoding": encoding.as_str(),
        "weights_path": policy.weights_path(),
        "load_seconds": load_seconds,
        "decode_tokens": args.tokens,
        "batch1_tok_s": batch1,
        "group8_tok_s": group8,
        "prompt_tokens": long_prompt.len(),
        "prompt_tok_s": long_prompt.len() as f64 / prefill,
        "peak_rss_mib": peak_rss_mib()?,
        "quality_logprobs": logprobs,
    }))
}

fn run_child(args: &Args, encoding: WeightsEncoding) -> Result<Value> {
    let output = Command::new(std::env::current_exe()?)
        .args([
            "--child",
            encoding.as_str(),
            "--tokens",
            &args.tokens.to_string(),
        ])
        .arg("--model")
        .arg(&args.model)
        .env("RAYON_NUM_THREADS", args.threads.to_string())
        .output()?;
    if !output.status.success() {
        bail!(
            "the {encoding} run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8(output.stdout)?;
    let last = stdout.lines().last().context("the child printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

fn run_llama_cpp(args: &Args, python: &Path, model: &Path) -> Result<Value> {
    let long_prompt =
        std::env::temp_dir().join(format!("searchloop-long-prompt-{}.txt", std::process::id()));
    std::fs::write(&long_prompt, LONG_PROMPT_UNIT.repeat(12))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/llama_cpp_decode.py");
    let output = Command::new(python)
        .arg(script)
        .arg(model)
        .args(["--threads", &args.threads.to_string()])
        .args(["--tokens", &args.tokens.to_string()])
        .args(["--prompt", DECODE_PROMPT])
        .arg("--long-prompt-file")
        .arg(&long_prompt)
        .output()?;
    std::fs::remove_file(&long_prompt)?;
    if !output.status.success() {
        bail!(
            "llama.cpp failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8(output.stdout)?;
    let last = stdout.lines().last().context("llama.cpp printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

fn number(value: &Value, key: &str) -> f64 {
    value[key].as_f64().unwrap_or(f64::NAN)
}

fn compare(args: &Args) -> Result<()> {
    println!(
        "model {} | {} new tokens | {} threads | prompt {:?}",
        args.model.display(),
        args.tokens,
        args.threads,
        DECODE_PROMPT
    );
    let mut reference: Option<Vec<f64>> = None;
    println!(
        "{:<9} {:>10} {:>10} {:>11} {:>9} {:>10} {:>10} {:>7} {:>11}",
        "weights",
        "b1 tok/s",
        "g8 tok/s",
        "pp tok/s",
        "RSS MiB",
        "llama b1",
        "llama pp",
        "ratio",
        "mean|Δlp|"
    );
    for &encoding in &args.encodings {
        let report = run_child(args, encoding)?;
        let logprobs: Vec<f64> = report["quality_logprobs"]
            .as_array()
            .map(|values| values.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        if encoding == WeightsEncoding::Original {
            reference = Some(logprobs.clone());
        }
        let drift = reference.as_ref().map(|reference| {
            reference
                .iter()
                .zip(&logprobs)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>()
                / reference.len().max(1) as f64
        });
        let weights_path = PathBuf::from(report["weights_path"].as_str().unwrap_or_default());
        let llama = match &args.python {
            Some(python) => match run_llama_cpp(args, python, &weights_path) {
                Ok(value) => Some(value),
                Err(err) => {
                    eprintln!("llama.cpp on {}: {err:#}", weights_path.display());
                    None
                }
            },
            None => None,
        };
        let (llama_b1, llama_pp) = llama.as_ref().map_or((f64::NAN, f64::NAN), |l| {
            (number(l, "decode_tok_s"), number(l, "prompt_tok_s"))
        });
        println!(
            "{:<9} {:>10.1} {:>10.1} {:>11.1} {:>9.0} {:>10.1} {:>10.1} {:>7.2} {:>11}",
            encoding.as_str(),
            number(&report, "batch1_tok_s"),
            number(&report, "group8_tok_s"),
            number(&report, "prompt_tok_s"),
            number(&report, "peak_rss_mib"),
            llama_b1,
            llama_pp,
            number(&report, "batch1_tok_s") / llama_b1,
            drift.map_or("n/a".to_string(), |d| format!("{d:.4}")),
        );
    }
    if args.python.is_none() {
        println!(
            "llama.cpp columns are empty: pass --python with llama-cpp-python installed (scripts/bench-decode.sh does)"
        );
    }
    println!(
        "b1/g8: decode tok/s at batch 1 / summed over a group of 8 samples; pp: prompt tok/s over a long prompt; ratio: mistral.rs b1 / llama.cpp b1 on the same file; mean|Δlp|: mean absolute change of the next-token natural-log probability against the original file over a fixed {}-byte text",
        QUALITY_TEXT.len()
    );
    Ok(())
}
