//! The serving/trainer match on the embedded model: an episode sampled by the real mistral.rs
//! policy, stored and read back, then scored by the trainer, gives the same per-token
//! log-probabilities at the sampling temperature.
//!
//! Tolerances. With f32 serving weights (the runtime's default) both sides compute with the same
//! dequantized weights, in f32, in different kernels and summation orders; measured gaps are
//! around 1e-5, and a whole nat-scale error (a wrong temperature, a shifted position, a wrong
//! token) is 1e-1 or more, so 2e-3 on the largest gap separates rounding from bugs with room on
//! both sides. With the file's own Q4_1 weights, mistral.rs rounds every activation row to 8 bits
//! before each matrix product; that quantization noise is measured at a mean of a few 1e-2 nats
//! and stays bounded, which the looser bounds check.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::PathBuf, sync::Arc};

use candle_core::{DType, Device, Tensor};
use common::EchoTool;
use searchloop_core::{
    Agent, AgentConfig, EpisodeRequest, Policy, PolicySlot, ProtocolConfig, SamplingParams,
    ToolRegistry, TrajectorySink,
};
use searchloop_learn::batch::{SequenceLimits, to_train_sequence};
use searchloop_llama::Llama;
use searchloop_model_mistralrs::{MistralRsConfig, MistralRsPolicy, WeightsEncoding};
use searchloop_store_sql::Store;
use searchloop_train_sapo::TrainSequence;

fn model_path() -> PathBuf {
    let path = std::env::var_os("SEARCHLOOP_MODEL").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/searchloop/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "the default model is missing at {}: run `searchloop model fetch` (or the project's \
         test script) first, or point SEARCHLOOP_MODEL at it",
        path.display()
    );
    path
}

/// Mean and largest |serving − trainer| log-prob over the trained tokens of `s`.
fn gap(model: &Llama, s: &TrainSequence) -> (f64, f64, usize) {
    let ids = Tensor::new(s.tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ours = model
        .token_logprobs_tempered(&ids, None, None, Some(&[s.temperature]))
        .unwrap()
        .logprobs
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (mut sum, mut max, mut n) = (0.0, 0.0f64, 0);
    for (j, &trainer) in ours.iter().enumerate() {
        if s.loss_mask[j + 1] {
            let d = f64::from((s.behaviour_logprobs[j + 1] - trainer).abs());
            sum += d;
            max = max.max(d);
            n += 1;
        }
    }
    (sum / n.max(1) as f64, max, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_and_trainer_log_probs_match_on_the_real_model() {
    let path = model_path();
    let trainer_model = Llama::load(&path, &Device::Cpu, DType::F32).unwrap();
    let limits = SequenceLimits {
        vocab_size: trainer_model.config().vocab_size,
        max_tokens: 4096,
    };

    // f32 serving, through the agent loop and the store, as a round reads it.
    let served = Arc::new(
        MistralRsPolicy::load(&MistralRsConfig {
            weights: WeightsEncoding::F32,
            ..MistralRsConfig::new(&path)
        })
        .await
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(dir.path().join("s.db").to_str().unwrap())
            .await
            .unwrap(),
    );
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(EchoTool)).unwrap();
    let agent = Agent::new(
        Arc::new(PolicySlot::new(served.clone())),
        Arc::new(tools),
        AgentConfig {
            protocol: ProtocolConfig {
                max_turns: 1,
                max_turn_tokens: 40,
                ..ProtocolConfig::default()
            },
            sampling: SamplingParams {
                temperature: 0.7,
                ..SamplingParams::default()
            },
            ..AgentConfig::default()
        },
    )
    .unwrap()
    .with_sink(Arc::clone(&store) as Arc<dyn TrajectorySink>);
    let t = agent
        .run(EpisodeRequest {
            question: "What colour is the Nova Tote?".into(),
            seed: Some(11),
            ..EpisodeRequest::default()
        })
        .await
        .unwrap();
    let stored = store.get_trajectory(&t.id).await.unwrap().unwrap();
    assert_eq!(stored, t);
    let s = to_train_sequence(&stored, 0.0, "g", limits).unwrap();
    assert_eq!(s.temperature, f64::from(0.7f32));
    let (mean, max, n) = gap(&trainer_model, &s);
    println!(
        "f32 serving vs trainer at T=0.7 over {n} sampled tokens of a {}-token episode: mean \
         |gap| {mean:.2e}, max {max:.2e}",
        s.tokens.len()
    );
    assert!(n >= 10, "only {n} model tokens");
    assert!(max < 2e-3 && mean < 2e-4, "mean {mean}, max {max}");
    // Scored at the model's own temperature instead, the same tokens are far off: the check
    // can fail.
    let (wrong_mean, _, _) = gap(
        &trainer_model,
        &TrainSequence {
            temperature: 1.0,
            ..s.clone()
        },
    );
    assert!(wrong_mean > 50.0 * mean.max(1e-4), "{wrong_mean}");
    drop(agent);
    drop(served);

    // The file's own Q4_1 weights: quantization noise, bounded.
    let quantized = MistralRsPolicy::load(&MistralRsConfig::new(&path))
        .await
        .unwrap();
    let prompt = stored.tokens[..stored.prompt_len()].to_vec();
    let params = SamplingParams {
        temperature: 0.7,
        max_tokens: 48,
        seed: Some(3),
        ..SamplingParams::default()
    };
    let sample = quantized
        .sample(&prompt, &params, 1)
        .await
        .unwrap()
        .remove(0);
    let mut tokens = prompt.clone();
    tokens.extend(&sample.tokens);
    let mut logprobs = vec![0.0; prompt.len()];
    logprobs.extend(&sample.logprobs);
    let q = TrainSequence {
        loss_mask: (0..tokens.len()).map(|i| i >= prompt.len()).collect(),
        tokens,
        behaviour_logprobs: logprobs,
        reward: 0.0,
        group_id: "g".into(),
        baseline: None,
        adapter_version: None,
        temperature: 0.7,
        demonstration: false,
    };
    let (q_mean, q_max, q_n) = gap(&trainer_model, &q);
    println!(
        "Q4_1 serving (8-bit activations) vs f32 trainer at T=0.7 over {q_n} tokens: mean \
         |gap| {q_mean:.2e}, max {q_max:.2e}"
    );
    assert!(q_n >= 10);
    assert!(q_mean < 0.1 && q_max < 1.0, "mean {q_mean}, max {q_max}");
    assert!(
        q_mean > mean,
        "quantized serving should be further off than f32 serving"
    );
}
