//! The retail help center: one page per store (address, opening hours) and a few policy pages,
//! behind a small HTTP search API. It is the demo's third tool: the HTTP search plugin pointed at
//! it, as it would be pointed at a company's SearxNG or OpenSearch.
//!
//! The API is SearxNG-shaped: `GET /search?q=...&limit=N` answers
//! `{"query": ..., "results": [{"title", "url", "content"}, ...]}`, best first. Ranking gives each
//! query word that a page contains its inverse document frequency, doubled when the page's
//! title has it, so a city name outweighs "store" or "open", which every store page has.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::retail::{Store, TOOL_HELP};

/// Results per search when the request names no limit.
const DEFAULT_LIMIT: usize = 3;
/// Most results per search.
const MAX_LIMIT: usize = 10;
/// Longest query read; the rest is ignored, so a huge query costs no more than this.
const MAX_QUERY_CHARS: usize = 500;

/// Policy pages every help center has, as (slug, title, content).
const POLICY_PAGES: &[(&str, &str, &str)] = &[
    (
        "returns",
        "Returns and refunds",
        "Unused items can be returned to any store or by post within 30 days of purchase with \
         the receipt. Refunds go back to the original payment method within 5 working days.",
    ),
    (
        "shipping",
        "Shipping and delivery",
        "Standard delivery takes 3 to 5 working days and is free on orders over $50. Express \
         delivery arrives the next working day for $9.95.",
    ),
    (
        "gift-cards",
        "Gift cards",
        "Gift cards are sold in every store and online from $10 to $500 and are valid for two \
         years. They cannot be exchanged for cash.",
    ),
];

/// One page of the help center.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HelpPage {
    /// The page title, e.g. `"Lyon store: address and opening hours"`.
    pub title: String,
    /// A stable link to the page.
    pub url: String,
    /// The page text.
    pub content: String,
}

/// The help center's pages for `stores`: one per store, then the policy pages.
pub fn pages(stores: &[Store]) -> Vec<HelpPage> {
    let mut pages: Vec<HelpPage> = stores
        .iter()
        .map(|store| {
            let address = if store.address.is_empty() {
                format!("The {} store's address is not listed.", store.city)
            } else {
                format!(
                    "The {} store is at {}, {}.",
                    store.city, store.address, store.city
                )
            };
            let hours = match &store.hours {
                Some(hours) => format!(
                    " Opening hours: Monday to Friday {}, Saturday {}, Sunday {}.",
                    hours.weekdays,
                    hours.saturday,
                    hours
                        .sunday
                        .map_or_else(|| "closed".to_string(), |h| h.to_string()),
                ),
                None => " Opening hours are not listed.".to_string(),
            };
            HelpPage {
                title: format!("{} store: address and opening hours", store.city),
                url: format!(
                    "https://help.example.com/stores/{}",
                    store.id.to_lowercase()
                ),
                content: format!("{address}{hours}"),
            }
        })
        .collect();
    pages.extend(POLICY_PAGES.iter().map(|(slug, title, content)| HelpPage {
        title: (*title).to_string(),
        url: format!("https://help.example.com/{slug}"),
        content: (*content).to_string(),
    }));
    pages
}

/// The lowercase alphanumeric words of `text`.
fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Pages with their words, ranked for queries.
#[derive(Debug, Clone)]
pub struct HelpCenter {
    pages: Vec<HelpPage>,
    /// Per page: the words of its title and of its whole text.
    page_words: Vec<(BTreeSet<String>, BTreeSet<String>)>,
    /// Inverse document frequency of every word of the pages.
    idf: BTreeMap<String, f64>,
}

impl HelpCenter {
    /// The help center over `pages`.
    pub fn new(pages: Vec<HelpPage>) -> Self {
        let page_words: Vec<_> = pages
            .iter()
            .map(|p| {
                (
                    words(&p.title),
                    words(&format!("{} {}", p.title, p.content)),
                )
            })
            .collect();
        let mut frequency: BTreeMap<String, usize> = BTreeMap::new();
        for (_, all) in &page_words {
            for word in all {
                *frequency.entry(word.clone()).or_default() += 1;
            }
        }
        let n = pages.len() as f64;
        let idf = frequency
            .into_iter()
            .map(|(word, df)| (word, (1.0 + n / df as f64).ln()))
            .collect();
        Self {
            pages,
            page_words,
            idf,
        }
    }

    /// The help center of a retail data set's stores.
    pub fn for_stores(stores: &[Store]) -> Self {
        Self::new(pages(stores))
    }

    /// Up to `limit` pages containing at least one query word, best first; ties keep page
    /// order.
    pub fn search(&self, query: &str, limit: usize) -> Vec<&HelpPage> {
        let query: String = query.chars().take(MAX_QUERY_CHARS).collect();
        let query = words(&query);
        let mut scored: Vec<(f64, usize)> = self
            .page_words
            .iter()
            .enumerate()
            .filter_map(|(i, (title, all))| {
                let score: f64 = query
                    .iter()
                    .filter(|w| all.contains(*w))
                    .map(|w| {
                        let weight = self.idf.get(w).copied().unwrap_or(0.0);
                        if title.contains(w) {
                            2.0 * weight
                        } else {
                            weight
                        }
                    })
                    .sum();
                (score > 0.0).then_some((score, i))
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(limit)
            .map(|(_, i)| &self.pages[i])
            .collect()
    }

    /// The HTTP API: `GET /search?q=...&limit=N`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/search", get(search_handler))
            .with_state(std::sync::Arc::new(self))
    }
}

/// Query string of `GET /search`.
#[derive(Debug, Deserialize)]
struct SearchParams {
    q: String,
    limit: Option<usize>,
}

/// Body of a search answer.
#[derive(Debug, Serialize)]
struct SearchAnswer<'a> {
    query: &'a str,
    results: Vec<&'a HelpPage>,
}

async fn search_handler(
    State(center): State<std::sync::Arc<HelpCenter>>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "expected ?q=words and an optional &limit=1..10"})),
        )
            .into_response();
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let results = center.search(&params.q, limit);
    Json(SearchAnswer {
        query: &params.q,
        results,
    })
    .into_response()
}

/// A help center serving in the background; dropping it stops the server.
#[derive(Debug)]
pub struct RunningHelpCenter {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RunningHelpCenter {
    /// Serves the help center of `stores` on `addr` (port 0 picks a free port).
    pub async fn start(stores: &[Store], addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = HelpCenter::for_stores(stores).router();
        let task = tokio::spawn(async move {
            // A serve error ends the task; callers then see connection errors, which the HTTP
            // tool reports to the agent as tool errors.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP search tool's config (the search-http plugin's TOML) for this help center.
    pub fn tool_config_toml(&self) -> String {
        tool_config_toml(self.addr)
    }
}

impl Drop for RunningHelpCenter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The HTTP search tool's config for a help center at `addr`: only that address may be
/// called, and it is a loopback address, so private addresses are allowed.
pub fn tool_config_toml(addr: SocketAddr) -> String {
    format!(
        r#"# The retail help center that `searchloop demo` serves while it runs (written per run).
name = "{TOOL_HELP}"
description = "Searches the help center: store addresses and opening hours, returns, shipping and gift cards."
url = "http://{addr}/search?q={{query}}"
method = "GET"

[results]
list = "/results"
title = "/title"
snippet = "/content"
url = "/url"
max_results = 2
snippet_chars = 240

[limits]
connect_timeout_ms = 500
timeout_ms = 2000
retries = 1
backoff_ms = 50

[security]
allowed_hosts = ["{ip}"]
allow_private = true
"#,
        ip = addr.ip()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retail::{self, GeneratorConfig, QuestionKind};

    #[test]
    fn every_store_question_finds_its_store_page_first() {
        let data = retail::generate(&GeneratorConfig {
            products: 50,
            ..GeneratorConfig::default()
        });
        let center = HelpCenter::for_stores(&data.stores);
        let questions: Vec<_> = data
            .questions
            .iter()
            .filter(|q| q.kind == QuestionKind::StoreInfo)
            .collect();
        assert_eq!(questions.len(), 4 * data.stores.len());
        for q in questions {
            let store = data
                .stores
                .iter()
                .find(|s| q.question.contains(&format!("the {} store", s.city)))
                .unwrap();
            let top = center.search(&q.question, 3);
            assert!(
                top[0].title.starts_with(&format!("{} store", store.city)),
                "{}: {:?}",
                q.question,
                top[0]
            );
            // The gold answer is on that page, as the model would read it.
            let content = top[0].content.to_lowercase();
            let answer = &q.answers[0];
            let readable = match answer.as_str() {
                "yes" => !content.contains("sunday closed"),
                "no" => content.contains("sunday closed"),
                _ => content.contains(&answer.to_lowercase()),
            };
            assert!(readable, "{}: {answer} not on {content}", q.question);
        }
    }

    /// Sends one raw HTTP/1.1 GET and returns the status line and the body.
    async fn get(addr: SocketAddr, target: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {target} HTTP/1.1\r\nHost: help\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    #[tokio::test]
    async fn the_api_answers_json_and_refuses_bad_query_strings() {
        let data = retail::generate(&GeneratorConfig {
            products: 50,
            ..GeneratorConfig::default()
        });
        let center = RunningHelpCenter::start(&data.stores, ([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        let (status, body) = get(center.addr(), "/search?q=lyon%20store%20hours&limit=2").await;
        assert!(status.contains("200"), "{status}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["query"], "lyon store hours");
        let results = json["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        assert!(
            results[0]["title"]
                .as_str()
                .unwrap()
                .starts_with("Lyon store")
        );
        // No query, or a limit that is not a number: one clear 400, not a 500 or a hang.
        for target in ["/search", "/search?q=x&limit=many", "/search?limit=3"] {
            let (status, body) = get(center.addr(), target).await;
            assert!(status.contains("400"), "{target}: {status}");
            assert!(body.contains("expected ?q="), "{target}: {body}");
        }
        // A long query is read up to its cap and answered; a URI past the HTTP server's own
        // limit is refused by it.
        let long = format!("/search?q={}", "lyon+".repeat(2_000));
        let (status, _) = get(center.addr(), &long).await;
        assert!(status.contains("200"), "{status}");
        let huge = format!("/search?q={}", "lyon+".repeat(20_000));
        let (status, _) = get(center.addr(), &huge).await;
        assert!(status.contains("414"), "{status}");
        // The tool config points at this server and allows only its address.
        let toml = center.tool_config_toml();
        assert!(
            toml.contains(&format!("http://{}/search?q={{query}}", center.addr())),
            "{toml}"
        );
        assert!(toml.contains("allowed_hosts = [\"127.0.0.1\"]"), "{toml}");
    }

    #[test]
    fn policy_words_find_policy_pages_and_nonsense_finds_nothing() {
        let center = HelpCenter::for_stores(&retail::generate(&GeneratorConfig::default()).stores);
        assert_eq!(
            center.search("how do refunds work", 3)[0].title,
            "Returns and refunds"
        );
        assert_eq!(
            center.search("express delivery", 1)[0].title,
            "Shipping and delivery"
        );
        assert!(center.search("zzzz qqqq", 3).is_empty());
        assert!(center.search("", 3).is_empty());
        assert_eq!(center.search("store", 2).len(), 2);
    }
}
