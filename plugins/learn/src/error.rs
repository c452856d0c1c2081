//! The crate's one error type and its `Result` alias.

use std::path::PathBuf;

/// Everything that can stop a training round or an evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LearnError {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid round configuration: {0}")]
    Config(String),
    /// The round found nothing it could train on.
    #[error("no training data: {0}")]
    NoData(String),
    /// The round was cancelled by its caller.
    #[error("the round was cancelled")]
    Cancelled,
    /// A prompts or metrics file could not be used.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it (with the line number where one applies).
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The trainer failed.
    #[error("training failed: {0}")]
    Train(#[from] searchloop_train_sapo::TrainError),
    /// Loading the model or reading or writing an adapter or merged model failed.
    #[error(transparent)]
    Model(#[from] searchloop_llama::LlamaError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] searchloop_store_sql::StoreError),
    /// The agent loop or the policy failed while sampling episodes.
    #[error("agent: {0}")]
    Agent(#[from] searchloop_core::Error),
    /// The trainer's device cannot be opened (no such GPU, or a build without `cuda`).
    #[error("cannot train on {device}: {source}")]
    Device {
        /// The configured device.
        device: searchloop_core::Device,
        /// What candle reported.
        source: candle_core::Error,
    },
    /// The training thread ended without a result (it panicked or was aborted).
    #[error("the training thread ended abnormally: {0}")]
    Thread(String),
}

impl LearnError {
    /// An I/O error with a sentence of context naming the path involved.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = LearnError> = std::result::Result<T, E>;
