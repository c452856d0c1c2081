//! The error type of searchloop-search-sql.

use std::path::PathBuf;

use searchloop_core::ToolError;
use thiserror::Error;

/// Everything that can go wrong configuring, seeding or calling the inventory tool.
///
/// Database URLs appear with their password removed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SqlError {
    /// The configuration is inconsistent or out of range; the message names the field.
    #[error("invalid SQL inventory config: {0}")]
    Config(String),
    /// A configuration file could not be read.
    #[error("cannot read SQL inventory config {}: {source}", .path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration file is not valid TOML for [`crate::InventoryConfig`].
    #[error("invalid SQL inventory config {}: {source}", .path.display())]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The underlying error, with the line and the field at fault.
        source: Box<toml::de::Error>,
    },
    /// The database could not be opened.
    #[error("cannot connect to {database}: {source}")]
    Connect {
        /// The database URL, password removed.
        database: String,
        /// The underlying error.
        source: sqlx::Error,
    },
    /// A declared query is not valid SQL for the database (unknown table or column, syntax).
    #[error("query '{query}' does not prepare: {source}")]
    Prepare {
        /// The query's name.
        query: String,
        /// The database's error.
        source: sqlx::Error,
    },
    /// The model's arguments do not fit the declared query.
    #[error("{0}")]
    InvalidArguments(String),
    /// The statement ran past `limits.statement_timeout_ms` and was stopped.
    #[error("query '{query}' was stopped after {ms} ms")]
    Timeout {
        /// The query's name.
        query: String,
        /// The limit.
        ms: u64,
    },
    /// The database refused a write: the tool's connections are read-only.
    #[error("query '{query}' tried to write and the read-only database refused: {message}")]
    WriteRefused {
        /// The query's name.
        query: String,
        /// The database's message.
        message: String,
    },
    /// The database failed running a query.
    #[error("query '{query}' failed: {source}")]
    Database {
        /// The query's name.
        query: String,
        /// The underlying error.
        source: sqlx::Error,
    },
    /// A result column has a type the tool cannot show.
    #[error(
        "query '{query}': column '{column}' has type {type_name}, which the tool cannot show; \
         cast it in the query (to text, an integer or a double)"
    )]
    UnsupportedColumn {
        /// The query's name.
        query: String,
        /// The column's name.
        column: String,
        /// The database's type name.
        type_name: String,
    },
}

impl From<SqlError> for ToolError {
    fn from(error: SqlError) -> Self {
        match error {
            SqlError::InvalidArguments(message) => ToolError::InvalidArguments(message),
            SqlError::Timeout { ms, .. } => ToolError::Timeout(ms),
            other => ToolError::Failed(other.to_string()),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = SqlError> = std::result::Result<T, E>;
