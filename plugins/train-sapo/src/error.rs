//! The trainer's one error type and its `Result` alias.

use searchloop_llama::LlamaError;

/// Everything that can go wrong while training: the model's own errors, bad settings or
/// batches, and cancellation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// Loading or running the model, or reading or writing an adapter, failed.
    #[error(transparent)]
    Model(#[from] LlamaError),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Input data (token sequences, masks, tensors) is malformed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An adapter does not fit the trainer (a behaviour adapter of another shape, say).
    #[error("invalid adapter: {0}")]
    Adapter(String),
    /// Training was stopped by its caller (an observer returned `false`).
    #[error("training was cancelled")]
    Cancelled,
    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The trainer's result type.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
