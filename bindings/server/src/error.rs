//! The error type of searchloop-server: what can stop the server from starting or from shutting
//! down cleanly. Errors of single requests are HTTP responses ([`crate::api::ApiError`]), not
//! this type.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use thiserror::Error;

/// Everything that can go wrong configuring, starting or stopping the server.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A server setting is out of range.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The API key's environment variable is unset, not Unicode, or holds no usable key.
    #[error("API key environment variable {name}: {reason}")]
    ApiKeyEnv {
        /// The variable's name.
        name: String,
        /// What is wrong with it (the key itself is never shown).
        reason: String,
    },
    /// The API key file cannot be read or holds no usable key.
    #[error("API key file {}: {reason}", path.display())]
    ApiKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (the key itself is never shown).
        reason: String,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while accepting connections.
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// Requests were still running when the shutdown grace period ended; they were answered
    /// with 503 and their episodes abandoned.
    #[error(
        "{abandoned} request(s) were still running {:.1} s after shutdown began, and were abandoned",
        grace.as_secs_f64()
    )]
    ShutdownTimeout {
        /// The grace period that ran out.
        grace: Duration,
        /// Requests in flight when it ran out.
        abandoned: u64,
    },
}

/// Result alias of the server.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;
