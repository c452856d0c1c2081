//! The error type of searchloop-runtime: configuration, fetching, and the plugins' and the
//! learning loop's errors.

use thiserror::Error;

/// What can go wrong while assembling or running a searchloop agent.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The configuration is invalid; the message names the field or file.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The default model could not be fetched or verified.
    #[error("cannot fetch the default model: {0}")]
    Fetch(String),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The model could not be loaded or failed.
    #[error("model: {0}")]
    Model(String),
    /// A tool could not be opened.
    #[error("tool '{tool}': {message}")]
    Tool {
        /// The tool's name.
        tool: String,
        /// What went wrong.
        message: String,
    },
    /// The trajectory store failed or refused an input.
    #[error(transparent)]
    Store(#[from] searchloop_store_sql::StoreError),
    /// The core (agent loop, policy) failed.
    #[error(transparent)]
    Core(#[from] searchloop_core::Error),
    /// The learning loop (rounds, the gate, promotion and rollback) failed or refused.
    #[error(transparent)]
    Loop(#[from] searchloop_loop::LoopError),
}

impl RuntimeError {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: String, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }
}

/// Result alias for the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
