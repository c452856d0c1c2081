//! The model crate's one error type and its `Result` alias.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model, running it, or reading and writing
/// adapters and merged models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlamaError {
    /// The model file does not exist.
    #[error("model file not found: {}", path.display())]
    ModelNotFound {
        /// The path that was looked up.
        path: PathBuf,
    },
    /// The file exists but is not a readable GGUF file.
    #[error("{} is not a readable GGUF file: {reason}", path.display())]
    NotGguf {
        /// The offending file.
        path: PathBuf,
        /// What the GGUF reader reported.
        reason: String,
    },
    /// The GGUF declares an architecture this crate has no forward pass for.
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    /// A tensor the architecture needs is absent from the GGUF.
    #[error("the GGUF has no tensor `{0}`")]
    MissingTensor(String),
    /// A metadata key the architecture needs is absent or has the wrong type.
    #[error("the GGUF metadata key `{key}` is missing or invalid: {reason}")]
    BadMetadata {
        /// The metadata key.
        key: String,
        /// Why it could not be used.
        reason: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Input data (token sequences, masks, tensors) is malformed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An adapter on disk is malformed or does not fit the model.
    #[error("invalid adapter: {0}")]
    Adapter(String),
    /// The chat template is missing, does not compile, or failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The tokenizer failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A JSON (de)serialisation error.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A safetensors (de)serialisation error.
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafeTensorError),
}

/// The model crate's result type.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;
