//! The errors that cross the FFI: [`SearchloopError`], the one flat error every exported
//! function raises, and [`HostToolError`], what a host's own tool may raise back into Rust.
//!
//! uniffi can lower a flat error to the host but cannot lift one from it, so the host-to-Rust
//! direction needs its own (non-flat) type; it never reaches the host again, because a failing
//! host tool becomes an observation for the model, not an error of `ask`.

use searchloop_loop::LoopError;
use searchloop_runtime::RuntimeError;
use searchloop_store_sql::StoreError;

/// Everything an exported function can raise. Each variant carries the full message of the
/// error at fault (naming the file, field, id or value); the host sees it as the exception's
/// text, and the variant as the exception's class.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
#[non_exhaustive]
pub enum SearchloopError {
    /// The options or the config file are invalid, or a file they name cannot be read.
    #[error("{0}")]
    Config(String),
    /// The model could not be fetched, loaded or run.
    #[error("{0}")]
    Model(String),
    /// A configured tool could not be opened, or a host tool's name or description could not
    /// be read.
    #[error("{0}")]
    Tool(String),
    /// An argument is unusable (an empty question, say).
    #[error("{0}")]
    InvalidInput(String),
    /// No stored trajectory has the id.
    #[error("{0}")]
    UnknownTrajectory(String),
    /// Feedback was refused: a value out of range, a bad source name, a reused idempotency key.
    #[error("{0}")]
    InvalidFeedback(String),
    /// The trajectory store failed.
    #[error("{0}")]
    Store(String),
    /// The episode failed (the model or the agent loop, not a tool: tool failures are
    /// observations).
    #[error("{0}")]
    Episode(String),
    /// An adapter cannot be promoted, rolled back to or loaded, or no adapter has the version.
    #[error("{0}")]
    Adapter(String),
    /// A training round could not run or failed (one already running, cancelled, over the
    /// memory cap, or a training error).
    #[error("{0}")]
    Learning(String),
    /// The bindings' own machinery failed (the async runtime, a task).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for SearchloopError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::UnknownTrajectory(_) => Self::UnknownTrajectory(message),
            StoreError::InvalidFeedback { .. } | StoreError::IdempotencyConflict { .. } => {
                Self::InvalidFeedback(message)
            }
            _ => Self::Store(message),
        }
    }
}

impl From<RuntimeError> for SearchloopError {
    fn from(e: RuntimeError) -> Self {
        let message = e.to_string();
        match e {
            RuntimeError::Config(_) | RuntimeError::Io { .. } => Self::Config(message),
            RuntimeError::Core(searchloop_core::Error::Config(_)) => Self::Config(message),
            RuntimeError::Core(searchloop_core::Error::QuestionTooLong { .. }) => {
                Self::InvalidInput(message)
            }
            RuntimeError::Fetch(_) | RuntimeError::Model(_) => Self::Model(message),
            RuntimeError::Tool { .. } => Self::Tool(message),
            RuntimeError::Store(store) => store.into(),
            RuntimeError::Core(_) => Self::Episode(message),
            RuntimeError::Loop(LoopError::UnknownAdapter(_) | LoopError::Adapter(_)) => {
                Self::Adapter(message)
            }
            RuntimeError::Loop(LoopError::Config(_)) => Self::Config(message),
            RuntimeError::Loop(LoopError::Store(store)) => store.into(),
            RuntimeError::Loop(LoopError::Load(_)) => Self::Model(message),
            RuntimeError::Loop(_) => Self::Learning(message),
            // The runtime's error is non-exhaustive; a kind added later still keeps its message.
            _ => Self::Internal(message),
        }
    }
}

/// Result alias of the bindings.
pub type Result<T, E = SearchloopError> = std::result::Result<T, E>;

/// What a host tool raises when its search fails. The message becomes the observation the
/// model reads (`error: …`); the episode goes on.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum HostToolError {
    /// The host's search failed.
    #[error("{message}")]
    Failed {
        /// What went wrong, in words the model can read.
        message: String,
    },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for HostToolError {
    /// Any other exception the host raises (a `KeyError` in Python, say) arrives here, with
    /// the host's own rendering of it, and is reported the same way.
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        Self::Failed {
            message: format!("the host tool raised {}", e.reason),
        }
    }
}
