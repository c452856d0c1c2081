//! One rollout + train round on the embedded model: G episodes for each of P train questions of
//! the retail data set, sampled through the agent with the real serving policy (mistral.rs, f32
//! weights) and the catalog tool, then one GRPO + SAPO training pass over them.
//!
//! Prints seconds per optimizer step, training and sampling tokens/s, peak RSS, the FLOPs of a
//! step and candle's measured matmul rate on this machine. Nothing is asserted.
//!
//! ```text
//! cargo bench -p searchloop-learn --bench round -- [--model PATH] [--group-size 8] \
//!     [--prompts 4] [--threads N] [--dump-batch FILE]
//! ```
//!
//! `--dump-batch` writes the trained sequences (ids, masks, behaviour log-probs, rewards,
//! groups) as JSON, so `benches/torch_peer.py` can train a PyTorch + PEFT peer on exactly the
//! same batch. `--train-batch FILE` trains on such a file alone, in a process without the
//! serving model, so its peak RSS compares with the peer's:
//!
//! ```text
//! cargo bench -p searchloop-learn --bench round -- --train-batch FILE [--threads N] \
//!     [--micro-batch-tokens N]
//! ```
//!
//! `--micro-batch-tokens N` cuts micro-batches by packed length instead of two sequences each
//! (the peer's setting); the mini-batches and the result are the same.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Instant,
};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use searchloop_core::{Agent, AgentConfig, PolicySlot, ToolRegistry, TrajectorySink};
use searchloop_demo::retail::{self, GeneratorConfig};
use searchloop_learn::{GroupSource, RoundConfig, RoundContext, RoundObserver, run_round_observed};
use searchloop_llama::{GgufFile, Llama, LlamaConfig, LoraAdapter, LoraConfig};
use searchloop_model_mistralrs::{MistralRsConfig, MistralRsPolicy, WeightsEncoding};
use searchloop_search_tantivy::{
    CatalogIndex, CatalogSearchTool, CatalogSource, CatalogToolConfig,
};
use searchloop_store_sql::{Page, Store, TrajectoryFilter};
use searchloop_train_sapo::{StepMetrics, TrainSequence, Trainer, TrainerConfig};
use serde_json::json;

struct Args {
    model: PathBuf,
    group_size: usize,
    prompts: usize,
    threads: usize,
    dump_batch: Option<PathBuf>,
    train_batch: Option<PathBuf>,
    micro_batch_tokens: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: std::env::var_os("SEARCHLOOP_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(&std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/searchloop/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            }),
        group_size: 8,
        prompts: 4,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        dump_batch: None,
        train_batch: None,
        micro_batch_tokens: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value()?),
            "--group-size" => args.group_size = value()?.parse()?,
            "--prompts" => args.prompts = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--dump-batch" => args.dump_batch = Some(PathBuf::from(value()?)),
            "--train-batch" => args.train_batch = Some(PathBuf::from(value()?)),
            "--micro-batch-tokens" => args.micro_batch_tokens = value()?.parse()?,
            // cargo bench passes --bench.
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        args.model.is_file(),
        "the model is missing at {}: run `searchloop model fetch` or set SEARCHLOOP_MODEL",
        args.model.display()
    );
    Ok(args)
}

/// Resident and peak resident memory of this process, in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// candle's f32 matmul rate on shapes like the model's MLP, on `threads` threads, in GFLOP/s.
fn matmul_gflops(threads: usize) -> Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| {
        let (m, k, n) = (512, 576, 1536);
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
        a.matmul(&b)?;
        let reps = 40;
        let started = Instant::now();
        for _ in 0..reps {
            a.matmul(&b)?;
        }
        Ok(2.0 * (m * k * n * reps) as f64 / started.elapsed().as_secs_f64() / 1e9)
    })
}

/// Records when training started and when each step ended.
#[derive(Default)]
struct Clock {
    training_started: Mutex<Option<Instant>>,
    steps: Mutex<Vec<(Instant, StepMetrics)>>,
}

impl RoundObserver for Clock {
    fn rollouts(&self, done: usize, total: usize) {
        eprintln!("  sampled {done}/{total} episodes");
    }

    fn training(&self, planned_steps: usize, sequences: usize) {
        eprintln!("  training: up to {planned_steps} steps on {sequences} sequences");
        if let Ok(mut t) = self.training_started.lock() {
            *t = Some(Instant::now());
        }
    }

    fn step(&self, metrics: &StepMetrics) {
        eprintln!("  step {} done", metrics.step);
        if let Ok(mut s) = self.steps.lock() {
            s.push((Instant::now(), metrics.clone()));
        }
    }
}

/// FLOPs of one forward + backward pass over a sequence of `t` tokens, with frozen weights
/// (the backward forms input gradients only) and LoRA of `rank` on `lora_targets` projections
/// per layer (given as their (in, out) widths).
fn train_flops(c: &LlamaConfig, t: f64, rank: f64, lora_targets: &[(usize, usize)]) -> f64 {
    let d = c.hidden_size as f64;
    let layer_params = d * (c.q_dim() + 2 * c.kv_dim()) as f64
        + c.q_dim() as f64 * d
        + 3.0 * d * c.ffn_hidden as f64;
    let linear =
        2.0 * t * layer_params * c.n_layer as f64 + 2.0 * (t - 1.0) * c.vocab_size as f64 * d;
    // Scores and the weighted sum over the full (masked) t×t matrix, per head.
    let attention = 4.0 * t * t * c.q_dim() as f64 * c.n_layer as f64;
    let lora: f64 = lora_targets
        .iter()
        .map(|&(i, o)| 2.0 * t * rank * (i + o) as f64)
        .sum::<f64>()
        * c.n_layer as f64;
    // Backward: input gradients of every linear (as much as the forward), both operands of
    // the two attention products (twice the forward), and LoRA's input and weight gradients.
    (linear + attention + lora) + (linear + 2.0 * attention + 2.0 * lora)
}

/// The trainer settings of the benchmark: one epoch, mini-batches of 8, micro-batches of 2
/// sequences or of `micro_batch_tokens` packed tokens.
fn bench_trainer(micro_batch_tokens: usize) -> TrainerConfig {
    TrainerConfig {
        ppo_epochs: 1,
        mini_batch_size: 8,
        micro_batch_size: 2,
        micro_batch_tokens,
        ..RoundConfig::default().trainer
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(batch) = &args.train_batch {
        return train_only(&args, batch);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let dataset = retail::generate(&GeneratorConfig::default());
    let files = dataset.write_to(&data)?;
    // Catalog questions only: the benchmark serves the catalog tool alone.
    let questions = work.path().join("questions.jsonl");
    let lines: Vec<String> = dataset
        .questions
        .iter()
        .filter(|q| q.split == retail::Split::Train && q.kind.tools() == [retail::TOOL_CATALOG])
        .map(serde_json::to_string)
        .collect::<std::result::Result<_, _>>()?;
    std::fs::write(&questions, lines.join("\n"))?;
    let index = CatalogIndex::create_or_open(work.path().join("index"))?;
    index.rebuild(&[CatalogSource::from_path(files.catalog_jsonl.clone())?])?;
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(CatalogSearchTool::with_config(
        Arc::new(index),
        CatalogToolConfig::default(),
    )))?;

    eprintln!("loading {} (f32 weights)…", args.model.display());
    let load_started = Instant::now();
    let policy = MistralRsPolicy::load(&MistralRsConfig {
        weights: WeightsEncoding::F32,
        reencoded_dir: Some(work.path().to_path_buf()),
        ..MistralRsConfig::new(&args.model)
    })
    .await?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let store =
        Arc::new(Store::open(work.path().join("store.db").to_str().context("path")?).await?);
    let agent = Agent::new(
        Arc::new(PolicySlot::new(Arc::new(policy))),
        Arc::new(tools),
        AgentConfig::default(),
    )?
    .with_sink(Arc::clone(&store) as Arc<dyn TrajectorySink>);

    let gflops = matmul_gflops(args.threads)?;
    let config = RoundConfig {
        trainer: bench_trainer(args.micro_batch_tokens),
        group_size: args.group_size,
        prompts_per_round: args.prompts,
        source: GroupSource::Replay,
        threads: args.threads,
        prompts: Some(questions),
        ..RoundConfig::default()
    };
    let (rss_before, _) = memory_mib();
    let cancel = AtomicBool::new(false);
    let adapters = work.path().join("adapters");
    let ctx = RoundContext {
        agent: &agent,
        store: &store,
        base_gguf: &args.model,
        parent: None,
        parent_adapter_dir: None,
        adapters_dir: &adapters,
        cancel: &cancel,
    };
    let clock = Clock::default();
    let out = run_round_observed(&ctx, &config, &clock).await?;
    let (_, peak) = memory_mib();

    // The trained sequences, read back from the store (the round's replay episodes).
    let listed = store
        .list_trajectories(&TrajectoryFilter::default(), &Page::first(1000))
        .await?;
    let mut lengths = Vec::new();
    let mut dump = Vec::new();
    for summary in &listed.items {
        if let Some(t) = store.get_trajectory(&summary.id).await? {
            lengths.push(t.tokens.len() as f64);
            dump.push(json!({
                "tokens": t.tokens,
                "mask": t.loss_mask(),
                "logprobs": t.logprobs,
                "reward": summary.reward.unwrap_or(0.0),
                "group": t.group_id.unwrap_or_default(),
                "temperature": t.sampling.temperature,
            }));
        }
    }
    if let Some(path) = &args.dump_batch {
        std::fs::write(path, serde_json::to_string(&dump)?)?;
        eprintln!("batch written to {}", path.display());
    }
    let model_config = GgufFile::open(&args.model)?.config()?;
    let targets: Vec<(usize, usize)> = config
        .lora
        .targets
        .iter()
        .map(|m| m.in_out(&model_config))
        .collect();
    let flops: f64 = lengths
        .iter()
        .map(|&t| train_flops(&model_config, t, config.lora.rank as f64, &targets))
        .sum();
    let s = &out.summary;
    let steps = clock.steps.lock().map(|s| s.clone()).unwrap_or_default();
    let started = clock
        .training_started
        .lock()
        .ok()
        .and_then(|t| *t)
        .context("training never started")?;
    let step_seconds = steps.last().map_or(f64::NAN, |(end, _)| {
        end.duration_since(started).as_secs_f64()
    });
    let n_steps = steps.len().max(1) as f64;
    let trained_tokens: f64 = lengths.iter().sum();
    let result = json!({
        "episodes": s.rollout_episodes,
        "generated_tokens": s.rollout_tokens,
        "rollout_seconds": s.rollout_seconds,
        "rollout_generated_tok_per_s": s.rollout_tokens as f64 / s.rollout_seconds,
        "sequences": s.batch.sequences,
        "sequence_len_mean": s.batch.sequence_len_mean,
        "groups": s.batch.groups,
        "zero_std_groups": s.batch.zero_std_groups,
        "steps": steps.len(),
        "seconds_per_step": step_seconds / n_steps,
        "train_tokens_per_s": trained_tokens / step_seconds,
        "round_train_seconds": s.train_seconds,
        "flops_per_step": flops / n_steps,
        "achieved_gflops": flops / step_seconds / 1e9,
        "matmul_gflops": gflops,
        "rss_before_round_mib": rss_before,
        "peak_rss_mib": peak,
        "model_load_seconds": load_seconds,
        "threads": args.threads,
        "logprob_gap": s.logprob_gap,
        "logprob_gap_max": s.logprob_gap_max,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    println!(
        "\n| G × prompts | episodes | generated tok | rollout s | rollout tok/s | steps | s/step | \
         train tok/s | GFLOP/step | achieved GFLOP/s | matmul GFLOP/s | peak RSS MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n\
         | {} × {} | {} | {} | {:.1} | {:.1} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
        args.group_size,
        args.prompts,
        s.rollout_episodes,
        s.rollout_tokens,
        s.rollout_seconds,
        s.rollout_tokens as f64 / s.rollout_seconds,
        steps.len(),
        step_seconds / n_steps,
        trained_tokens / step_seconds,
        flops / n_steps / 1e9,
        flops / step_seconds / 1e9,
        gflops,
        peak
    );
    store.close().await;
    Ok(())
}

/// Trains on a dumped batch with the round's trainer settings, without the serving model.
fn train_only(args: &Args, batch: &Path) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Dumped {
        tokens: Vec<u32>,
        mask: Vec<bool>,
        logprobs: Vec<f32>,
        reward: f64,
        group: String,
        temperature: f32,
    }
    let dumped: Vec<Dumped> = serde_json::from_str(&std::fs::read_to_string(batch)?)?;
    let sequences: Vec<TrainSequence> = dumped
        .into_iter()
        .map(|d| TrainSequence {
            tokens: d.tokens,
            loss_mask: d.mask,
            behaviour_logprobs: d.logprobs,
            reward: d.reward,
            group_id: d.group,
            baseline: None,
            adapter_version: None,
            temperature: f64::from(d.temperature),
            demonstration: false,
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?;
    let (rss_start, _) = memory_mib();
    pool.install(|| -> Result<()> {
        let load_started = Instant::now();
        let model = Llama::load(&args.model, &Device::Cpu, DType::F32)?;
        let model_config = model.config().clone();
        let lora = LoraConfig::default();
        let adapter = LoraAdapter::new(lora.clone(), &model_config, &Device::Cpu, DType::F32)?;
        let mut trainer = Trainer::new(model, adapter, bench_trainer(args.micro_batch_tokens))?;
        let load_seconds = load_started.elapsed().as_secs_f64();
        let (rss_loaded, _) = memory_mib();
        let started = Instant::now();
        let report = trainer.train(&sequences)?;
        let seconds = started.elapsed().as_secs_f64();
        let (_, peak) = memory_mib();
        let targets: Vec<(usize, usize)> = lora
            .targets
            .iter()
            .map(|m| m.in_out(&model_config))
            .collect();
        // Every sequence of a trained group goes through one forward and backward pass.
        let trained: Vec<f64> = sequences.iter().map(|s| s.tokens.len() as f64).collect();
        let kept = report.trained_sequences as f64 / sequences.len().max(1) as f64;
        let flops = kept
            * trained
                .iter()
                .map(|&t| train_flops(&model_config, t, lora.rank as f64, &targets))
                .sum::<f64>();
        let tokens = kept * trained.iter().sum::<f64>();
        let steps = report.steps.len().max(1) as f64;
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "engine": "searchloop (candle)",
                "threads": args.threads,
                "micro_batch_tokens": args.micro_batch_tokens,
                "sequences": report.trained_sequences,
                "steps": report.steps.len(),
                "seconds_per_step": seconds / steps,
                "train_tokens_per_s": tokens / seconds,
                "flops_per_step": flops / steps,
                "achieved_gflops": flops / seconds / 1e9,
                "matmul_gflops": matmul_gflops(args.threads)?,
                "rss_start_mib": rss_start,
                "rss_after_load_mib": rss_loaded,
                "peak_rss_mib": peak,
                "model_load_seconds": load_seconds,
            }))?
        );
        Ok(())
    })
}
