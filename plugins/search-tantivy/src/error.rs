//! The crate's one error type.

use std::path::PathBuf;

use searchloop_core::ToolError;

/// Everything that can go wrong while building, updating or searching a catalog index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// A catalog file or the index directory could not be read or created.
    #[error("cannot access {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The index directory holds an index this crate cannot use (another schema, or damaged).
    #[error("cannot open the catalog index at {}: {source}", .path.display())]
    Open {
        /// The index directory.
        path: PathBuf,
        /// What tantivy reported.
        source: tantivy::TantivyError,
    },
    /// An operation on an open index failed.
    #[error("catalog index at {} failed to {action}: {source}", .path.display())]
    Index {
        /// The index directory.
        path: PathBuf,
        /// What was being done, e.g. "commit".
        action: &'static str,
        /// What tantivy reported.
        source: tantivy::TantivyError,
    },
    /// The index holds a stored product that cannot be decoded.
    #[error("catalog index at {} holds a damaged product record ({message}); rebuild it", .path.display())]
    Corrupt {
        /// The index directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A JSONL line is not a valid product record.
    #[error("{}:{line}: invalid product record: {source}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A CSV file could not be parsed.
    #[error("{}:{line}: invalid CSV: {source}", .path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0 when the CSV reader does not know it).
        line: u64,
        /// The underlying error.
        source: csv::Error,
    },
    /// A record parsed but holds an unusable value (no SKU, a price that is not a number, ...).
    #[error("{}:{line}: {message}", .path.display())]
    InvalidRecord {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A product handed to [`crate::CatalogIndex::upsert`] is unusable.
    #[error("product {sku:?}: {message}")]
    InvalidProduct {
        /// The product's SKU as given.
        sku: String,
        /// What is wrong.
        message: String,
    },
    /// A catalog source's format cannot be told from its file name.
    #[error("{}: unknown catalog format (expected a .jsonl or .csv file)", .path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A search query cannot be run; the message tells the caller how to fix it.
    #[error("{0}")]
    InvalidQuery(String),
    /// A background search task ended without a result.
    #[error("catalog search task failed: {0}")]
    Task(String),
}

/// A `Result` with [`CatalogError`].
pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

impl From<CatalogError> for ToolError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::InvalidQuery(message) => ToolError::InvalidArguments(message),
            other => ToolError::Failed(other.to_string()),
        }
    }
}
