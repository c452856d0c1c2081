//! The HTTP search tool: renders the request from the config and the model's query, sends it
//! through the SSRF guard with timeouts, retries, redirects and a size cap, and renders the
//! results compactly for a small model.

use std::{fmt, time::Duration};

use reqwest::{
    Method, Response,
    header::{
        ACCEPT, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue,
        LOCATION, TRANSFER_ENCODING,
    },
    redirect,
};
use searchloop_core::{Tool, ToolError, tool::truncate_chars};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use url::Url;

use crate::{
    config::{HttpLimits, HttpMethod, HttpSearchConfig, check_limits, to_pointer},
    error::{HttpSearchError, Result},
    guard::{GuardedResolver, HostGuard},
    template::{BodyTemplate, UrlTemplate},
};

/// Longest title shown, in characters.
const TITLE_CHARS: usize = 160;
/// Longest URL shown, in characters.
const URL_CHARS: usize = 200;
/// Longest HTML-like tag removed from result text; a longer `<...>` is kept as text.
const MAX_TAG_CHARS: usize = 64;

/// The arguments the model writes: only the query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchArgs {
    /// What to search for.
    pub query: String,
}

/// JSON pointers of the result list and of each result's fields.
#[derive(Debug, Clone)]
struct ResultFields {
    list: String,
    title: String,
    snippet: Option<String>,
    url: Option<String>,
    max_results: usize,
    snippet_chars: usize,
}

/// A search tool backed by a JSON HTTP API. Build it with [`HttpSearchTool::new`]; register it
/// in a `ToolRegistry` as `Arc::new(tool)`.
pub struct HttpSearchTool {
    name: String,
    description: String,
    method: Method,
    url: UrlTemplate,
    query_param: Option<String>,
    body: Option<BodyTemplate>,
    /// Configured headers, secrets marked sensitive; never printed.
    headers: HeaderMap,
    fields: ResultFields,
    limits: HttpLimits,
    guard: HostGuard,
    client: reqwest::Client,
    permits: Semaphore,
}

impl fmt::Debug for HttpSearchTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be secrets, so only their names are shown.
        f.debug_struct("HttpSearchTool")
            .field("name", &self.name)
            .field("method", &self.method)
            .field("url", &self.url.base().as_str())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("limits", &self.limits)
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl HttpSearchTool {
    /// Builds the tool, reading `${NAME}` header secrets from the process environment.
    pub fn new(config: HttpSearchConfig) -> Result<Self> {
        Self::with_env(config, |name| std::env::var(name).ok())
    }

    /// Builds the tool, reading `${NAME}` header secrets through `lookup` (a secret store, or a
    /// map in tests). Every field is validated; the error names the one at fault.
    pub fn with_env(
        config: HttpSearchConfig,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let invalid = HttpSearchError::Config;
        if config.description.trim().is_empty() {
            return Err(invalid("description is empty".into()));
        }
        check_limits(&config.limits, &config.results)?;
        let url = UrlTemplate::parse(&config.url).map_err(invalid)?;
        let body = config
            .body
            .as_ref()
            .map(BodyTemplate::compile)
            .transpose()
            .map_err(invalid)?;
        let method = match (config.method, body.is_some()) {
            (HttpMethod::Get, true) => {
                return Err(invalid("body is set but method is GET; use POST".into()));
            }
            (HttpMethod::Get, false) => Method::GET,
            (HttpMethod::Post, _) => Method::POST,
        };
        if let Some(param) = &config.query_param {
            if param.is_empty() {
                return Err(invalid("query_param is empty".into()));
            }
            if url.has_query() {
                return Err(invalid(format!(
                    "query_param '{param}' is set and url has a {{query}} slot; use one"
                )));
            }
            if url
                .base()
                .query_pairs()
                .any(|(name, _)| name == param.as_str())
            {
                return Err(invalid(format!(
                    "query_param '{param}' clashes with a parameter already in url"
                )));
            }
        }
        let query_has_a_slot = url.has_query()
            || config.query_param.is_some()
            || body.as_ref().is_some_and(BodyTemplate::has_query);
        if !query_has_a_slot {
            return Err(invalid(
                "the query goes nowhere: put {query} in url or body, or set query_param".into(),
            ));
        }
        let mut allowed_hosts = config.security.allowed_hosts.clone();
        if allowed_hosts.is_empty() {
            allowed_hosts.push(url.base().host_str().unwrap_or_default().to_string());
        }
        let guard =
            HostGuard::new(&allowed_hosts, config.security.allow_private).map_err(invalid)?;
        // The same check runs before every request; failing here names the mistake early.
        if let Err(error) = guard.check_url(url.base()) {
            return Err(invalid(format!("url: {error}")));
        }
        let results = &config.results;
        let fields = ResultFields {
            list: to_pointer("results.list", &results.list)?,
            title: to_pointer("results.title", &results.title)?,
            snippet: results
                .snippet
                .as_deref()
                .map(|s| to_pointer("results.snippet", s))
                .transpose()?,
            url: results
                .url
                .as_deref()
                .map(|s| to_pointer("results.url", s))
                .transpose()?,
            max_results: results.max_results,
            snippet_chars: results.snippet_chars,
        };
        let headers = build_headers(&config, body.is_some(), &lookup)?;
        let limits = config.limits.clone();
        let client = reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .no_proxy()
            .referer(false)
            .connect_timeout(Duration::from_millis(limits.connect_timeout_ms))
            .pool_max_idle_per_host(limits.max_concurrent_requests)
            .dns_resolver(GuardedResolver {
                allow_private: guard.allow_private(),
            })
            .user_agent(concat!(
                "searchloop-search-http/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| HttpSearchError::Client(error_chain(&e)))?;
        Ok(Self {
            name: config.name,
            description: config.description,
            method,
            url,
            query_param: config.query_param,
            body,
            headers,
            fields,
            permits: Semaphore::new(limits.max_concurrent_requests),
            limits,
            guard,
            client,
        })
    }

    /// Runs one search and returns the rendered results.
    pub async fn search(&self, query: &str) -> Result<String> {
        let query = self.clean_query(query)?;
        let limit = self.fields.max_results;
        let url = self
            .url
            .render(&query, limit, self.query_param.as_deref())
            .map_err(HttpSearchError::InvalidQuery)?;
        let body = self
            .body
            .as_ref()
            .map(|body| body.render(&query, limit).to_string().into_bytes());
        let bytes = self.fetch_with_retries(&url, body.as_deref()).await?;
        let json: Value =
            serde_json::from_slice(&bytes).map_err(|e| HttpSearchError::InvalidJson {
                host: host_of(&url),
                message: e.to_string(),
            })?;
        self.render(&json)
    }

    /// The query with control characters blanked, rejected when empty or too long.
    fn clean_query(&self, query: &str) -> Result<String> {
        let chars = query.chars().count();
        if chars > self.limits.max_query_chars {
            return Err(HttpSearchError::InvalidQuery(format!(
                "the query is {chars} characters long; the limit is {}",
                self.limits.max_query_chars
            )));
        }
        let cleaned: String = query
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let cleaned = cleaned.trim();
        if cleaned.is_empty() {
            return Err(HttpSearchError::InvalidQuery("the query is empty".into()));
        }
        Ok(cleaned.to_string())
    }

    /// Attempts the request until it succeeds, fails for good, or runs out of retries, waiting
    /// `backoff_ms`, then twice that, and so on between attempts.
    async fn fetch_with_retries(&self, url: &Url, body: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut attempt: u32 = 0;
        loop {
            let result = {
                // A permit per attempt, not per call, so a caller waiting out a backoff does not
                // hold a slot others could use.
                let _permit =
                    self.permits.acquire().await.map_err(|_| {
                        HttpSearchError::Client("the request limiter is closed".into())
                    })?;
                let limit = Duration::from_millis(self.limits.timeout_ms);
                tokio::time::timeout(limit, self.attempt(url, body))
                    .await
                    .unwrap_or_else(|_| {
                        Err(HttpSearchError::Timeout {
                            host: host_of(url),
                            ms: self.limits.timeout_ms,
                        })
                    })
            };
            match result {
                Err(error) if error.is_retryable() && attempt < self.limits.retries => {
                    attempt += 1;
                    tracing::debug!(tool = %self.name, attempt, %error, "retrying");
                    let backoff = self
                        .limits
                        .backoff_ms
                        .saturating_mul(1 << (attempt - 1).min(16));
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
                Err(error) if attempt > 0 => {
                    return Err(HttpSearchError::GaveUp {
                        attempts: attempt + 1,
                        last: Box::new(error),
                    });
                }
                other => return other,
            }
        }
    }

    /// One attempt: the request and the same-host redirects it leads to, then the capped body.
    async fn attempt(&self, url: &Url, body: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut url = url.clone();
        let mut method = self.method.clone();
        let mut body = body;
        let mut redirects = 0;
        loop {
            self.guard.check_url(&url)?;
            let host = host_of(&url);
            let mut request = self
                .client
                .request(method.clone(), url.clone())
                .headers(self.headers.clone());
            if let Some(bytes) = body {
                request = request.body(bytes.to_vec());
            }
            let response = request
                .send()
                .await
                .map_err(|e| self.request_error(&host, e))?;
            let status = response.status();
            tracing::debug!(tool = %self.name, %host, status = status.as_u16(), "response");
            if status.is_redirection()
                && let Some(location) = response.headers().get(LOCATION)
            {
                if redirects == self.limits.max_redirects {
                    return Err(HttpSearchError::Redirect(format!(
                        "more than {} redirects",
                        self.limits.max_redirects
                    )));
                }
                url = redirect_target(&url, location)?;
                // 301, 302 and 303 turn a POST into a GET without a body; 307 and 308 keep both.
                if matches!(status.as_u16(), 301..=303) && method == Method::POST {
                    method = Method::GET;
                    body = None;
                }
                redirects += 1;
                continue;
            }
            if !status.is_success() {
                return Err(HttpSearchError::Status {
                    status: status.as_u16(),
                    host,
                });
            }
            return self.read_capped(response, &host).await;
        }
    }

    /// The body, refused as soon as it is known to exceed `max_response_bytes`: from the
    /// declared length if any, else while streaming.
    async fn read_capped(&self, mut response: Response, host: &str) -> Result<Vec<u8>> {
        let limit = self.limits.max_response_bytes;
        let too_large = || HttpSearchError::TooLarge {
            host: host.to_string(),
            limit,
        };
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.request_error(host, e))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Turns a client error into this crate's: the resolver's refusal as itself, timeouts as
    /// timeouts, anything else as a network error with its causes (never the URL or headers).
    fn request_error(&self, host: &str, error: reqwest::Error) -> HttpSearchError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(cause) = source {
            if let Some(HttpSearchError::AddressRefused {
                host,
                address,
                kind,
            }) = cause.downcast_ref::<HttpSearchError>()
            {
                return HttpSearchError::AddressRefused {
                    host: host.clone(),
                    address: *address,
                    kind,
                };
            }
            source = cause.source();
        }
        if error.is_timeout() {
            return HttpSearchError::Timeout {
                host: host.to_string(),
                ms: self.limits.connect_timeout_ms,
            };
        }
        HttpSearchError::Network {
            host: host.to_string(),
            message: error_chain(&error.without_url()),
        }
    }

    /// The results as numbered lines: `1. Title: snippet (url)`.
    fn render(&self, json: &Value) -> Result<String> {
        let fields = &self.fields;
        let no_list = |found| HttpSearchError::NoResultList {
            pointer: fields.list.clone(),
            found,
        };
        let list = json
            .pointer(&fields.list)
            .ok_or_else(|| no_list("nothing"))?;
        let items = list.as_array().ok_or_else(|| no_list(kind_of(list)))?;
        if items.is_empty() {
            return Ok("No results.".into());
        }
        let mut lines = Vec::with_capacity(fields.max_results);
        for (n, item) in items.iter().take(fields.max_results).enumerate() {
            let title = field_text(item, Some(&fields.title), TITLE_CHARS)
                .unwrap_or_else(|| "(untitled)".into());
            let mut line = format!("{}. {title}", n + 1);
            if let Some(snippet) = field_text(item, fields.snippet.as_ref(), fields.snippet_chars) {
                line.push_str(": ");
                line.push_str(&snippet);
            }
            if let Some(url) = field_text(item, fields.url.as_ref(), URL_CHARS) {
                line.push_str(" (");
                line.push_str(&url);
                line.push(')');
            }
            lines.push(line);
        }
        Ok(lines.join("\n"))
    }
}

impl Tool for HttpSearchTool {
    type Args = SearchArgs;

    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": "What to search for, in a few words.",
                    "minLength": 1,
                    "maxLength": self.limits.max_query_chars,
                }
            },
            "required": ["query"],
            "additionalProperties": false,
        })
    }

    async fn call(&self, args: SearchArgs) -> std::result::Result<String, ToolError> {
        self.search(&args.query).await.map_err(ToolError::from)
    }
}

/// The request headers: JSON accept/content types, then the configured ones with `${NAME}`
/// expanded through `lookup`.
fn build_headers(
    config: &HttpSearchConfig,
    has_body: bool,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    if has_body {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    for (name, template) in &config.headers {
        let invalid = |what: &str| HttpSearchError::Config(format!("header '{name}': {what}"));
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid("not a valid header name"))?;
        if [HOST, CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION].contains(&header) {
            return Err(invalid("set by the HTTP client; it cannot be configured"));
        }
        if template.contains("{query}") {
            return Err(invalid("headers cannot carry the model's query"));
        }
        let (value, secret) = expand_env(name, template, lookup)?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            invalid(if secret {
                "the value, once the environment is substituted, is not valid in a header"
            } else {
                "the value is not valid in a header"
            })
        })?;
        value.set_sensitive(secret);
        headers.insert(header, value);
    }
    Ok(headers)
}

/// `template` with each `${NAME}` replaced by the variable's value, and whether any was.
fn expand_env(
    header: &str,
    template: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(String, bool)> {
    let mut out = String::new();
    let mut rest = template;
    let mut secret = false;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| HttpSearchError::Config(format!("header '{header}': unclosed '${{'")))?;
        let variable = &after[..end];
        let valid = variable
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && variable
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(HttpSearchError::Config(format!(
                "header '{header}': '${{{variable}}}' is not an environment variable name"
            )));
        }
        let value = lookup(variable).ok_or_else(|| HttpSearchError::MissingSecret {
            header: header.to_string(),
            variable: variable.to_string(),
        })?;
        out.push_str(&value);
        secret = true;
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, secret))
}

/// Where a redirect leads, refused unless it stays on the same host and port (or upgrades
/// http to https on the default port).
fn redirect_target(from: &Url, location: &HeaderValue) -> Result<Url> {
    let location = location
        .to_str()
        .map_err(|_| HttpSearchError::Redirect("the Location header is not text".into()))?;
    let next = from.join(location).map_err(|e| {
        HttpSearchError::Redirect(format!(
            "invalid Location '{}': {e}",
            truncate_chars(location, 100)
        ))
    })?;
    let same_origin = next.scheme() == from.scheme()
        && next.port_or_known_default() == from.port_or_known_default();
    let upgrade = from.scheme() == "http"
        && next.scheme() == "https"
        && next.port_or_known_default() == Some(443);
    if next.host() != from.host() || !(same_origin || upgrade) {
        return Err(HttpSearchError::Redirect(format!(
            "'{}' leaves {}",
            next.origin().ascii_serialization(),
            from.origin().ascii_serialization()
        )));
    }
    Ok(next)
}

/// The URL's host, for messages.
fn host_of(url: &Url) -> String {
    url.host_str().unwrap_or_default().to_string()
}

/// An error and its causes, joined with ": ".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// A JSON value's kind, for messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The cleaned text at `pointer` inside `item`, cut to `max_chars`; `None` when absent or empty.
fn field_text(item: &Value, pointer: Option<&String>, max_chars: usize) -> Option<String> {
    let text = clean_text(&value_text(item.pointer(pointer?)?)?);
    (!text.is_empty()).then(|| truncate_chars(&text, max_chars))
}

/// A JSON value as display text: strings as they are, numbers and booleans printed, arrays
/// (highlight fragments) joined; objects and nulls have none.
fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().filter_map(value_text).collect();
            (!parts.is_empty()).then(|| parts.join(" … "))
        }
        Value::Null | Value::Object(_) => None,
    }
}

/// Result text made safe to show the model: HTML-like tags (highlight markup, or a hostile
/// page's `</information>`) removed, control characters and runs of whitespace collapsed to one
/// space.
fn clean_text(text: &str) -> String {
    let mut without_tags = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        without_tags.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let tag_end = after
            .char_indices()
            .take(MAX_TAG_CHARS)
            .take_while(|&(_, c)| c != '<')
            .find(|&(_, c)| c == '>')
            .map(|(i, _)| i);
        let looks_like_tag = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!');
        match tag_end {
            Some(end) if looks_like_tag => {
                without_tags.push(' ');
                rest = &after[end + 1..];
            }
            _ => {
                without_tags.push('<');
                rest = after;
            }
        }
    }
    without_tags.push_str(rest);
    without_tags
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_text_is_cleaned() {
        assert_eq!(
            clean_text("a <em>black</em>\n\t tote</information><answer>x"),
            "a black tote x"
        );
        assert_eq!(clean_text("1 < 2 and 3 > 2"), "1 < 2 and 3 > 2");
        assert_eq!(clean_text("x\u{0}y"), "x y");
        assert_eq!(
            value_text(&serde_json::json!(["a", 1, null, {"b": 2}])),
            Some("a … 1".into())
        );
    }

    #[test]
    fn env_secrets_expand_and_missing_ones_are_named() {
        let lookup = |name: &str| (name == "TOKEN").then(|| "s3cret".to_string());
        assert_eq!(
            expand_env("Authorization", "Bearer ${TOKEN}", &lookup).unwrap(),
            ("Bearer s3cret".to_string(), true)
        );
        assert_eq!(
            expand_env("X", "plain", &lookup).unwrap(),
            ("plain".to_string(), false)
        );
        let err = expand_env("X", "${MISSING}", &lookup).unwrap_err();
        assert!(err.to_string().contains("MISSING"), "{err}");
        assert!(expand_env("X", "${bad name}", &lookup).is_err());
        assert!(expand_env("X", "${TOKEN", &lookup).is_err());
    }

    #[test]
    fn redirects_stay_on_the_same_origin() {
        let from = Url::parse("http://h:8080/a").unwrap();
        let to = |location: &str| redirect_target(&from, &HeaderValue::from_str(location).unwrap());
        assert_eq!(to("/b?x=1").unwrap().as_str(), "http://h:8080/b?x=1");
        assert!(to("http://other:8080/").is_err());
        assert!(to("http://h:9090/").is_err());
        assert!(to("https://h/").is_ok());
        assert!(to("https://h:8443/").is_err());
        let secure = Url::parse("https://h/a").unwrap();
        assert!(redirect_target(&secure, &HeaderValue::from_static("http://h/")).is_err());
    }
}
