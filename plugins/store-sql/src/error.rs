//! The error type of the store: one enum, each message naming the file, record or value at fault.

use std::path::PathBuf;

use thiserror::Error;

use crate::adapters::AdapterStatus;

/// Everything that can go wrong in the store.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file exists but does not start with the SQLite header.
    #[error(
        "{path} is not a SQLite database (it does not start with the SQLite header); refusing to \
         use it as a trajectory store, and leaving it untouched"
    )]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The file is a SQLite database, but damaged (truncated, malformed pages).
    #[error(
        "{path} is a damaged SQLite database ({detail}); refusing to use it, and leaving it untouched"
    )]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The database (a SQLite file, or a PostgreSQL schema) holds tables that are not a
    /// searchloop store.
    #[error(
        "{location} is not a searchloop trajectory store ({detail}); refusing to use it, and leaving it untouched"
    )]
    ForeignDatabase {
        /// The file path or the PostgreSQL schema.
        location: String,
        /// What was found.
        detail: String,
    },
    /// The store was written by a newer searchloop with a schema this version does not know.
    #[error(
        "{location} has store schema version {found}, newer than the {supported} this build \
         supports; upgrade searchloop (the store is left untouched)"
    )]
    SchemaTooNew {
        /// The file path or the PostgreSQL schema.
        location: String,
        /// The version found.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The store URL or path cannot be used.
    #[error("invalid store location '{location}': {reason}")]
    InvalidLocation {
        /// What was given.
        location: String,
        /// Why it is refused.
        reason: String,
    },
    /// A database operation failed.
    #[error("database error while trying to {context}: {source}")]
    Database {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No trajectory has this id.
    #[error("unknown trajectory id '{0}'")]
    UnknownTrajectory(String),
    /// No adapter has this version.
    #[error("unknown adapter version {0}")]
    UnknownAdapter(u64),
    /// A trajectory given to the store breaks its invariants.
    #[error("trajectory refused: {0}")]
    InvalidTrajectory(String),
    /// A trajectory with this id is already stored with different content.
    #[error("trajectory '{0}' is already stored with different content")]
    TrajectoryConflict(String),
    /// Feedback was refused (non-finite or out-of-range value, bad source name or key).
    #[error("feedback for trajectory '{trajectory_id}' refused: {reason}")]
    InvalidFeedback {
        /// The trajectory the feedback was for.
        trajectory_id: String,
        /// Why it was refused.
        reason: String,
    },
    /// The idempotency key was already used for different feedback on this trajectory.
    #[error(
        "idempotency key '{key}' of trajectory '{trajectory_id}' was already used for different \
         feedback ({existing})"
    )]
    IdempotencyConflict {
        /// The trajectory.
        trajectory_id: String,
        /// The reused key.
        key: String,
        /// The feedback recorded first under that key.
        existing: String,
    },
    /// A stored record cannot be decoded (bad blob lengths, unknown codes, broken invariants).
    #[error("stored record '{id}' is corrupt: {detail}")]
    CorruptRecord {
        /// The trajectory id or adapter version.
        id: String,
        /// What is wrong.
        detail: String,
    },
    /// An adapter cannot make this status change.
    #[error("adapter version {version} is {from}, so it cannot be {action}")]
    InvalidTransition {
        /// The adapter version.
        version: u64,
        /// Its current status.
        from: AdapterStatus,
        /// What was asked (`promoted`, `rejected`, ...).
        action: &'static str,
    },
    /// A rollback was asked while no adapter is promoted.
    #[error("no adapter is promoted, so there is nothing to roll back")]
    NothingPromoted,
    /// An argument is out of range or malformed (page token, cursor, limit).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A value could not be converted to or from JSON.
    #[error("JSON error while trying to {context}: {source}")]
    Json {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attaches what was being done to a driver error.
pub(crate) trait DbContext<T> {
    /// Wraps the error in [`StoreError::Database`] with `context`.
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T> DbContext<T> for std::result::Result<T, sqlx::Error> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|source| StoreError::Database {
            context: context.to_string(),
            source,
        })
    }
}

impl From<StoreError> for searchloop_core::Error {
    fn from(e: StoreError) -> Self {
        searchloop_core::Error::Sink(e.to_string())
    }
}
