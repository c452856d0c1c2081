//! What each policy loss and sampler correction adds to a training step, on the real model.
//!
//! Builds a batch shaped like a round's (groups of 8 episodes sharing a system prompt and a
//! question, each with two model turns around a masked tool observation), scores it once with
//! the base model for behaviour log-probs (plus a little noise, the sampler/trainer gap), then
//! trains a fresh adapter on it under each loss in turn with the round's trainer settings and
//! two PPO epochs, so that the second epoch is off-policy and every branch has work to do.
//! Configurations are interleaved over repetitions, so that a slow spell on a shared machine
//! hits all of them alike. Nothing is asserted.
//!
//! It prints, per configuration, the fastest and the median optimizer-step time (the first step
//! of each run is left out: it follows the recomputation of the behaviour log-probs), and the
//! time of one `policy_loss` evaluation with its backward pass alone on a micro-batch of the
//! trainer's shape (a whole mini-batch of 8 sequences fits in one packed micro-batch), each
//! also relative to plain GRPO. On a machine shared with other work the step times vary by tens
//! of percent from one step to the next; the loss's own time, a few hundredths of a millisecond
//! against seconds per step, is the figure such noise cannot blur.
//!
//! ```text
//! SEARCHLOOP_MODEL=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     cargo run --release -p searchloop-train-sapo --example loss_overhead -- [REPETITIONS]
//! ```

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use searchloop_llama::{Llama, LoraAdapter, LoraConfig};
use searchloop_train_sapo::{
    IsCorrection, LossConfig, LossKind, OldLogprobSource, PolicyLossInputs, TrainSequence, Trainer,
    TrainerConfig, policy_loss,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Tokens of the shared system prompt, a group's question, the two turns and the observation:
/// about 330 in all, like the training bench's episodes.
const SYSTEM: usize = 200;
const QUESTION: usize = 25;
const TURN_ONE: usize = 30;
const OBSERVATION: usize = 55;
const TURN_TWO: usize = 20;
const GROUPS: usize = 2;
const GROUP_SIZE: usize = 8;

/// The configurations measured: the kind, the correction and a label.
const CONFIGS: [(LossKind, IsCorrection, &str); 10] = [
    (LossKind::Grpo, IsCorrection::None, "grpo"),
    (LossKind::Sapo, IsCorrection::None, "sapo (default)"),
    (LossKind::Gspo, IsCorrection::None, "gspo"),
    (LossKind::Cispo, IsCorrection::None, "cispo"),
    (LossKind::Llds, IsCorrection::None, "llds"),
    (LossKind::Grpo, IsCorrection::Tis, "grpo + tis"),
    (LossKind::Grpo, IsCorrection::Icepop, "grpo + icepop"),
    (LossKind::Grpo, IsCorrection::Mis, "grpo + mis"),
    (LossKind::Grpo, IsCorrection::Geo, "grpo + geo"),
    (LossKind::Llds, IsCorrection::Tis, "llds + tis"),
];

fn main() -> Result<()> {
    let repetitions: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 2,
    };
    let path = std::env::var_os("SEARCHLOOP_MODEL").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/searchloop/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        },
        PathBuf::from,
    );
    let model = Llama::load(&path, &Device::Cpu, DType::F32)?;
    let batch = synthetic_batch(&model)?;
    let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
    eprintln!(
        "{} sequences, {tokens} tokens; {} configurations × {repetitions} repetitions",
        batch.len(),
        CONFIGS.len()
    );

    let mut step_seconds: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    for rep in 0..repetitions {
        for (c, &(kind, correction, label)) in CONFIGS.iter().enumerate() {
            let times = step_times(&model, &batch, config(kind, correction))?;
            eprintln!("  repetition {rep}: {label}: steps {times:.2?} s");
            step_seconds[c].extend(times);
        }
    }
    let loss_seconds: Vec<f64> = CONFIGS
        .iter()
        .map(|&(kind, correction, _)| loss_time(&config(kind, correction).loss))
        .collect::<Result<_>>()?;

    let fastest = |c: usize| {
        step_seconds[c]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    };
    let (base_fastest, base_median) = (fastest(0), median(&step_seconds[0]));
    let base_loss = loss_seconds[0];
    println!(
        "| loss | steps | fastest step (s) | vs grpo | median step (s) | vs grpo | policy_loss \
         fwd+bwd (ms) | its extra over grpo, share of a step |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, &(_, _, label)) in CONFIGS.iter().enumerate() {
        let (step_min, step_median) = (fastest(c), median(&step_seconds[c]));
        println!(
            "| {label} | {} | {step_min:.2} | {:+.1} % | {step_median:.2} | {:+.1} % | {:.3} | \
             {:+.4} % |",
            step_seconds[c].len(),
            100.0 * (step_min / base_fastest - 1.0),
            100.0 * (step_median / base_median - 1.0),
            1e3 * loss_seconds[c],
            100.0 * (loss_seconds[c] - base_loss) / base_fastest
        );
    }
    Ok(())
}

/// The round's trainer settings with two PPO epochs and recomputed behaviour log-probs (which
/// a correction needs; every configuration pays for them alike).
fn config(kind: LossKind, is_correction: IsCorrection) -> TrainerConfig {
    TrainerConfig {
        learning_rate: 5e-5,
        ppo_epochs: 2,
        mini_batch_size: 8,
        micro_batch_size: 2,
        micro_batch_tokens: 2048,
        old_logprobs: OldLogprobSource::Recompute,
        loss: LossConfig {
            kind,
            is_correction,
            ..LossConfig::default()
        },
        ..TrainerConfig::default()
    }
}

/// Random token ids shaped like a round's episodes, rewarded at random (both rewards in every
/// group), with the base model's log-probs as the sampler's, off by a little noise.
fn synthetic_batch(model: &Llama) -> Result<Vec<TrainSequence>> {
    let vocab = model.config().vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let system = draw(SYSTEM);
    let mut batch = Vec::new();
    for g in 0..GROUPS {
        let question = draw(QUESTION);
        for i in 0..GROUP_SIZE {
            let mut tokens = [system.clone(), question.clone()].concat();
            let mut loss_mask = vec![false; tokens.len()];
            for (n, trained) in [(TURN_ONE, true), (OBSERVATION, false), (TURN_TWO, true)] {
                tokens.extend(draw(n));
                loss_mask.extend(std::iter::repeat_n(trained, n));
            }
            batch.push(TrainSequence {
                behaviour_logprobs: Vec::new(),
                tokens,
                loss_mask,
                reward: f64::from(u8::from(i % 3 == 0)),
                group_id: format!("g{g}"),
                baseline: None,
                adapter_version: None,
                temperature: 1.0,
                demonstration: false,
            });
        }
    }
    let mut noise = ChaCha8Rng::seed_from_u64(8);
    for s in &mut batch {
        let ids = Tensor::new(s.tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let scored = model.token_logprobs(&ids, None, None)?.logprobs;
        let scored = scored.squeeze(0)?.to_vec1::<f32>()?;
        s.behaviour_logprobs = std::iter::once(0.0)
            .chain(
                scored
                    .into_iter()
                    .map(|lp| (lp + noise.random_range(-0.02..0.02)).min(0.0)),
            )
            .collect();
    }
    Ok(batch)
}

/// Trains a fresh adapter on `batch` and returns the wall time of every optimizer step but the
/// first.
fn step_times(model: &Llama, batch: &[TrainSequence], config: TrainerConfig) -> Result<Vec<f64>> {
    let adapter = LoraAdapter::new(
        LoraConfig::default(),
        model.config(),
        &Device::Cpu,
        DType::F32,
    )?;
    let mut trainer = Trainer::new(model.clone(), adapter, config)?;
    let mut ends = Vec::new();
    trainer.train_with(batch, &mut |_| {
        ends.push(Instant::now());
        true
    })?;
    Ok(ends
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect())
}

/// Seconds of one `policy_loss` evaluation and its backward pass on a micro-batch of a
/// mini-batch's 8 sequences of the batch's length, off-policy, with a sampler that differs
/// from the trainer.
fn loss_time(config: &LossConfig) -> Result<f64> {
    let dev = Device::Cpu;
    let (b, l) = (8, SYSTEM + QUESTION + TURN_ONE + OBSERVATION + TURN_TWO - 1);
    let logp = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, l), &dev)? - 3.0)?)?;
    let old = (logp.as_tensor() + Tensor::randn(0f32, 0.2, (b, l), &dev)?)?.detach();
    let sampler = (&old + Tensor::randn(0f32, 0.02, (b, l), &dev)?)?;
    let trained: Vec<f32> = (0..b * l)
        .map(|k| {
            let j = k % l;
            let turn_one = SYSTEM + QUESTION - 1..SYSTEM + QUESTION + TURN_ONE - 1;
            f32::from(u8::from(turn_one.contains(&j) || j >= l - TURN_TWO))
        })
        .collect();
    let mask = Tensor::from_vec(trained, (b, l), &dev)?;
    let advantages = Tensor::new(&[0.8f32, -0.6, 1.2, -0.3, 0.0, -1.1, 0.5, -0.2], &dev)?;
    let entropy = Tensor::ones((b, l), DType::F32, &dev)?;
    let inputs = PolicyLossInputs {
        logp: logp.as_tensor(),
        logp_old: &old,
        logp_sampler: Some(&sampler),
        mask: &mask,
        advantages: &advantages,
        ref_logp: None,
        entropy: Some(&entropy),
        normalizer: None,
    };
    let reps = 200;
    let started = Instant::now();
    for _ in 0..reps {
        let (loss, _) = policy_loss(&inputs, config)?;
        loss.backward()?;
    }
    Ok(started.elapsed().as_secs_f64() / f64::from(reps))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
