//! HTTP JSON search API tool for searchloop.
//!
//! [`HttpSearchTool`] turns a search API described in config ([`HttpSearchConfig`]) into a
//! [`searchloop_core::Tool`] whose only argument is the model's query. One config shape covers
//! SearxNG-style, Elasticsearch/OpenSearch-style and generic REST retrievers; the crate's
//! `configs/` directory has an example of each.
//!
//! The model's arguments are hostile input, so:
//!
//! - the model fills the `{query}` slot only: never the URL's host or path, never a header. The
//!   slot is percent-encoded in the URL's query string and substituted structurally in a JSON
//!   body, so no query can change the request's shape;
//! - every URL requested, redirects included, must be on `security.allowed_hosts`; redirects
//!   are followed by the tool itself, on the same host only, up to `limits.max_redirects`;
//! - names are resolved by the tool's own resolver, which drops loopback, private, link-local
//!   and metadata addresses (loopback and private only with `security.allow_private`; link-local
//!   and metadata never), so the allowlist holds after DNS resolution too;
//! - connect and per-attempt timeouts, bounded retries with exponential backoff (5xx, timeouts,
//!   broken connections; never 4xx), a response size cap enforced while streaming, and a cap on
//!   requests in flight;
//! - header values may name environment variables (`${TOKEN}`); those values are marked
//!   sensitive, and neither `Debug` nor any error or log line shows a header value.
//!
//! ```toml
//! name = "web"
//! description = "Searches the web."
//! url = "https://searx.example/search?format=json&q={query}"
//! [results]
//! list = "/results"
//! title = "/title"
//! snippet = "/content"
//! url = "/url"
//! ```

mod config;
mod error;
mod guard;
mod template;
mod tool;

pub use config::{HttpLimits, HttpMethod, HttpSearchConfig, ResultsConfig, SecurityConfig};
pub use error::{HttpSearchError, Result};
pub use tool::{HttpSearchTool, SearchArgs};
