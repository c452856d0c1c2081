//! The candle engine on the embedded default model: exact ids and log-probs (checked against
//! the trainer's own forward pass), batching and prefix reuse (from cached sequences and between
//! concurrent requests) that change nothing, abandoned requests that stop, and prompts too long
//! for the context refused before any work.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use candle_core::{DType, Device, Tensor};
use searchloop_core::{ChatMessage, Policy, Role, Sample, SamplingParams};
use searchloop_llama::{Llama, test_support::real_model_path};
use searchloop_model_candle::{CandleConfig, CandlePolicy};

async fn load(config: impl FnOnce(&mut CandleConfig)) -> CandlePolicy {
    let mut c = CandleConfig::new(real_model_path());
    config(&mut c);
    CandlePolicy::load(&c).await.unwrap()
}

fn prompt(policy: &CandlePolicy, question: &str) -> Vec<u32> {
    policy
        .chat_prompt_ids(&[
            ChatMessage::new(
                Role::System,
                "You answer questions about products. Search with <search>query</search>.",
            ),
            ChatMessage::new(Role::User, question),
        ])
        .unwrap()
}

fn params(seed: u64, temperature: f32, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature,
        max_tokens,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// The trainer's log-probs of `tokens` after `prompt`, at `temperature`.
fn trainer_logprobs(model: &Llama, prompt: &[u32], tokens: &[u32], temperature: f64) -> Vec<f32> {
    let ids: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let stats = model
        .token_logprobs_tempered(&t, None, None, Some(&[temperature]))
        .unwrap();
    let all = stats.logprobs.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    all[prompt.len() - 1..].to_vec()
}

fn max_gap(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_carry_exact_ids_and_the_trainers_log_probs() {
    let policy = load(|_| {}).await;
    let trainer = Llama::load(real_model_path(), &Device::Cpu, DType::F32).unwrap();
    let ids = prompt(&policy, "Which tote bags are made of canvas?");
    let samples = policy.sample(&ids, &params(7, 1.0, 24), 4).await.unwrap();
    assert_eq!(samples.len(), 4);
    for s in &samples {
        assert_eq!(s.tokens.len(), s.logprobs.len());
        assert_eq!(policy.detokenize(&s.tokens).unwrap(), s.text);
        let reference = trainer_logprobs(&trainer, &ids, &s.tokens, 1.0);
        let gap = max_gap(&s.logprobs, &reference);
        assert!(gap < 2e-4, "sampler/trainer log-prob gap {gap}");
    }
    assert!(
        samples.iter().any(|s| s.tokens != samples[0].tokens),
        "four seeds at temperature 1 drew the same sample"
    );
    // At another temperature the log-probs are the tempered distribution's.
    let cool = policy.sample(&ids, &params(3, 0.5, 12), 1).await.unwrap();
    let reference = trainer_logprobs(&trainer, &ids, &cool[0].tokens, 0.5);
    assert!(max_gap(&cool[0].logprobs, &reference) < 2e-4);
    // Greedy samples record 0: the distribution they came from is certain.
    let greedy = policy.sample(&ids, &params(1, 0.0, 8), 1).await.unwrap();
    assert!(greedy[0].logprobs.iter().all(|&l| l == 0.0));
}

/// Every sample's log-probs are the trainer's for its tokens: the exactness a batch or a
/// reused prefix must keep. (Batch composition changes float sums by ~1e-5, so a draw near a
/// boundary of the distribution may pick another token; the distribution it came from is
/// still the recorded one.)
fn exact(trainer: &Llama, prompt: &[u32], samples: &[Sample], temperature: f64) {
    for s in samples {
        let gap = max_gap(
            &s.logprobs,
            &trainer_logprobs(trainer, prompt, &s.tokens, temperature),
        );
        assert!(gap < 2e-4, "sampler/trainer log-prob gap {gap}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_samples_and_reused_prefixes_stay_exact() {
    let policy = Arc::new(load(|_| {}).await);
    let trainer = Llama::load(real_model_path(), &Device::Cpu, DType::F32).unwrap();
    let questions = [
        "Is the Aurora Tote in stock in Lyon?",
        "What does the Nova backpack cost?",
        "Which stores open on Sunday?",
    ];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| prompt(&policy, q)).collect();
    // All at once: the engine decodes the nine samples together.
    let together = futures::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let policy = policy.clone();
        let p = p.clone();
        async move {
            policy
                .sample(&p, &params(i as u64, 1.0, 20), 3)
                .await
                .unwrap()
        }
    }))
    .await;
    for (p, samples) in prompts.iter().zip(&together) {
        exact(&trainer, p, samples, 1.0);
    }
    let stats = policy.stats();
    assert!(stats.max_batch_sequences > 3, "{stats:?}");
    // A second turn extends the first one's prompt and completion: its cached keys and values
    // are reused, and what follows is still exact.
    let turn: Vec<u32> = prompts[0]
        .iter()
        .chain(&together[0][0].tokens)
        .chain(
            &policy
                .tokenize("\n<information>in stock</information>\n")
                .unwrap(),
        )
        .copied()
        .collect();
    let before = policy.stats().reused_tokens;
    let reused = policy.sample(&turn, &params(9, 1.0, 16), 2).await.unwrap();
    let reused_now = policy.stats().reused_tokens - before;
    assert!(
        reused_now >= prompts[0].len() as u64,
        "only {reused_now} tokens reused"
    );
    exact(&trainer, &turn, &reused, 1.0);
    // Without a prefix cache nothing is reused, and a greedy sample is the same either way.
    let fresh = load(|c| c.prefix_cache_entries = 0).await;
    let greedy = params(2, 0.0, 12);
    let a = fresh.sample(&turn, &greedy, 1).await.unwrap();
    let b = policy.sample(&turn, &greedy, 1).await.unwrap();
    assert_eq!(a[0].tokens, b[0].tokens);
    assert_eq!(fresh.stats().reused_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_prompt_prefill_it_once_and_stay_exact() {
    // Eight prompt tokens a step, so the first request is still prefilling when the others are
    // admitted: they wait for its tokens instead of computing them beside it.
    let policy = Arc::new(load(|c| c.max_step_tokens = 8).await);
    let trainer = Llama::load(real_model_path(), &Device::Cpu, DType::F32).unwrap();
    let ids = prompt(
        &policy,
        "Which of the canvas tote bags are in stock in Lyon?",
    );
    let samples = futures::future::join_all((0..4u64).map(|seed| {
        let policy = policy.clone();
        let ids = ids.clone();
        async move {
            policy
                .sample(&ids, &params(seed, 1.0, 12), 1)
                .await
                .unwrap()
        }
    }))
    .await;
    let stats = policy.stats();
    // One request computed the prompt; each of the other three only its last token, whose
    // logits its own samples draw from.
    assert_eq!(stats.prefilled_tokens, ids.len() as u64 + 3, "{stats:?}");
    assert_eq!(stats.reused_tokens, 3 * (ids.len() as u64 - 1), "{stats:?}");
    for s in &samples {
        exact(&trainer, &ids, s, 1.0);
    }
    assert!(
        samples.iter().any(|s| s[0].tokens != samples[0][0].tokens),
        "four seeds at temperature 1 drew the same sample"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_stops_and_others_still_finish() {
    let policy = Arc::new(load(|_| {}).await);
    let ids = prompt(&policy, "Describe every bag in the catalog in detail.");
    let long = {
        let policy = policy.clone();
        let ids = ids.clone();
        tokio::spawn(async move { policy.sample(&ids, &params(5, 1.0, 1500), 1).await })
    };
    // Let it decode for a while, then give up on it as a client that hangs up would.
    while policy.stats().generated_tokens < 8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    long.abort();
    let _ = long.await;
    let normal = policy.sample(&ids, &params(6, 1.0, 12), 1).await.unwrap();
    assert!(!normal[0].tokens.is_empty());
    let stats = policy.stats();
    assert_eq!(stats.abandoned, 1, "{stats:?}");
    // The abandoned sequence stopped within a step or two of the abort, far from its 1,500.
    assert!(
        stats.generated_tokens < 200,
        "the abandoned request went on decoding: {stats:?}"
    );
}

#[tokio::test]
async fn prompts_that_overflow_the_context_are_refused_before_any_work() {
    let policy = load(|c| c.context_length = Some(64)).await;
    let too_long: Vec<u32> = std::iter::repeat_n(42u32, 64).collect();
    let err = policy
        .sample(&too_long, &params(1, 1.0, 4), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no room in the context"), "{err}");
    let err = policy
        .sample(&[49_152], &params(1, 1.0, 4), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert_eq!(policy.stats().steps, 0);
    // A prompt that fits gets at most the room that is left.
    let fits: Vec<u32> = std::iter::repeat_n(42u32, 60).collect();
    let sample = policy.sample(&fits, &params(1, 1.0, 100), 1).await.unwrap();
    assert!(sample[0].tokens.len() <= 4);
    let config = CandleConfig {
        context_length: Some(1_000_000),
        ..CandleConfig::new(real_model_path())
    };
    let err = CandlePolicy::load(&config).await.unwrap_err().to_string();
    assert!(
        err.contains("exceeds the model's own context length"),
        "{err}"
    );
}
