//! How the candle engine is loaded and how much it does at once.

use std::path::PathBuf;

use searchloop_core::Device;
use searchloop_llama::WeightsEncoding;
use serde::{Deserialize, Serialize};

use crate::error::{CandleError, Result};

/// Configuration of [`crate::CandlePolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CandleConfig {
    /// The GGUF file (llama-family or Qwen2 with a byte-level BPE tokenizer).
    pub model_path: PathBuf,
    /// The device that serves.
    pub device: Device,
    /// How the weight matrices are held in memory.
    pub weights: WeightsEncoding,
    /// The adapter version merged into this model, recorded with every sample.
    pub adapter_version: Option<u64>,
    /// Longest prompt plus completion; absent uses the model's own (capped at
    /// [`CandleConfig::DEFAULT_CONTEXT`]).
    pub context_length: Option<usize>,
    /// A Jinja chat template replacing the GGUF's.
    pub chat_template: Option<String>,
    /// Most sequences decoded in one step; later requests wait for room.
    pub max_sequences: usize,
    /// Most tokens one step computes: every running sequence's next token, then chunks of
    /// waiting prompts. Bounds how long a long prompt holds up the others' decoding.
    pub max_step_tokens: usize,
    /// Finished sequences kept so that later prompts sharing their beginning (the system
    /// prompt, an episode's earlier turns) skip computing it again.
    pub prefix_cache_entries: usize,
    /// On the CPU, most tokens held in the key/value cache at once, running and cached (the
    /// default model takes about 46 KB per token). Requests wait while the running ones fill
    /// it; cached prefixes are dropped first.
    pub kv_budget_tokens: usize,
}

impl CandleConfig {
    /// The context used when the model's own is longer: an episode of the default protocol is
    /// well under 2,048 tokens, and a GPU cache reserves this much per slot.
    pub const DEFAULT_CONTEXT: usize = 4096;

    /// A config serving `model_path` on the CPU with f32 weights.
    pub fn new(model_path: PathBuf) -> Self {
        Self {
            model_path,
            ..Self::default()
        }
    }

    /// Checks every limit before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_sequences", self.max_sequences),
            ("max_step_tokens", self.max_step_tokens),
            ("kv_budget_tokens", self.kv_budget_tokens),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(CandleError::Config(format!("{name} must be at least 1")));
        }
        if self.context_length == Some(0) {
            return Err(CandleError::Config(
                "context_length must be at least 1".into(),
            ));
        }
        if self.model_path.as_os_str().is_empty() {
            return Err(CandleError::Config(
                "model_path must name a GGUF file".into(),
            ));
        }
        Ok(())
    }
}

impl Default for CandleConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::new(),
            device: Device::Cpu,
            weights: WeightsEncoding::F32,
            adapter_version: None,
            context_length: None,
            chat_template: None,
            max_sequences: 64,
            max_step_tokens: 512,
            prefix_cache_entries: 64,
            kv_budget_tokens: 32_768,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limits_are_refused() {
        let ok = CandleConfig::new(PathBuf::from("/m.gguf"));
        ok.validate().unwrap();
        for bad in [
            CandleConfig {
                max_sequences: 0,
                ..ok.clone()
            },
            CandleConfig {
                max_step_tokens: 0,
                ..ok.clone()
            },
            CandleConfig {
                kv_budget_tokens: 0,
                ..ok.clone()
            },
            CandleConfig {
                context_length: Some(0),
                ..ok.clone()
            },
            CandleConfig::default(),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
