//! The error type of searchloop-core.

use thiserror::Error;

/// Everything that can go wrong in the core: bad configuration, a policy (model) failure, a
/// store failure reported through a sink, or a trajectory that breaks its own invariants.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The model failed to tokenize, render or sample.
    #[error("policy error: {0}")]
    Policy(String),
    /// A trajectory sink (store, file) failed to record an episode.
    #[error("trajectory sink error: {0}")]
    Sink(String),
    /// A question is longer than `[agent.protocol] max_question_chars`: refused before any
    /// model work, so one oversized request cannot hold the engine.
    #[error(
        "the question is {chars} characters long, more than the limit of {limit} \
         ([agent.protocol] max_question_chars)"
    )]
    QuestionTooLong {
        /// The question's length in characters.
        chars: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A trajectory does not satisfy its invariants (lengths, segments, masks).
    #[error("invalid trajectory: {0}")]
    InvalidTrajectory(String),
    /// An input/output error with the path or resource it concerns.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
