//! The demo crate's one error type and its `Result` alias.

use std::{io, path::PathBuf};

/// Errors of the demo: reading, writing and verifying the retail data set, seeding its
/// inventory database, and drawing plots.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The output directory could not be created.
    #[error("cannot create directory {}: {source}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A record could not be encoded as JSON.
    #[error("cannot encode a record of {} as JSON: {source}", .path.display())]
    Encode {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A JSON line could not be decoded.
    #[error("{}:{line}: invalid JSON record: {source}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The CSV reader or writer failed.
    #[error("{}: CSV error: {source}", .path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: csv::Error,
    },
    /// A CSV record was well-formed but held an invalid value.
    #[error("{}:{line}: {message}", .path.display())]
    CsvField {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A question failed verification against the catalog and stock.
    #[error("question {id} failed verification: {reason}")]
    InvalidQuestion {
        /// The question's id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The catalog, stores or stock are inconsistent.
    #[error("invalid retail data set: {reason}")]
    InvalidDataset {
        /// What is wrong.
        reason: String,
    },
    /// The inventory database could not be opened.
    #[error("cannot open the inventory database: {source}")]
    Connect {
        /// The underlying error.
        source: sqlx::Error,
    },
    /// Seeding the inventory failed; nothing was written (one transaction).
    #[error("seeding the inventory failed while {step}: {source}")]
    Seed {
        /// What was being done.
        step: &'static str,
        /// The underlying error.
        source: sqlx::Error,
    },
    /// A file to plot is malformed.
    #[error("{}: {reason}", .path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        reason: String,
    },
    /// A plot could not be drawn or written.
    #[error("cannot draw {}: {reason}", .path.display())]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What the plotting library reported.
        reason: String,
    },
}

/// The demo crate's result type.
pub type Result<T, E = DemoError> = std::result::Result<T, E>;
