//! Request templates: the URL and the JSON body with `{query}` and `{limit}` slots.
//!
//! The model fills `{query}` only. A slot's value is encoded for where it lands (percent-encoded
//! in a URL, a JSON string in a body), and substitution happens on parsed structure, never by
//! pasting text into JSON, so no query can change the shape of the request.

use std::fmt::Write as _;

use serde_json::{Map, Value};
use url::Url;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text copied as it is.
    Text(String),
    /// The model's query.
    Query,
    /// The configured number of results.
    Limit,
}

/// A string with `{query}` / `{limit}` slots; `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `text`; the error names the unknown or unclosed placeholder.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("unclosed placeholder '{{{name}'")),
                        }
                    }
                    let piece = match name.as_str() {
                        "query" => Piece::Query,
                        "limit" => Piece::Limit,
                        _ => {
                            return Err(format!(
                                "unknown placeholder '{{{name}}}' (known: {{query}}, {{limit}}; \
                                 write {{{{ and }}}} for literal braces)"
                            ));
                        }
                    };
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(piece);
                }
                '}' => return Err("unmatched '}' (write }} for a literal brace)".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Self { pieces })
    }

    /// Whether the template has a `{query}` slot.
    pub(crate) fn has_query(&self) -> bool {
        self.pieces.contains(&Piece::Query)
    }

    /// Whether the template has any slot.
    fn has_slots(&self) -> bool {
        self.pieces.iter().any(|p| !matches!(p, Piece::Text(_)))
    }

    /// The literal text before each slot, in order.
    fn text_before_each_slot(&self) -> Vec<String> {
        let mut before = String::new();
        let mut out = Vec::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => before.push_str(text),
                Piece::Query | Piece::Limit => out.push(before.clone()),
            }
        }
        out
    }

    /// The template with slots filled, each value passed through `encode`.
    fn render(&self, query: &str, limit: usize, encode: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Query => out.push_str(&encode(query)),
                Piece::Limit => out.push_str(&limit.to_string()),
            }
        }
        out
    }
}

/// Percent-encodes every byte outside RFC 3986's unreserved set, so a value cannot end a query
/// parameter (`&`, `=`), start a fragment (`#`) or carry a line break.
pub(crate) fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The URL template: slots are only allowed in the query string, so the scheme, host, port and
/// path are fixed by the host's config.
#[derive(Debug, Clone)]
pub(crate) struct UrlTemplate {
    template: Template,
    /// The template rendered with empty slots, as a parsed URL (scheme, host and path checks).
    base: Url,
}

impl UrlTemplate {
    /// Parses and checks a URL template.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let template = Template::parse(text).map_err(|e| format!("url '{text}': {e}"))?;
        for before in template.text_before_each_slot() {
            if !before.contains('?') || before.contains('#') {
                return Err(format!(
                    "url '{text}': placeholders must be in the query string (after '?', before \
                     '#'), never in the scheme, host or path"
                ));
            }
        }
        let base = Url::parse(&template.render("", 0, |_| String::new()))
            .map_err(|e| format!("url '{text}' is not a valid URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!("url '{text}': the scheme must be http or https"));
        }
        if base.host().is_none() {
            return Err(format!("url '{text}' has no host"));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(format!(
                "url '{text}' carries credentials; put secrets in headers read from the \
                 environment"
            ));
        }
        Ok(Self { template, base })
    }

    /// The URL with slots empty: its scheme, host and path are those of every rendered URL.
    pub(crate) fn base(&self) -> &Url {
        &self.base
    }

    /// Whether the template has a `{query}` slot.
    pub(crate) fn has_query(&self) -> bool {
        self.template.has_query()
    }

    /// The URL for `query`, with `query_param=query` appended when configured.
    pub(crate) fn render(
        &self,
        query: &str,
        limit: usize,
        query_param: Option<&str>,
    ) -> Result<Url, String> {
        let text = self.template.render(query, limit, percent_encode);
        let mut url = Url::parse(&text).map_err(|e| format!("rendered URL is invalid: {e}"))?;
        if let Some(name) = query_param {
            url.query_pairs_mut().append_pair(name, query);
        }
        // Slots are percent-encoded and only in the query string, so this cannot differ; the
        // check keeps that true if the template rules ever change.
        if url.origin() != self.base.origin() || url.path() != self.base.path() {
            return Err("the query changed the URL's host or path".into());
        }
        Ok(url)
    }
}

/// A JSON body template: any string value may hold slots. A string that is exactly `{limit}`
/// becomes a number, so `size = "{limit}"` renders as `"size": 5`.
#[derive(Debug, Clone)]
pub(crate) enum BodyTemplate {
    /// A value with no slots.
    Literal(Value),
    /// A string with slots.
    Text(Template),
    /// An object whose values may hold slots.
    Object(Vec<(String, BodyTemplate)>),
    /// An array whose items may hold slots.
    Array(Vec<BodyTemplate>),
}

impl BodyTemplate {
    /// Compiles a body; the error names the JSON path of the bad string.
    pub(crate) fn compile(value: &Value) -> Result<Self, String> {
        Self::compile_at(value, "body")
    }

    fn compile_at(value: &Value, path: &str) -> Result<Self, String> {
        Ok(match value {
            Value::String(text) => {
                let template = Template::parse(text).map_err(|e| format!("{path}: {e}"))?;
                if template.has_slots() {
                    Self::Text(template)
                } else {
                    Self::Literal(Value::String(template.render("", 0, |_| String::new())))
                }
            }
            Value::Array(items) => Self::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Self::compile_at(item, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Self::Object(
                map.iter()
                    .map(|(key, item)| {
                        if key.contains('{') || key.contains('}') {
                            return Err(format!(
                                "{path}: key '{key}': placeholders are only allowed in values"
                            ));
                        }
                        Ok((
                            key.clone(),
                            Self::compile_at(item, &format!("{path}.{key}"))?,
                        ))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => Self::Literal(other.clone()),
        })
    }

    /// Whether some string of the body has a `{query}` slot.
    pub(crate) fn has_query(&self) -> bool {
        match self {
            Self::Literal(_) => false,
            Self::Text(template) => template.has_query(),
            Self::Object(entries) => entries.iter().any(|(_, v)| v.has_query()),
            Self::Array(items) => items.iter().any(Self::has_query),
        }
    }

    /// The body for `query`.
    pub(crate) fn render(&self, query: &str, limit: usize) -> Value {
        match self {
            Self::Literal(value) => value.clone(),
            Self::Text(template) if template.pieces == [Piece::Limit] => Value::from(limit),
            Self::Text(template) => Value::String(template.render(query, limit, str::to_string)),
            Self::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.render(query, limit)))
                    .collect::<Map<_, _>>(),
            ),
            Self::Array(items) => {
                Value::Array(items.iter().map(|v| v.render(query, limit)).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn templates_parse_slots_and_escapes() {
        let t = Template::parse("a{{b}}{query}c{limit}").unwrap();
        assert_eq!(t.render("Q", 5, str::to_string), "a{b}Qc5");
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown placeholder")
        );
        assert!(Template::parse("{query").unwrap_err().contains("unclosed"));
        assert!(Template::parse("x}").unwrap_err().contains("unmatched"));
    }

    #[test]
    fn url_slots_are_only_allowed_in_the_query_string() {
        assert!(UrlTemplate::parse("http://h/search?q={query}").is_ok());
        for bad in [
            "http://{query}/x",
            "http://h/{query}",
            "http://h/x#{query}",
            "http://h/x?a=1#f={query}",
        ] {
            let err = UrlTemplate::parse(bad).unwrap_err();
            assert!(err.contains("query string"), "{bad}: {err}");
        }
        assert!(UrlTemplate::parse("ftp://h/x").is_err());
        assert!(UrlTemplate::parse("http://u:p@h/x").is_err());
        assert!(UrlTemplate::parse("not a url").is_err());
    }

    #[test]
    fn rendered_urls_keep_the_query_inside_its_parameter() {
        let t = UrlTemplate::parse("http://h:8080/search?format=json&q={query}&n={limit}").unwrap();
        let hostile = "a&format=xml#frag\r\n/../{query}%00 é";
        let url = t.render(hostile, 3, None).unwrap();
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [
                ("format".to_string(), "json".to_string()),
                ("q".to_string(), hostile.to_string()),
                ("n".to_string(), "3".to_string()),
            ]
        );
        assert_eq!(url.path(), "/search");
        assert_eq!(url.fragment(), None);
    }

    #[test]
    fn bodies_substitute_structurally() {
        let body = BodyTemplate::compile(&json!({
            "size": "{limit}",
            "query": {"match": {"name": "{query}"}},
            "tags": ["x {query} y", 3, true],
            "literal": "{{not a slot}}",
        }))
        .unwrap();
        assert!(body.has_query());
        let hostile = "\"}, \"size\": 10000, \"x\": {\"";
        assert_eq!(
            body.render(hostile, 4),
            json!({
                "size": 4,
                "query": {"match": {"name": hostile}},
                "tags": [format!("x {hostile} y"), 3, true],
                "literal": "{not a slot}",
            })
        );
        let err = BodyTemplate::compile(&json!({"a": [{"b": "{oops}"}]})).unwrap_err();
        assert!(err.contains("body.a[0].b"), "{err}");
    }
}
