//! How the served model is loaded: which GGUF file, how its weights are encoded for speed, and
//! the engine's limits.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

pub use searchloop_llama::WeightsEncoding;

/// Configuration of [`crate::MistralRsPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MistralRsConfig {
    /// Absolute path of a local GGUF file (llama-family or Qwen2). The tokenizer and the chat
    /// template come from its metadata.
    pub model_path: PathBuf,
    /// Version of the adapter merged into this GGUF, `None` for the base model.
    #[serde(default)]
    pub adapter_version: Option<u64>,
    /// Most sequences decoded together on a GPU ([`MistralRsConfig::cuda_device`]); further
    /// requests wait their turn. On the CPU one sequence is decoded at a time whatever this
    /// says: mistral.rs 0.8.1's CPU decode attention mixes up the sequences of a batch.
    #[serde(default = "default_max_concurrent_sequences")]
    pub max_concurrent_sequences: usize,
    /// A Jinja chat template replacing the one in the GGUF metadata.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Longest prompt plus completion accepted; `None` uses the model's own context length.
    /// Larger than the model's own is refused.
    #[serde(default)]
    pub context_length: Option<usize>,
    /// In-memory encoding of the weights.
    #[serde(default)]
    pub weights: WeightsEncoding,
    /// Folder for re-encoded copies of the model; `None` writes them beside the original.
    #[serde(default)]
    pub reencoded_dir: Option<PathBuf>,
    /// Finished sequences whose KV cache the engine keeps to reuse for later prompts that
    /// begin the same way; 0 (the default) turns reuse off.
    ///
    /// Only safe when no prompt extends an earlier sample's whole sequence. mistral.rs 0.8.1
    /// caches a finished sequence including its last generated token, whose keys and values
    /// were never computed, so a next turn built as `prompt + sample + more` starts from a
    /// wrong cache entry (measured: first log-probability off by 1.2 nats). Prompts that only
    /// share a system prompt or an earlier prompt's beginning are reused exactly.
    #[serde(default)]
    pub prefix_cache_sequences: usize,
    /// Ordinal of the CUDA GPU to serve from; `None` serves from the CPU. Needs the crate's
    /// `cuda` feature.
    #[serde(default)]
    pub cuda_device: Option<usize>,
}

fn default_max_concurrent_sequences() -> usize {
    32
}

impl MistralRsConfig {
    /// A configuration serving `model_path` with every other setting at its default.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            adapter_version: None,
            max_concurrent_sequences: default_max_concurrent_sequences(),
            chat_template: None,
            context_length: None,
            weights: WeightsEncoding::default(),
            reencoded_dir: None,
            prefix_cache_sequences: 0,
            cuda_device: None,
        }
    }

    /// Checks the values that can be checked without touching the file system.
    pub fn validate(&self) -> Result<()> {
        if self.max_concurrent_sequences == 0 {
            return Err(ModelError::Config(
                "max_concurrent_sequences must be at least 1".into(),
            ));
        }
        if self.context_length == Some(0) {
            return Err(ModelError::Config(
                "context_length must be at least 1".into(),
            ));
        }
        if self
            .chat_template
            .as_ref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ModelError::Config(
                "chat_template, when given, must not be empty".into(),
            ));
        }
        if let Some(dir) = &self.reencoded_dir
            && !dir.is_absolute()
        {
            return Err(ModelError::Config(format!(
                "reencoded_dir must be an absolute path, got {}",
                dir.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_unknown_fields_are_refused() {
        let config: MistralRsConfig =
            serde_json::from_str(r#"{"model_path": "/models/m.gguf", "weights": "q8_0"}"#).unwrap();
        assert_eq!(config.weights, WeightsEncoding::Q8_0);
        assert_eq!(config.max_concurrent_sequences, 32);
        assert_eq!(config.prefix_cache_sequences, 0);
        config.validate().unwrap();

        let unknown = serde_json::from_str::<MistralRsConfig>(
            r#"{"model_path": "/models/m.gguf", "temperature": 1.0}"#,
        );
        assert!(unknown.unwrap_err().to_string().contains("temperature"));
        let bad_weights = serde_json::from_str::<MistralRsConfig>(
            r#"{"model_path": "/m.gguf", "weights": "q5"}"#,
        );
        assert!(bad_weights.is_err());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let mut config = MistralRsConfig::new("/models/m.gguf");
        config.max_concurrent_sequences = 0;
        assert!(config.validate().is_err());
        let mut config = MistralRsConfig::new("/models/m.gguf");
        config.context_length = Some(0);
        assert!(config.validate().is_err());
        let mut config = MistralRsConfig::new("/models/m.gguf");
        config.reencoded_dir = Some("relative/dir".into());
        assert!(config.validate().is_err());
    }

    #[test]
    fn encodings_round_trip_through_their_names() {
        for encoding in [
            WeightsEncoding::Original,
            WeightsEncoding::Q8_0,
            WeightsEncoding::Q4_0,
            WeightsEncoding::F32,
        ] {
            assert_eq!(
                encoding.as_str().parse::<WeightsEncoding>().unwrap(),
                encoding
            );
            let json = serde_json::to_string(&encoding).unwrap();
            assert_eq!(json, format!("\"{encoding}\""));
        }
        assert!("q4_1".parse::<WeightsEncoding>().is_err());
    }
}
