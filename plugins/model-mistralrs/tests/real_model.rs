//! MistralRsPolicy against the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): exact
//! token ids and texts, log-probabilities checked against an independent forward pass, seeds,
//! stop strings, limits, concurrency, prefix reuse, and refusal of bad model paths.
//!
//! The model is found through `SEARCHLOOP_MODEL` or the project's cache path; the project's test
//! script fetches it. It is loaded once per test binary and shared by the tests, as is its f32
//! re-encoding (written once beside it).
//!
//! Why the log-probability checks use the f32 weights: with quantized weights candle rounds
//! every activation row to 8 bits before each matrix product, so a 1e-7 difference in summation
//! order (the decoding step attends in tiles, a fresh prefill in one pass) sometimes flips a
//! rounding and moves later log-probabilities by up to ~0.1. That is the engine's numerics, not
//! the sampler's; with f32 weights nothing is rounded and the recorded log-probabilities match
//! a separate prefill of the same context to ~1e-5.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use searchloop_core::{ChatMessage, FinishReason, Policy, Role, Sample, SamplingParams};
use searchloop_model_mistralrs::{MistralRsConfig, MistralRsPolicy, ModelError, WeightsEncoding};
use tokio::sync::OnceCell;

/// Log-probabilities recorded while decoding and recomputed by a separate prefill request agree
/// to this much.
const LOGPROB_TOLERANCE: f64 = 1e-4;

fn model_path() -> PathBuf {
    let path = std::env::var_os("SEARCHLOOP_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            Path::new(&home).join(".cache/searchloop/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "the default model is missing at {}: run scripts/test.sh to fetch it, or point SEARCHLOOP_MODEL at a GGUF file",
        path.display()
    );
    path
}

static POLICY: OnceCell<Arc<MistralRsPolicy>> = OnceCell::const_new();
static F32_POLICY: OnceCell<Arc<MistralRsPolicy>> = OnceCell::const_new();

/// The default model as it is.
async fn policy() -> Arc<MistralRsPolicy> {
    POLICY
        .get_or_init(|| async {
            let policy = MistralRsPolicy::load(&MistralRsConfig::new(model_path()))
                .await
                .expect("the default model loads");
            Arc::new(policy)
        })
        .await
        .clone()
}

fn f32_config() -> MistralRsConfig {
    MistralRsConfig {
        weights: WeightsEncoding::F32,
        ..MistralRsConfig::new(model_path())
    }
}

/// The default model with its weights dequantized to f32.
async fn f32_policy() -> Arc<MistralRsPolicy> {
    F32_POLICY
        .get_or_init(|| async {
            let policy = MistralRsPolicy::load(&f32_config())
                .await
                .expect("the default model loads with f32 weights");
            Arc::new(policy)
        })
        .await
        .clone()
}

fn question_prompt(policy: &MistralRsPolicy, question: &str) -> Vec<u32> {
    policy
        .chat_prompt_ids(&[ChatMessage::new(Role::User, question)])
        .unwrap()
}

fn params(temperature: f32, max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        max_tokens,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// Natural-log softmax of `logits / temperature`, in f64, written independently of the crate.
fn log_softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_total = scaled.iter().map(|s| (s - max).exp()).sum::<f64>().ln() + max;
    scaled.into_iter().map(|s| s - log_total).collect()
}

/// The top-p nucleus of `log_probs` (most likely first, smallest prefix whose mass reaches
/// `top_p`) with its log-probabilities renormalized over the nucleus.
fn nucleus(log_probs: &[f64], top_p: f64) -> Vec<(usize, f64)> {
    let mut order: Vec<usize> = (0..log_probs.len()).collect();
    order.sort_by(|&a, &b| log_probs[b].total_cmp(&log_probs[a]).then(a.cmp(&b)));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for index in order {
        if mass >= top_p {
            break;
        }
        mass += log_probs[index].exp();
        kept.push(index);
    }
    let log_mass = mass.ln();
    kept.into_iter()
        .map(|i| (i, log_probs[i] - log_mass))
        .collect()
}

fn assert_consistent(policy: &MistralRsPolicy, sample: &Sample) {
    assert_eq!(sample.tokens.len(), sample.logprobs.len());
    assert_eq!(policy.detokenize(&sample.tokens).unwrap(), sample.text);
    assert!(
        sample
            .logprobs
            .iter()
            .all(|lp| lp.is_finite() && *lp <= 0.0),
        "{:?}",
        sample.logprobs
    );
}

#[tokio::test]
async fn samples_decode_to_their_text_with_one_logprob_per_token() {
    let policy = policy().await;
    let prompt = question_prompt(&policy, "What is the capital of France?");
    let before = policy.sampler_stats();
    let samples = policy
        .sample(&prompt, &params(1.0, 40, 7), 4)
        .await
        .unwrap();
    assert_eq!(samples.len(), 4);
    // mistral.rs decoded its own generated sequence incrementally; for every sample that text
    // is the text of the recorded ids, so the ids are the tokens the engine generated. (The
    // policy is shared with the other tests of this file, so the counts include theirs.)
    let stats = policy.sampler_stats();
    assert!(stats.texts_matched >= before.texts_matched + 4, "{stats:?}");
    assert_eq!(stats.texts_differing, 0, "{stats:?}");
    for sample in &samples {
        assert_consistent(&policy, sample);
        assert!(!sample.tokens.is_empty());
        match &sample.finish {
            FinishReason::Eos => {
                assert!(policy.eos_tokens().contains(sample.tokens.last().unwrap()))
            }
            FinishReason::Length => assert_eq!(sample.tokens.len(), 40),
            other => panic!("no stop strings were given, yet the sample ended with {other:?}"),
        }
    }
}

#[tokio::test]
async fn recorded_logprobs_are_the_tempered_distribution_of_an_independent_forward_pass() {
    let policy = f32_policy().await;
    let prompt = question_prompt(&policy, "Name three colours.");
    let temperature = 0.7;
    let sample = &policy
        .sample(&prompt, &params(temperature, 12, 21), 1)
        .await
        .unwrap()[0];
    assert_consistent(&policy, sample);
    for position in 0..sample.tokens.len() {
        let mut context = prompt.clone();
        context.extend_from_slice(&sample.tokens[..position]);
        // A fresh request prefills the whole context in one pass, while the sample decoded it
        // token by token against its KV cache: the two share only the weights.
        let logits = policy.next_token_logits(&context).await.unwrap();
        let expected = log_softmax(&logits, temperature as f64)[sample.tokens[position] as usize];
        let recorded = sample.logprobs[position] as f64;
        assert!(
            (recorded - expected).abs() < LOGPROB_TOLERANCE,
            "position {position}: recorded {recorded}, recomputed {expected}"
        );
    }
}

#[tokio::test]
async fn quantized_first_token_logprobs_match_a_separate_request_exactly() {
    // The first token of a sample comes from the prompt's prefill, computed exactly like the
    // separate request's, so even with quantized weights the two agree to float rounding.
    let policy = policy().await;
    let prompt = question_prompt(&policy, "Name three colours.");
    let logits = policy.next_token_logits(&prompt).await.unwrap();
    for seed in 0..4 {
        let sample = &policy
            .sample(&prompt, &params(1.3, 1, seed), 1)
            .await
            .unwrap()[0];
        let expected = log_softmax(&logits, 1.3)[sample.tokens[0] as usize];
        assert!(
            (sample.logprobs[0] as f64 - expected).abs() < 1e-5,
            "seed {seed}: recorded {}, recomputed {expected}",
            sample.logprobs[0]
        );
    }
}

#[tokio::test]
async fn top_p_logprobs_are_renormalized_over_the_nucleus() {
    let policy = f32_policy().await;
    let prompt = question_prompt(&policy, "Write a short sentence about the sea.");
    let top_p = 0.9;
    let sampling = SamplingParams {
        top_p: top_p as f32,
        ..params(1.0, 8, 5)
    };
    let sample = &policy.sample(&prompt, &sampling, 1).await.unwrap()[0];
    assert_consistent(&policy, sample);
    let mut truncated_somewhere = false;
    for position in 0..sample.tokens.len() {
        let mut context = prompt.clone();
        context.extend_from_slice(&sample.tokens[..position]);
        let logits = policy.next_token_logits(&context).await.unwrap();
        let full = log_softmax(&logits, 1.0);
        let kept = nucleus(&full, top_p);
        truncated_somewhere |= kept.len() < logits.len();
        let token = sample.tokens[position] as usize;
        let (_, expected) = kept
            .iter()
            .find(|(index, _)| *index == token)
            .unwrap_or_else(|| panic!("token {token} at {position} is outside the nucleus"));
        let recorded = sample.logprobs[position] as f64;
        assert!(
            (recorded - expected).abs() < LOGPROB_TOLERANCE,
            "position {position}: recorded {recorded}, nucleus log-prob {expected}"
        );
        // Renormalizing makes the recorded value larger than the untruncated one.
        assert!(recorded >= full[token] - LOGPROB_TOLERANCE);
    }
    assert!(truncated_somewhere, "top-p 0.9 never cut the vocabulary");
}

#[tokio::test]
async fn greedy_takes_the_argmax_with_logprob_zero() {
    let policy = policy().await;
    let prompt = question_prompt(&policy, "What is two plus two?");
    let sample = &policy.sample(&prompt, &params(0.0, 6, 1), 1).await.unwrap()[0];
    assert_consistent(&policy, sample);
    assert!(sample.logprobs.iter().all(|&lp| lp == 0.0));
    let logits = policy.next_token_logits(&prompt).await.unwrap();
    let argmax = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap();
    assert_eq!(sample.tokens[0] as usize, argmax);
}

#[tokio::test]
async fn seeds_make_samples_repeatable_and_groups_independent() {
    let policy = policy().await;
    let prompt = question_prompt(&policy, "Tell me about cats.");
    let first = policy
        .sample(&prompt, &params(1.0, 24, 11), 1)
        .await
        .unwrap();
    let again = policy
        .sample(&prompt, &params(1.0, 24, 11), 1)
        .await
        .unwrap();
    assert_eq!(first[0].tokens, again[0].tokens);
    assert_eq!(first[0].text, again[0].text);
    let other = policy
        .sample(&prompt, &params(1.0, 24, 12), 1)
        .await
        .unwrap();
    assert_ne!(first[0].tokens, other[0].tokens);

    let group = policy
        .sample(&prompt, &params(1.0, 24, 100), 8)
        .await
        .unwrap();
    assert_eq!(group.len(), 8);
    for sample in &group {
        assert_consistent(&policy, sample);
    }
    let distinct: std::collections::HashSet<&Vec<u32>> = group.iter().map(|s| &s.tokens).collect();
    assert!(
        distinct.len() > 1,
        "eight samples at temperature 1 were identical"
    );
    // Sample i of a group is seeded seed + i: alone, that seed gives the same tokens again,
    // although the group ran batched and the single sample did not.
    let alone = policy
        .sample(&prompt, &params(1.0, 24, 103), 1)
        .await
        .unwrap();
    assert_eq!(alone[0].tokens, group[3].tokens);
    for (a, b) in alone[0].logprobs.iter().zip(&group[3].logprobs) {
        assert!(((a - b) as f64).abs() < LOGPROB_TOLERANCE, "{a} vs {b}");
    }
}

#[tokio::test]
async fn stop_strings_end_generation_right_after_the_completing_token() {
    let policy = policy().await;
    let prompt = question_prompt(&policy, "Describe the city of Paris in two sentences.");
    let free = &policy
        .sample(&prompt, &params(0.0, 30, 0), 1)
        .await
        .unwrap()[0];
    assert!(free.tokens.len() > 8, "{free:?}");
    // The greedy text's first six tokens, as a stop string, are certain to be completed by
    // the sixth token of the same greedy run, and not before.
    let stop = policy.detokenize(&free.tokens[..6]).unwrap();
    let sampling = SamplingParams {
        stop: vec!["never appears \u{2603}".into(), stop.clone()],
        ..params(0.0, 30, 0)
    };
    let before = policy.sampler_stats();
    let stopped = &policy.sample(&prompt, &sampling, 1).await.unwrap()[0];
    assert_consistent(&policy, stopped);
    assert_eq!(stopped.finish, FinishReason::Stop(stop.clone()));
    assert_eq!(stopped.tokens, free.tokens[..6]);
    assert_eq!(stopped.text, stop);
    assert!(stopped.text.ends_with(&stop));
    // The engine ran one more step, which the recorder answered with end-of-sequence; its own
    // text is still the recorded ids' text.
    let stats = policy.sampler_stats();
    assert!(stats.forced_ends > before.forced_ends);
    assert!(stats.texts_matched > before.texts_matched, "{stats:?}");
    assert_eq!(stats.texts_differing, 0, "{stats:?}");

    // A stop string inside the greedy text that ends within a token.
    let tail: String = free.text.chars().skip(3).take(4).collect();
    let sampling = SamplingParams {
        stop: vec![tail.clone()],
        ..params(0.0, 30, 0)
    };
    let cut = &policy.sample(&prompt, &sampling, 1).await.unwrap()[0];
    assert_consistent(&policy, cut);
    assert_eq!(cut.finish, FinishReason::Stop(tail.clone()));
    assert!(cut.text.contains(&tail));
    let without_last = policy
        .detokenize(&cut.tokens[..cut.tokens.len() - 1])
        .unwrap();
    assert!(
        !without_last.contains(&tail),
        "generation went past the stop string"
    );
    assert_eq!(cut.tokens, free.tokens[..cut.tokens.len()]);
}

#[tokio::test]
async fn max_tokens_is_respected() {
    let policy = policy().await;
    let prompt = question_prompt(&policy, "Write a long story about a dragon.");
    for max_tokens in [1, 5] {
        let samples = policy
            .sample(&prompt, &params(1.0, max_tokens, 3), 2)
            .await
            .unwrap();
        for sample in samples {
            assert_consistent(&policy, &sample);
            assert!(sample.tokens.len() <= max_tokens);
            if sample.finish == FinishReason::Length {
                assert_eq!(sample.tokens.len(), max_tokens);
            } else {
                assert_eq!(sample.finish, FinishReason::Eos);
            }
        }
    }
}

#[tokio::test]
async fn concurrent_samples_from_several_tasks_all_succeed() {
    let policy = policy().await;
    let questions = [
        "Where is Rome?",
        "What do bees make?",
        "Name a large ocean.",
        "How many legs does a spider have?",
    ];
    let tasks: Vec<_> = questions
        .iter()
        .enumerate()
        .map(|(i, question)| {
            let policy = policy.clone();
            let question = question.to_string();
            tokio::spawn(async move {
                let prompt = question_prompt(&policy, &question);
                policy.sample(&prompt, &params(1.0, 16, i as u64), 2).await
            })
        })
        .collect();
    for task in tasks {
        let samples = task.await.unwrap().unwrap();
        assert_eq!(samples.len(), 2);
        for sample in &samples {
            assert_consistent(&policy, sample);
        }
    }
}

#[tokio::test]
async fn prefix_reuse_changes_nothing_and_every_token_costs_one_processor_call() {
    // Two engines with f32 weights (whose numerics do not depend on how a context is split
    // between cache and prefill, see the module comment): one reusing cached prefixes, one
    // not, used only by this test so the counters are exact.
    let cached = MistralRsPolicy::load(&MistralRsConfig {
        prefix_cache_sequences: 4,
        ..f32_config()
    })
    .await
    .unwrap();
    let uncached = MistralRsPolicy::load(&f32_config()).await.unwrap();

    // A second question after the same system prompt reuses the first request's cache for the
    // shared beginning, so its first decoding step sees only the new tail of the prompt.
    let system = ChatMessage::new(
        Role::System,
        "You are a shop assistant. Answer in one sentence.",
    );
    let first_prompt = cached
        .chat_prompt_ids(&[
            system.clone(),
            ChatMessage::new(Role::User, "Do you sell tents?"),
        ])
        .unwrap();
    let second_prompt = cached
        .chat_prompt_ids(&[
            system,
            ChatMessage::new(Role::User, "What sizes do boots come in?"),
        ])
        .unwrap();
    cached
        .sample(&first_prompt, &params(1.0, 4, 1), 1)
        .await
        .unwrap();
    let with_cache = cached
        .sample(&second_prompt, &params(1.0, 12, 9), 2)
        .await
        .unwrap();
    let without_cache = uncached
        .sample(&second_prompt, &params(1.0, 12, 9), 2)
        .await
        .unwrap();
    assert!(
        cached.sampler_stats().prefix_cache_hits >= 1,
        "the second prompt did not reuse the first one's cache: {:?}",
        cached.sampler_stats()
    );
    for (a, b) in with_cache.iter().zip(&without_cache) {
        assert_eq!(a.tokens, b.tokens);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!(((x - y) as f64).abs() < LOGPROB_TOLERANCE, "{x} vs {y}");
        }
    }

    for (policy, samples) in [(&cached, 3), (&uncached, 2)] {
        let stats = policy.sampler_stats();
        assert_eq!(stats.redraws, 0, "{stats:?}");
        assert_eq!(
            stats.forced_ends, 0,
            "no stop strings were given: {stats:?}"
        );
        assert_eq!(
            stats.processor_calls, stats.tokens_drawn,
            "one processor call per generated token: {stats:?}"
        );
        assert!(stats.tokens_drawn >= samples, "{stats:?}");
    }
    let generated: usize = without_cache.iter().map(|s| s.tokens.len()).sum();
    assert_eq!(uncached.sampler_stats().tokens_drawn, generated as u64);
    assert_eq!(uncached.sampler_stats().prefix_cache_hits, 0);
}

#[tokio::test]
async fn chat_prompts_render_with_the_gguf_template_and_tokenize_its_markers() {
    let policy = policy().await;
    let messages = [
        ChatMessage::new(Role::System, "You answer briefly."),
        ChatMessage::new(Role::User, "Hi <answer>Paris</answer>"),
    ];
    let text = policy.render_chat(&messages, true).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou answer briefly.<|im_end|>\n"));
    assert!(text.ends_with(
        "<|im_start|>user\nHi <answer>Paris</answer><|im_end|>\n<|im_start|>assistant\n"
    ));
    let ids = policy.tokenize(&text).unwrap();
    let marker = policy.tokenize("<|im_start|>").unwrap();
    assert_eq!(marker.len(), 1, "the chat marker is one special token");
    assert_eq!(ids[0], marker[0]);
    assert_eq!(policy.detokenize(&ids).unwrap(), text);
    assert!(
        policy
            .model_id()
            .starts_with("SmolLM2-135M-Instruct.Q4_1.gguf@b179c9523d0e")
    );
    assert_eq!(policy.adapter_version(), None);
    assert!(policy.context_length() >= 2048);
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let policy = policy().await;
    let prompt = question_prompt(&policy, "Hello");
    let err = policy.sample(&[], &params(1.0, 4, 0), 1).await.unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = policy
        .sample(&[u32::MAX], &params(1.0, 4, 0), 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let too_long = vec![prompt[0]; policy.context_length()];
    let err = policy
        .sample(&too_long, &params(1.0, 4, 0), 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no room"), "{err}");
    let bad_params = SamplingParams {
        top_p: 0.0,
        ..params(1.0, 4, 0)
    };
    assert!(policy.sample(&prompt, &bad_params, 1).await.is_err());
    assert!(policy.detokenize(&[u32::MAX]).is_err());
    assert!(
        policy
            .sample(&prompt, &params(1.0, 4, 0), 0)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn bad_model_paths_are_refused_before_mistralrs_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("weights.gguf");
    std::fs::write(&not_gguf, "{\"not\": \"a model\"}").unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let cases = [
        (dir.path().join("missing.gguf"), "cannot be read"),
        (dir.path().to_path_buf(), "is a directory"),
        (not_gguf, "not a GGUF file"),
        (
            PathBuf::from("HuggingFaceTB/SmolLM2-135M-Instruct"),
            "absolute",
        ),
        (truncated, "truncated.gguf"),
    ];
    for (path, expected) in cases {
        let started = Instant::now();
        let err = MistralRsPolicy::load(&MistralRsConfig::new(&path))
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains(expected), "{}: {message}", path.display());
        assert!(
            message.contains(path.file_name().unwrap().to_string_lossy().as_ref()),
            "the error names the path: {message}"
        );
        // Refused by this crate's own checks, which run before mistral.rs (and its hub code)
        // is given anything, and fast: nothing waited on a network.
        assert!(
            matches!(err, ModelError::ModelPath { .. } | ModelError::Gguf { .. }),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
