//! The model as the agent and the trainer see it: token-level prompts in, sampled tokens with
//! their exact ids and natural-log probabilities out.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions from the runtime.
    System,
    /// The customer or host question.
    User,
    /// The model.
    Assistant,
}

/// One chat message, rendered into a prompt by the model's chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The speaker.
    pub role: Role,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// How to sample one completion.
///
/// The defaults are the neutral distribution (temperature 1, no top-p/top-k truncation), which is
/// what reinforcement learning needs: the recorded log-probabilities are then those of the
/// model's own distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus truncation: keep the smallest set of tokens whose mass reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Most new tokens to generate.
    pub max_tokens: usize,
    /// Generation stops right after the first token that completes one of these strings.
    pub stop: Vec<String>,
    /// Seed of the sampler's random stream; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_tokens: 256,
            stop: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Where a sampler stops in `text`: the end of the stop string that completes first, and
    /// that string; `None` when no stop string occurs.
    pub fn first_stop(&self, text: &str) -> Option<(usize, &str)> {
        self.stop
            .iter()
            .filter_map(|stop| {
                text.find(stop.as_str())
                    .map(|at| (at + stop.len(), stop.as_str()))
            })
            .min_by_key(|(end, _)| *end)
    }

    /// Checks that every value is in range, so a bad config fails before any model work.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Config(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(Error::Config(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_tokens == 0 {
            return Err(Error::Config("max_tokens must be at least 1".into()));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::Config("stop strings must not be empty".into()));
        }
        Ok(())
    }
}

/// Why a sample ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum FinishReason {
    /// A stop string was completed; the string is given.
    Stop(String),
    /// The model emitted an end-of-sequence token (included in `tokens`).
    Eos,
    /// `max_tokens` was reached.
    Length,
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The exact ids of the generated tokens, in order.
    pub tokens: Vec<u32>,
    /// For each token, the natural-log probability it had under the distribution it was drawn
    /// from (after temperature and truncation).
    pub logprobs: Vec<f32>,
    /// The decoded text of `tokens`.
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// The served model.
///
/// Implementations render chat prompts, tokenize, and sample from raw token ids. Only
/// [`Policy::sample`] waits; the rest is cheap and synchronous. The trait is object-safe because
/// serving swaps models at run time behind a [`PolicySlot`].
#[async_trait]
pub trait Policy: Send + Sync {
    /// A stable identifier of the base model (file name and content hash, say).
    fn model_id(&self) -> &str;

    /// The adapter version merged into this model, `None` for the base model.
    fn adapter_version(&self) -> Option<u64>;

    /// Renders `messages` with the model's chat template. With `add_generation_prompt` the text
    /// ends where the assistant's reply begins.
    fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String>;

    /// Token ids of `text`, without adding special tokens (special tokens written in the text,
    /// such as a chat template's markers, are still recognised).
    fn tokenize(&self, text: &str) -> Result<Vec<u32>>;

    /// The text of `tokens`, special tokens included.
    fn detokenize(&self, tokens: &[u32]) -> Result<String>;

    /// Draws `n` independent completions of `prompt`.
    async fn sample(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> Result<Vec<Sample>>;

    /// Longest sequence (prompt plus completion) the model accepts.
    fn context_length(&self) -> usize {
        2048
    }

    /// The chat prompt for `messages` as token ids, ready for the assistant to speak.
    fn chat_prompt_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.tokenize(&self.render_chat(messages, true)?)
    }
}

/// The currently served policy, swappable while episodes run (blue/green).
///
/// An episode takes an `Arc` to the policy when it starts and keeps it to the end, so a swap
/// routes new episodes to the new model while in-flight ones finish on the old one; the old model
/// is dropped when its last episode ends.
pub struct PolicySlot {
    current: RwLock<Arc<dyn Policy>>,
}

impl PolicySlot {
    /// A slot serving `policy`.
    pub fn new(policy: Arc<dyn Policy>) -> Self {
        Self {
            current: RwLock::new(policy),
        }
    }

    /// The policy new episodes should use.
    pub fn current(&self) -> Arc<dyn Policy> {
        // A poisoned lock only means a panic happened while swapping an Arc, which cannot leave
        // the Arc half-written, so the value inside is still valid.
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Routes new episodes to `policy` and returns the previous one.
    pub fn swap(&self, policy: Arc<dyn Policy>) -> Arc<dyn Policy> {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::replace(&mut *guard, policy)
    }
}

impl std::fmt::Debug for PolicySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("PolicySlot")
            .field("model_id", &current.model_id())
            .field("adapter_version", &current.adapter_version())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_is_the_one_that_completes_first() {
        let p = SamplingParams {
            stop: vec!["</search>".into(), "\n".into()],
            ..SamplingParams::default()
        };
        assert_eq!(p.first_stop("aurora tote\n</search>"), Some((12, "\n")));
        assert_eq!(
            p.first_stop("aurora tote</search>\n"),
            Some((20, "</search>"))
        );
        assert_eq!(p.first_stop("aurora tote"), None);
    }

    #[test]
    fn default_sampling_is_neutral_and_valid() {
        let p = SamplingParams::default();
        assert_eq!(p.temperature, 1.0);
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.top_k, 0);
        p.validate().unwrap();
    }

    #[test]
    fn bad_sampling_values_are_rejected() {
        for bad in [
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                max_tokens: 0,
                ..Default::default()
            },
            SamplingParams {
                stop: vec![String::new()],
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} should be rejected");
        }
    }
}
