//! The candle engine's one error type and its `Result` alias.

use std::path::PathBuf;

/// What can go wrong while loading the model or serving a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CandleError {
    /// The configuration is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The model file could not be read or hashed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The model could not be loaded, or a forward pass failed.
    #[error("model {}: {source}", path.display())]
    Model {
        /// The GGUF file.
        path: PathBuf,
        /// What the model crate reported.
        #[source]
        source: searchloop_llama::LlamaError,
    },
    /// A request was refused before any work (an empty or too long prompt, bad parameters).
    #[error("request refused: {0}")]
    Request(String),
    /// Generation failed while the request ran; the message says where.
    #[error("generation failed: {0}")]
    Generation(String),
    /// The engine's threads could not be started.
    #[error("cannot start the engine's threads: {0}")]
    Threads(#[source] rayon::ThreadPoolBuildError),
    /// The engine's thread is gone (the policy is being dropped).
    #[error("the engine has stopped")]
    Stopped,
}

impl CandleError {
    pub(crate) fn io(context: String, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }
}

impl From<CandleError> for searchloop_core::Error {
    fn from(err: CandleError) -> Self {
        match err {
            CandleError::Config(message) => searchloop_core::Error::Config(message),
            other => searchloop_core::Error::Policy(other.to_string()),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = CandleError> = std::result::Result<T, E>;
