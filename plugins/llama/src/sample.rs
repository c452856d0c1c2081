//! A small seeded sampler over the trainer's own forward pass, for tests and toy experiments.
//!
//! It recomputes the whole sequence at every step (no KV cache), which is fine for the short
//! sequences of unit tests and toy tasks and far too slow for real rollouts; serving samples
//! through mistral.rs. Its value is exactness: the recorded log-probs are the sampling
//! distribution's own, computed by the same numerics the trainer uses.

use candle_core::{DType, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{LlamaError, Result};
use crate::lora::LoraAdapter;
use crate::model::{Llama, frozen_matmul, log_softmax_last};

/// One sampled continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledSequence {
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    /// Natural-log probability of each token under the sampling distribution; 0 for the prompt.
    pub logprobs: Vec<f32>,
    /// Number of generated tokens (they are the last ones of `tokens`).
    pub generated: usize,
}

/// What to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleParams {
    /// Number of continuations (one group).
    pub n: usize,
    /// Upper bound on generated tokens per continuation.
    pub max_new_tokens: usize,
    /// Softmax temperature; 1 samples the model's own distribution.
    pub temperature: f64,
    /// A token that ends a continuation (it is kept).
    pub stop: Option<u32>,
}

/// Draws `params.n` continuations of `prompt` from softmax(`logits / temperature`) with one
/// seeded RNG.
pub fn sample(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    params: &SampleParams,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<SampledSequence>> {
    let SampleParams {
        n,
        max_new_tokens,
        temperature,
        stop,
    } = *params;
    if prompt.is_empty() {
        return Err(LlamaError::InvalidInput("empty prompt".to_string()));
    }
    if temperature.is_nan() || temperature <= 0.0 {
        return Err(LlamaError::InvalidInput(format!(
            "temperature {temperature} must be positive"
        )));
    }
    let mut seqs: Vec<SampledSequence> = (0..n)
        .map(|_| SampledSequence {
            tokens: prompt.to_vec(),
            logprobs: vec![0.0; prompt.len()],
            generated: 0,
        })
        .collect();
    let mut done = vec![false; n];
    // All rows advance in lockstep so the batch needs no padding: a finished row keeps drawing
    // tokens into `context`, but they are not recorded in its result.
    let mut context: Vec<u32> = prompt.repeat(n);
    let device = model.device();
    for step in 0..max_new_tokens {
        if done.iter().all(|&d| d) {
            break;
        }
        let t = prompt.len() + step;
        let ids = Tensor::from_slice(&context, (n, t), device)?;
        let h = model.hidden_states(&ids, None, adapter)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        let logits = frozen_matmul(&last, &model.weights().output)?.to_dtype(DType::F64)?;
        let logp = log_softmax_last(&(logits / temperature)?)?.to_vec2::<f64>()?;
        let mut next_context = Vec::with_capacity(n * (t + 1));
        for (i, seq) in seqs.iter_mut().enumerate() {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            // Inverse-CDF draw; the fallback to the last token absorbs rounding in the sum.
            let mut token = logp[i].len() - 1;
            for (k, lp) in logp[i].iter().enumerate() {
                acc += lp.exp();
                if u < acc {
                    token = k;
                    break;
                }
            }
            next_context.extend_from_slice(&context[i * t..(i + 1) * t]);
            next_context.push(token as u32);
            if done[i] {
                continue;
            }
            seq.tokens.push(token as u32);
            seq.logprobs.push(logp[i][token] as f32);
            seq.generated += 1;
            if stop == Some(token as u32) {
                done[i] = true;
            }
        }
        context = next_context;
    }
    Ok(seqs)
}
