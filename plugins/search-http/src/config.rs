//! The HTTP search tool's configuration: serde structs (TOML or JSON, unknown fields rejected)
//! and their validation.
//!
//! One config describes a SearxNG-style, an Elasticsearch/OpenSearch-style or a generic REST
//! retriever; the crate's `configs/` directory ships an example of each.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{HttpSearchError, Result};

/// A JSON search API, as the host describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSearchConfig {
    /// The name the model calls the tool by (`[a-z0-9_-]`, at most 64 characters).
    pub name: String,
    /// What the tool finds, in one or two sentences for the model.
    pub description: String,
    /// URL template, e.g. `https://searx.example/search?format=json&q={query}`. Slots
    /// (`{query}`, `{limit}`) may only appear in the query string; `{{`/`}}` are literal braces.
    pub url: String,
    /// The HTTP method.
    #[serde(default)]
    pub method: HttpMethod,
    /// A query-string parameter to append the query to (instead of a `{query}` slot in `url`).
    #[serde(default)]
    pub query_param: Option<String>,
    /// JSON body template for POST: any string value may hold `{query}`/`{limit}` slots; a
    /// string that is exactly `{limit}` becomes a number.
    #[serde(default)]
    pub body: Option<Value>,
    /// Extra request headers. `${NAME}` in a value is replaced by the environment variable
    /// `NAME` when the tool is built; such values are marked sensitive and never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Where the results are in the response, and which fields to show.
    pub results: ResultsConfig,
    /// Timeouts, retries and size caps.
    #[serde(default)]
    pub limits: HttpLimits,
    /// Allowlist and private-address policy.
    #[serde(default)]
    pub security: SecurityConfig,
}

/// HTTP methods the tool can use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// GET: the query goes in the URL.
    #[default]
    Get,
    /// POST: the query goes in the JSON body (or the URL).
    Post,
}

/// How to read results out of the response JSON.
///
/// Each location is a JSON pointer (`/hits/hits`, `/_source/name`) or a dotted path
/// (`hits.hits`, `_source.name`); `""` is the whole document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsConfig {
    /// Location of the result array in the response.
    pub list: String,
    /// Location of a result's title, inside the result.
    pub title: String,
    /// Location of a result's snippet, inside the result.
    #[serde(default)]
    pub snippet: Option<String>,
    /// Location of a result's URL, inside the result.
    #[serde(default)]
    pub url: Option<String>,
    /// Results shown to the model (1 to 50); also the value of the `{limit}` slot.
    #[serde(default = "default_max_results")]
    pub max_results: usize,
    /// A snippet is cut to this many characters (20 to 4,000).
    #[serde(default = "default_snippet_chars")]
    pub snippet_chars: usize,
}

fn default_max_results() -> usize {
    5
}

fn default_snippet_chars() -> usize {
    240
}

/// Reliability limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Limit on establishing a connection (TCP and TLS).
    pub connect_timeout_ms: u64,
    /// Limit on one attempt, from connecting to the last body byte, redirects included.
    pub timeout_ms: u64,
    /// Further attempts after a server error (5xx), a timeout or a broken connection (0 to 5).
    /// Client errors (4xx) are never retried.
    pub retries: u32,
    /// Wait before the first retry; it doubles for each later one.
    pub backoff_ms: u64,
    /// Largest response body read, in bytes (at most 64 MiB).
    pub max_response_bytes: usize,
    /// Requests in flight at once across all callers of this tool; further calls wait.
    pub max_concurrent_requests: usize,
    /// Redirects followed, each to the same host (0 to 10).
    pub max_redirects: usize,
    /// Longest query accepted from the model, in characters (1 to 4,096).
    pub max_query_chars: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2_000,
            timeout_ms: 5_000,
            retries: 2,
            backoff_ms: 100,
            max_response_bytes: 2 * 1024 * 1024,
            max_concurrent_requests: 8,
            max_redirects: 3,
            max_query_chars: 256,
        }
    }
}

/// Where the tool may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Hosts the tool may request: names, IP addresses, or `*.domain` for subdomains. Empty
    /// means the URL template's host only.
    pub allowed_hosts: Vec<String>,
    /// Allow loopback, private (RFC 1918, unique-local) and carrier-grade-NAT addresses, for a
    /// search service on the host's own network. Link-local and cloud-metadata addresses are
    /// refused regardless.
    pub allow_private: bool,
}

impl HttpSearchConfig {
    /// Parses a TOML config.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| HttpSearchError::Config(e.to_string()))
    }

    /// Reads and parses a TOML config file; errors name the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| HttpSearchError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| HttpSearchError::ParseConfig {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

/// Checks the numeric limits; the message names the field and the accepted range.
pub(crate) fn check_limits(limits: &HttpLimits, results: &ResultsConfig) -> Result<()> {
    let ranges: [(&str, u64, u64, u64); 10] = [
        (
            "limits.connect_timeout_ms",
            limits.connect_timeout_ms,
            1,
            600_000,
        ),
        ("limits.timeout_ms", limits.timeout_ms, 1, 600_000),
        ("limits.retries", u64::from(limits.retries), 0, 5),
        ("limits.backoff_ms", limits.backoff_ms, 0, 60_000),
        (
            "limits.max_response_bytes",
            limits.max_response_bytes as u64,
            1,
            64 << 20,
        ),
        (
            "limits.max_concurrent_requests",
            limits.max_concurrent_requests as u64,
            1,
            1_024,
        ),
        ("limits.max_redirects", limits.max_redirects as u64, 0, 10),
        (
            "limits.max_query_chars",
            limits.max_query_chars as u64,
            1,
            4_096,
        ),
        ("results.max_results", results.max_results as u64, 1, 50),
        (
            "results.snippet_chars",
            results.snippet_chars as u64,
            20,
            4_000,
        ),
    ];
    for (field, value, min, max) in ranges {
        if !(min..=max).contains(&value) {
            return Err(HttpSearchError::Config(format!(
                "{field} is {value}; it must be between {min} and {max}"
            )));
        }
    }
    Ok(())
}

/// A result location (JSON pointer or dotted path) as a JSON pointer.
pub(crate) fn to_pointer(field: &str, location: &str) -> Result<String> {
    if location.is_empty() || location.starts_with('/') {
        return Ok(location.to_string());
    }
    let mut pointer = String::new();
    for segment in location.split('.') {
        if segment.is_empty() {
            return Err(HttpSearchError::Config(format!(
                "{field} '{location}' has an empty path segment"
            )));
        }
        pointer.push('/');
        pointer.push_str(&segment.replace('~', "~0").replace('/', "~1"));
    }
    Ok(pointer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_become_pointers() {
        assert_eq!(to_pointer("f", "hits.hits").unwrap(), "/hits/hits");
        assert_eq!(to_pointer("f", "/hits/hits").unwrap(), "/hits/hits");
        assert_eq!(to_pointer("f", "").unwrap(), "");
        assert_eq!(to_pointer("f", "a/b.c~d").unwrap(), "/a~1b/c~0d");
        assert!(to_pointer("f", "a..b").is_err());
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        let base = "name = \"web\"\ndescription = \"d\"\nurl = \"http://h/?q={query}\"\n\
                    [results]\nlist = \"/r\"\ntitle = \"t\"\n";
        assert!(HttpSearchConfig::from_toml_str(base).is_ok());
        let err = HttpSearchConfig::from_toml_str(&format!("{base}colour = 1\n")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = HttpSearchConfig::from_toml_str(&base.replace("url", "method = \"PUT\"\nurl"))
            .unwrap_err();
        assert!(err.to_string().contains("PUT"), "{err}");
    }
}
