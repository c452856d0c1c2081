//! The error type of the mistral.rs serving policy.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong while loading or serving a GGUF model with mistral.rs.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The configuration is inconsistent or out of range.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// The model path does not name an existing local GGUF file. A missing path is refused here
    /// because mistral.rs would otherwise treat it as a Hugging Face repository id.
    #[error("model file {path}: {reason}")]
    ModelPath {
        /// The path as configured.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading, writing or hashing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The GGUF content could not be read, re-encoded or written.
    #[error("GGUF file {path}: {message}")]
    Gguf {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// mistral.rs failed to build its pipeline from the file.
    #[error("mistral.rs could not load {path}: {message}")]
    Load {
        /// The GGUF file being loaded.
        path: PathBuf,
        /// mistral.rs's own message.
        message: String,
    },
    /// The chat template is missing, does not compile, or failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The chat template (shared with the candle engine) failed.
    #[error(transparent)]
    Template(#[from] searchloop_llama::LlamaError),
    /// The tokenizer failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A sampling request was malformed (empty prompt, too long for the context, bad params).
    #[error("invalid sampling request: {0}")]
    Request(String),
    /// The engine failed while generating, or answered in an unexpected way.
    #[error("generation failed: {0}")]
    Generation(String),
}

impl ModelError {
    /// An [`ModelError::Io`] naming what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// A [`ModelError::Gguf`] for `path`.
    pub(crate) fn gguf(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        Self::Gguf {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

impl From<ModelError> for searchloop_core::Error {
    fn from(err: ModelError) -> Self {
        match err {
            ModelError::Config(message) => searchloop_core::Error::Config(message),
            other => searchloop_core::Error::Policy(other.to_string()),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
