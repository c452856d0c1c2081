//! The error type of searchloop-search-http.

use std::path::PathBuf;

use searchloop_core::ToolError;
use thiserror::Error;

/// Everything that can go wrong configuring or calling an HTTP search tool.
///
/// Messages never contain header values: secrets read from the environment stay out of errors
/// and logs.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HttpSearchError {
    /// The configuration is inconsistent or out of range; the message names the field.
    #[error("invalid HTTP search config: {0}")]
    Config(String),
    /// A configuration file could not be read.
    #[error("cannot read HTTP search config {}: {source}", .path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration file is not valid TOML for [`crate::HttpSearchConfig`].
    #[error("invalid HTTP search config {}: {source}", .path.display())]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The underlying error, with the line and the field at fault.
        source: Box<toml::de::Error>,
    },
    /// A header refers to an environment variable that is not set.
    #[error("header '{header}' needs environment variable {variable}, which is not set")]
    MissingSecret {
        /// The header's name.
        header: String,
        /// The variable's name.
        variable: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The model's query was rejected before any request was made.
    #[error("{0}")]
    InvalidQuery(String),
    /// A URL's host is not in `security.allowed_hosts`.
    #[error("host '{host}' is not in allowed_hosts")]
    HostNotAllowed {
        /// The host.
        host: String,
    },
    /// A host is, or resolves only to, an address the tool refuses to connect to.
    #[error("refusing to connect to '{host}': {address} is a {kind} address")]
    AddressRefused {
        /// The host as the URL names it.
        host: String,
        /// The refused address.
        address: std::net::IpAddr,
        /// What kind of address it is (loopback, private, link-local, cloud metadata, ...).
        kind: &'static str,
    },
    /// A redirect was refused (another host, a scheme downgrade, too many hops).
    #[error("redirect refused: {0}")]
    Redirect(String),
    /// The server answered with a non-success status.
    #[error("HTTP {status} from '{host}'")]
    Status {
        /// The status code.
        status: u16,
        /// The host that answered.
        host: String,
    },
    /// The attempt did not finish within `limits.timeout_ms`.
    #[error("request to '{host}' timed out after {ms} ms")]
    Timeout {
        /// The host.
        host: String,
        /// The per-attempt limit.
        ms: u64,
    },
    /// The connection failed or the body ended early.
    #[error("request to '{host}' failed: {message}")]
    Network {
        /// The host.
        host: String,
        /// The chain of causes.
        message: String,
    },
    /// The body exceeded `limits.max_response_bytes`.
    #[error("response from '{host}' is larger than the {limit}-byte limit")]
    TooLarge {
        /// The host.
        host: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The body is not JSON.
    #[error("response from '{host}' is not valid JSON: {message}")]
    InvalidJson {
        /// The host.
        host: String,
        /// The parser's message, with the position.
        message: String,
    },
    /// Every attempt failed; `last` is the final attempt's error.
    #[error("{last} (gave up after {attempts} attempts)")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Box<HttpSearchError>,
    },
    /// The JSON has no array at `results.list`.
    #[error("response has no result list at '{pointer}' (found {found})")]
    NoResultList {
        /// The JSON pointer of the list.
        pointer: String,
        /// What is there instead.
        found: &'static str,
    },
}

impl HttpSearchError {
    /// Whether another attempt might succeed: server errors, timeouts and broken connections are
    /// retried; client errors (4xx), refused addresses and bad bodies are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500,
            Self::Timeout { .. } | Self::Network { .. } => true,
            _ => false,
        }
    }
}

impl From<HttpSearchError> for ToolError {
    fn from(error: HttpSearchError) -> Self {
        match error {
            HttpSearchError::InvalidQuery(message) => ToolError::InvalidArguments(message),
            HttpSearchError::Timeout { ms, .. } => ToolError::Timeout(ms),
            HttpSearchError::GaveUp { last, .. }
                if matches!(*last, HttpSearchError::Timeout { .. }) =>
            {
                ToolError::from(*last)
            }
            other => ToolError::Failed(other.to_string()),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = HttpSearchError> = std::result::Result<T, E>;
