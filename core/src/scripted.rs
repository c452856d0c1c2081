//! A scripted policy: a byte-level stand-in for a model, for unit tests of the loop and for
//! benchmarks that must isolate the runtime's own overhead from the model's cost.

use std::time::Duration;

use async_trait::async_trait;

use crate::{
    error::{Error, Result},
    policy::{ChatMessage, FinishReason, Policy, Role, Sample, SamplingParams},
};

type Responder = dyn Fn(&str) -> String + Send + Sync;

/// The scripted policy's end-of-sequence token (the NUL byte).
pub const SCRIPTED_EOS: u32 = 0;

/// A policy whose every turn is computed by a function of the context text.
///
/// Tokens are bytes (id = byte value), so ids, text and masks are easy to check by hand; a
/// response that ends before any stop string and the token limit ends with the end-of-sequence
/// token [`SCRIPTED_EOS`]. Every token gets the same log-probability. An optional fixed delay per call models a model's cost.
pub struct ScriptedPolicy {
    responder: Box<Responder>,
    model_id: String,
    adapter_version: Option<u64>,
    delay: Duration,
    logprob: f32,
    context_length: usize,
}

impl std::fmt::Debug for ScriptedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedPolicy")
            .field("model_id", &self.model_id)
            .field("adapter_version", &self.adapter_version)
            .finish()
    }
}

impl ScriptedPolicy {
    /// A policy answering each turn with `responder(context_text)`.
    pub fn new(responder: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        Self {
            responder: Box::new(responder),
            model_id: "scripted".into(),
            adapter_version: None,
            delay: Duration::ZERO,
            logprob: -0.25,
            context_length: 2048,
        }
    }

    /// Reports `version` as the served adapter.
    pub fn with_adapter_version(mut self, version: Option<u64>) -> Self {
        self.adapter_version = version;
        self
    }

    /// Sleeps `delay` in every `sample` call, like a model of fixed cost.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Names the model.
    pub fn with_model_id(mut self, model_id: impl Into<String>) -> Self {
        self.model_id = model_id.into();
        self
    }

    /// Accepts sequences of up to `bytes` tokens (default 2,048). A byte is much less text than
    /// a model's token, so a system prompt that describes several tools needs more.
    pub fn with_context_length(mut self, bytes: usize) -> Self {
        self.context_length = bytes;
        self
    }
}

#[async_trait]
impl Policy for ScriptedPolicy {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn adapter_version(&self) -> Option<u64> {
        self.adapter_version
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut out = String::new();
        for m in messages {
            let role = match m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            out.push_str(&format!("<{role}>{}</{role}>\n", m.content));
        }
        if add_generation_prompt {
            out.push_str("<assistant>");
        }
        Ok(out)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        let bytes = tokens
            .iter()
            .map(|&t| {
                u8::try_from(t).map_err(|_| Error::Policy(format!("token {t} is not a byte")))
            })
            .collect::<Result<Vec<u8>>>()?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn sample(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> Result<Vec<Sample>> {
        params.validate()?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let context = self.detokenize(prompt)?;
        let full = (self.responder)(&context);
        // Work on bytes: a byte is a token here, and a cut may fall inside a character.
        let mut bytes = full.as_bytes();
        let mut finish = FinishReason::Eos;
        if let Some((at, stop)) = params.first_stop(&full) {
            bytes = &bytes[..at];
            finish = FinishReason::Stop(stop.to_string());
        }
        if bytes.len() > params.max_tokens {
            bytes = &bytes[..params.max_tokens];
            finish = FinishReason::Length;
        }
        let mut tokens: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        if finish == FinishReason::Eos {
            tokens.push(SCRIPTED_EOS);
            text.push('\0');
        }
        let sample = Sample {
            logprobs: vec![self.logprob; tokens.len()],
            text,
            tokens,
            finish,
        };
        Ok(vec![sample; n])
    }
}
