//! The error type of searchloop-loop: the loop's own refusals, and the errors of the store,
//! the rounds and the models it loads.

use thiserror::Error;

/// What can go wrong in the learning loop.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoopError {
    /// The loop's configuration is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A model could not be loaded by the [`crate::PolicyLoader`].
    #[error("model: {0}")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
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
    /// Another process holds the store's trainer lease: one process trains per store.
    #[error(
        "another process holds this store's trainer lease; one process trains from a store at \
         a time, and this one takes over when that one stops"
    )]
    TrainerElsewhere,
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

impl LoopError {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: String, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }
}

/// Result alias for the loop.
pub type Result<T, E = LoopError> = std::result::Result<T, E>;
