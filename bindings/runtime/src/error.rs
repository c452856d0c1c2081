//! The error type of searchloop-runtime: configuration, fetching, and the plugins' errors.

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
    /// No adapter of this version is registered.
    #[error("adapter registry: there is no adapter v{0}")]
    UnknownAdapter(u64),
    /// An adapter cannot be promoted, rolled back to or served; the message names it.
    #[error("adapter registry: {0}")]
    Adapter(String),
    /// A training round is already running; rounds run one at a time.
    #[error("a training round is already running")]
    RoundBusy,
    /// The training round was cancelled.
    #[error("the training round was cancelled")]
    RoundCancelled,
    /// The training round was stopped because the process outgrew its memory cap.
    #[error(
        "the training round was stopped: the process used {resident_mb} MiB, over the cap of \
         {cap_mb} MiB (learn.memory_cap_mb)"
    )]
    MemoryCap {
        /// Resident memory when the round was stopped.
        resident_mb: u64,
        /// The configured cap.
        cap_mb: u64,
    },
    /// A training round or an evaluation failed.
    #[error("training round: {0}")]
    Learn(#[from] searchloop_learn::LearnError),
}

impl RuntimeError {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: String, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }
}

/// Result alias for the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
