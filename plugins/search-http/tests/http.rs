//! The HTTP search tool against real HTTP servers on 127.0.0.1: an axum app imitating SearxNG,
//! OpenSearch and a generic REST API, plus misbehaving endpoints (failing, slow, huge, malformed,
//! redirecting away), and a raw TCP server that cuts a body short.

// Helpers outside `#[test]` functions panic on failure too: the panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use searchloop_core::{
    DynTool, ToolError,
    conformance::{ConformanceConfig, check_tool},
};
use searchloop_search_http::{HttpSearchConfig, HttpSearchError, HttpSearchTool};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// What the test server saw.
#[derive(Default)]
struct Seen {
    /// Requests per path.
    hits: Mutex<HashMap<String, usize>>,
    /// The last request's query-string parameters, headers and body.
    last_params: Mutex<Vec<(String, String)>>,
    last_headers: Mutex<HeaderMap>,
    last_body: Mutex<Option<Value>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Seen {
    fn hit(&self, path: &str) -> usize {
        let mut hits = self.hits.lock().unwrap();
        let count = hits.entry(path.to_string()).or_default();
        *count += 1;
        *count
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

type Shared = State<Arc<Seen>>;
type Params = Query<Vec<(String, String)>>;

fn searx_results(query: &str) -> Value {
    json!({
        "query": query,
        "results": [
            {"title": format!("First <b>{query}</b>"), "content": "A black leather tote.\nRoomy.", "url": "https://shop.example/1"},
            {"title": "Second", "content": null, "url": "https://shop.example/2"},
            {"title": 3, "content": ["frag one", "frag two"]},
        ]
    })
}

async fn searx(State(seen): Shared, Query(params): Params, headers: HeaderMap) -> Json<Value> {
    seen.hit("/search");
    let query = params
        .iter()
        .find(|(k, _)| k == "q")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    *seen.last_params.lock().unwrap() = params;
    *seen.last_headers.lock().unwrap() = headers;
    Json(searx_results(&query))
}

async fn opensearch(
    State(seen): Shared,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    seen.hit("/products/_search");
    let query = body["query"]["multi_match"]["query"]
        .as_str()
        .unwrap_or("")
        .to_string();
    *seen.last_body.lock().unwrap() = Some(body);
    *seen.last_headers.lock().unwrap() = headers;
    Json(json!({
        "took": 3,
        "hits": {"total": {"value": 1}, "hits": [
            {"_id": "BAG-1", "_source": {"name": "Aurora Tote", "description": format!("matched {query}"), "url": "https://shop.example/BAG-1"}}
        ]}
    }))
}

async fn articles(State(seen): Shared, Query(params): Params) -> Json<Value> {
    seen.hit("/v1/articles/search");
    *seen.last_params.lock().unwrap() = params;
    Json(json!({"data": {"items": [
        {"attributes": {"title": "Returns", "summary": "30 days."}, "links": {"self": "https://help.example/returns"}}
    ]}}))
}

async fn flaky(State(seen): Shared) -> Response {
    if seen.hit("/flaky") == 1 {
        (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
    } else {
        Json(searx_results("flaky")).into_response()
    }
}

async fn unavailable(State(seen): Shared) -> StatusCode {
    seen.hit("/unavailable");
    StatusCode::SERVICE_UNAVAILABLE
}

async fn missing(State(seen): Shared) -> StatusCode {
    seen.hit("/missing");
    StatusCode::NOT_FOUND
}

async fn slow(State(seen): Shared) -> Json<Value> {
    seen.hit("/slow");
    tokio::time::sleep(Duration::from_secs(10)).await;
    Json(searx_results("slow"))
}

async fn busy(State(seen): Shared) -> Json<Value> {
    seen.hit("/busy");
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    Json(searx_results("busy"))
}

/// 64 MiB streamed without a Content-Length.
async fn huge_stream(State(seen): Shared) -> Response {
    seen.hit("/huge");
    let chunks = futures::stream::iter(
        std::iter::once(b"{\"results\": [\"".to_vec())
            .chain(std::iter::repeat_n(vec![b'a'; 1 << 20], 64))
            .map(Ok::<_, Infallible>),
    );
    Response::new(Body::from_stream(chunks))
}

/// A 64 MiB body with its length declared up front.
async fn huge_declared(State(seen): Shared) -> Vec<u8> {
    seen.hit("/huge-declared");
    vec![b' '; 64 << 20]
}

async fn malformed(State(seen): Shared) -> Response {
    seen.hit("/malformed");
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"results\": [{\"title\": \"x\"},",
    )
        .into_response()
}

async fn html(State(seen): Shared) -> Response {
    seen.hit("/html");
    (
        [(header::CONTENT_TYPE, "text/html")],
        "<html><body>Search</body></html>",
    )
        .into_response()
}

async fn wrong_shape(State(seen): Shared) -> Json<Value> {
    seen.hit("/wrong-shape");
    Json(json!({"results": {"title": "not a list"}}))
}

fn redirect(location: &'static str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

async fn redirect_loop(State(seen): Shared) -> Response {
    seen.hit("/loop");
    redirect("/loop")
}

fn app(seen: Arc<Seen>) -> Router {
    Router::new()
        .route("/search", get(searx))
        .route("/products/_search", post(opensearch))
        .route("/v1/articles/search", get(articles))
        .route("/flaky", get(flaky))
        .route("/unavailable", get(unavailable))
        .route("/missing", get(missing))
        .route("/slow", get(slow))
        .route("/busy", get(busy))
        .route("/huge", get(huge_stream))
        .route("/huge-declared", get(huge_declared))
        .route("/malformed", get(malformed))
        .route("/html", get(html))
        .route("/wrong-shape", get(wrong_shape))
        .route(
            "/to-same-host",
            get(|| async { redirect("/search?q=redirected") }),
        )
        .route(
            "/to-other-host",
            get(|| async { redirect("http://evil.example.com/search?q=x") }),
        )
        .route(
            "/to-metadata",
            get(|| async { redirect("http://169.254.169.254/latest/meta-data/") }),
        )
        .route("/loop", get(redirect_loop))
        .with_state(seen)
}

/// A running test server.
struct Server {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

async fn start_server() -> Server {
    let seen = Arc::new(Seen::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(seen.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server { addr, seen }
}

/// A loopback config: the tests' server is on 127.0.0.1, so private addresses are allowed.
fn config(addr: SocketAddr, path_and_query: &str) -> HttpSearchConfig {
    HttpSearchConfig::from_toml_str(&format!(
        r#"
        name = "web"
        description = "Searches the test index."
        url = "http://{addr}{path_and_query}"
        [results]
        list = "/results"
        title = "/title"
        snippet = "/content"
        url = "/url"
        [limits]
        timeout_ms = 2000
        retries = 2
        backoff_ms = 10
        max_response_bytes = 1048576
        [security]
        allowed_hosts = ["127.0.0.1"]
        allow_private = true
        "#
    ))
    .unwrap()
}

fn tool(config: HttpSearchConfig) -> HttpSearchTool {
    HttpSearchTool::new(config).unwrap()
}

async fn call(tool: &HttpSearchTool, query: &str) -> Result<String, ToolError> {
    tool.call_json(json!({ "query": query })).await
}

#[tokio::test]
async fn success_renders_results_compactly() {
    let server = start_server().await;
    let tool = tool(config(server.addr, "/search?format=json&q={query}"));
    let text = call(&tool, "black tote").await.unwrap();
    assert_eq!(
        text,
        "1. First black tote: A black leather tote. Roomy. (https://shop.example/1)\n\
         2. Second (https://shop.example/2)\n\
         3. 3: frag one … frag two"
    );
    assert_eq!(server.seen.hits("/search"), 1);
}

#[tokio::test]
async fn the_tool_passes_the_conformance_suite() {
    let server = start_server().await;
    let tool = tool(config(server.addr, "/search?format=json&q={query}"));
    let report = check_tool(
        Arc::new(tool),
        &ConformanceConfig::new(json!({"query": "tote"})),
    )
    .await
    .unwrap();
    assert!(report.errors > 0 && report.observations > 0, "{report:?}");
}

#[tokio::test]
async fn a_500_is_retried_and_then_succeeds() {
    let server = start_server().await;
    let tool = tool(config(server.addr, "/flaky?q={query}"));
    let text = call(&tool, "x").await.unwrap();
    assert!(text.starts_with("1. First flaky"), "{text}");
    assert_eq!(server.seen.hits("/flaky"), 2);
}

#[tokio::test]
async fn retries_are_bounded_and_4xx_is_not_retried() {
    let server = start_server().await;
    let tool = tool(config(server.addr, "/unavailable?q={query}"));
    let err = call(&tool, "x").await.unwrap_err().to_string();
    assert!(
        err.contains("HTTP 503") && err.contains("after 3 attempts"),
        "{err}"
    );
    assert_eq!(server.seen.hits("/unavailable"), 3);

    let tool = self::tool(config(server.addr, "/missing?q={query}"));
    let err = call(&tool, "x").await.unwrap_err().to_string();
    assert!(err.contains("HTTP 404"), "{err}");
    assert_eq!(server.seen.hits("/missing"), 1);
}

#[tokio::test]
async fn a_slow_server_times_out_after_bounded_retries() {
    let server = start_server().await;
    let mut config = config(server.addr, "/slow?q={query}");
    config.limits.timeout_ms = 200;
    config.limits.retries = 1;
    let tool = tool(config);
    let started = Instant::now();
    let err = call(&tool, "x").await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err, ToolError::Timeout(200));
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert_eq!(server.seen.hits("/slow"), 2);
}

#[tokio::test]
async fn huge_bodies_are_cut_off_at_the_cap() {
    let server = start_server().await;
    for path in ["/huge", "/huge-declared"] {
        let tool = tool(config(server.addr, &format!("{path}?q={{query}}")));
        let started = Instant::now();
        let err = call(&tool, "x").await.unwrap_err().to_string();
        assert!(
            err.contains("larger than the 1048576-byte limit"),
            "{path}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{path}");
        assert_eq!(
            server.seen.hits(path),
            1,
            "{path}: a too-large body is not retried"
        );
    }
}

#[tokio::test]
async fn malformed_html_and_misshapen_bodies_give_clear_errors() {
    let server = start_server().await;
    let cases = [
        ("/malformed", "is not valid JSON"),
        ("/html", "is not valid JSON"),
        (
            "/wrong-shape",
            "no result list at '/results' (found an object)",
        ),
    ];
    for (path, expected) in cases {
        let tool = tool(config(server.addr, &format!("{path}?q={{query}}")));
        let err = call(&tool, "x").await.unwrap_err().to_string();
        assert!(err.contains(expected), "{path}: {err}");
    }
}

/// A server that declares 1,000 bytes, sends 13, and hangs up.
async fn start_truncating_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Content-Length: 1000\r\n\r\n{\"results\": [",
                )
                .await;
        }
    });
    addr
}

#[tokio::test]
async fn a_truncated_body_is_an_error() {
    let addr = start_truncating_server().await;
    let tool = tool(config(addr, "/search?q={query}"));
    let err = call(&tool, "x").await.unwrap_err().to_string();
    assert!(
        err.contains("failed") && err.contains("after 3 attempts"),
        "{err}"
    );
}

#[tokio::test]
async fn redirects_stay_on_the_allowed_host() {
    let server = start_server().await;
    let followed = tool(config(server.addr, "/to-same-host?q={query}"));
    let text = call(&followed, "x").await.unwrap();
    assert!(text.starts_with("1. First redirected"), "{text}");

    for (path, expected) in [
        (
            "/to-other-host",
            "redirect refused: 'http://evil.example.com' leaves",
        ),
        (
            "/to-metadata",
            "redirect refused: 'http://169.254.169.254' leaves",
        ),
        ("/loop", "more than 3 redirects"),
    ] {
        let tool = tool(config(server.addr, &format!("{path}?q={{query}}")));
        let err = call(&tool, "x").await.unwrap_err().to_string();
        assert!(err.contains(expected), "{path}: {err}");
    }
    assert_eq!(server.seen.hits("/loop"), 4);
}

#[tokio::test]
async fn template_breaking_queries_stay_inside_the_query_slot() {
    let server = start_server().await;
    let tool = tool(config(server.addr, "/search?format=json&q={query}&lang=en"));
    let hostile = "a&format=xml&lang=fr#frag /../admin {query} ${HOME} \"}' %00 é 🦀";
    call(&tool, hostile).await.unwrap();
    let params = server.seen.last_params.lock().unwrap().clone();
    assert_eq!(
        params,
        [
            ("format".to_string(), "json".to_string()),
            ("q".to_string(), hostile.to_string()),
            ("lang".to_string(), "en".to_string()),
        ]
    );
    // A line break cannot inject a header: control characters become spaces.
    call(&tool, "tote\r\nX-Injected: 1").await.unwrap();
    assert!(
        server
            .seen
            .last_headers
            .lock()
            .unwrap()
            .get("x-injected")
            .is_none()
    );
    let params = server.seen.last_params.lock().unwrap().clone();
    assert_eq!(params[1].1, "tote  X-Injected: 1");

    let mut config = config(server.addr, "/products/_search");
    config.method = searchloop_search_http::HttpMethod::Post;
    config.body = Some(json!({"size": "{limit}", "query": {"multi_match": {"query": "{query}"}}}));
    config.results.list = "/hits/hits".into();
    config.results.title = "/_source/name".into();
    let tool = self::tool(config);
    let hostile = "\"}}, \"size\": 10000, \"script\": {\"source\": \"x";
    let text = call(&tool, hostile).await.unwrap();
    assert!(text.starts_with("1. Aurora Tote"), "{text}");
    let body = server.seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(
        body,
        json!({"size": 5, "query": {"multi_match": {"query": hostile}}})
    );
}

#[tokio::test]
async fn loopback_and_metadata_are_refused_by_default() {
    let server = start_server().await;
    let mut default = config(server.addr, "/search?q={query}");
    default.security.allow_private = false;
    let err = HttpSearchTool::new(default).unwrap_err().to_string();
    assert!(err.contains("127.0.0.1 is a loopback address"), "{err}");

    // A name that resolves to loopback is refused after DNS resolution.
    let mut by_name = config(server.addr, "/search?q={query}");
    by_name.url = format!("http://localhost:{}/search?q={{query}}", server.addr.port());
    by_name.security.allowed_hosts = vec!["localhost".into()];
    by_name.security.allow_private = false;
    let err = call(&tool(by_name), "x").await.unwrap_err().to_string();
    assert!(
        err.contains("refusing to connect to 'localhost'") && err.contains("loopback"),
        "{err}"
    );

    // Metadata stays refused even where private addresses are allowed.
    let mut metadata = config(server.addr, "/search?q={query}");
    metadata.url = "http://169.254.169.254/latest/meta-data/?q={query}".into();
    metadata.security.allowed_hosts = vec!["169.254.169.254".into()];
    let err = HttpSearchTool::new(metadata).unwrap_err().to_string();
    assert!(
        err.contains("169.254.169.254 is a cloud metadata address"),
        "{err}"
    );
    assert_eq!(server.seen.total_hits(), 0);
}

#[tokio::test]
async fn concurrent_requests_are_capped() {
    let server = start_server().await;
    let mut config = config(server.addr, "/busy?q={query}");
    config.limits.max_concurrent_requests = 2;
    let tool = Arc::new(tool(config));
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let tool = tool.clone();
            tokio::spawn(async move { call(&tool, "x").await })
        })
        .collect();
    for handle in calls {
        handle.await.unwrap().unwrap();
    }
    assert_eq!(server.seen.hits("/busy"), 6);
    assert_eq!(server.seen.max_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn secrets_reach_the_server_but_never_debug_output_or_errors() {
    let server = start_server().await;
    let mut config = config(server.addr, "/search?q={query}");
    config
        .headers
        .insert("Authorization".into(), "Bearer ${TEST_SEARCH_TOKEN}".into());
    let lookup = |name: &str| (name == "TEST_SEARCH_TOKEN").then(|| "s3cr3t-value".to_string());
    let tool = HttpSearchTool::with_env(config.clone(), lookup).unwrap();
    call(&tool, "x").await.unwrap();
    let seen = server.seen.last_headers.lock().unwrap().clone();
    assert_eq!(seen.get("authorization").unwrap(), "Bearer s3cr3t-value");
    assert!(!format!("{tool:?}").contains("s3cr3t"), "{tool:?}");

    config.url = format!("http://{}/missing?q={{query}}", server.addr);
    let tool = HttpSearchTool::with_env(config.clone(), lookup).unwrap();
    let err = call(&tool, "x").await.unwrap_err().to_string();
    assert!(!err.contains("s3cr3t"), "{err}");

    let err = HttpSearchTool::with_env(config, |_| None).unwrap_err();
    assert!(matches!(err, HttpSearchError::MissingSecret { .. }));
    assert!(err.to_string().contains("TEST_SEARCH_TOKEN"), "{err}");
}

#[tokio::test]
async fn bad_queries_are_rejected_before_any_request() {
    let server = start_server().await;
    let tool = tool(config(server.addr, "/search?q={query}"));
    for (args, expected) in [
        (json!({"query": ""}), "the query is empty"),
        (json!({"query": " \t\n "}), "the query is empty"),
        (
            json!({"query": "a".repeat(257)}),
            "257 characters long; the limit is 256",
        ),
        (json!({"query": 3}), "invalid arguments"),
        (
            json!({"query": "x", "url": "http://evil.example.com"}),
            "unknown field `url`",
        ),
        (json!({}), "missing field `query`"),
    ] {
        let err = tool.call_json(args.clone()).await.unwrap_err();
        assert!(
            matches!(err, ToolError::InvalidArguments(_)),
            "{args}: {err}"
        );
        assert!(err.to_string().contains(expected), "{args}: {err}");
    }
    assert_eq!(server.seen.total_hits(), 0);
}

/// A change to a valid config.
type ConfigEdit = dyn Fn(&mut HttpSearchConfig);

#[test]
fn invalid_configs_are_rejected_with_the_field_named() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cases: [(&ConfigEdit, &str); 10] = [
        (
            &|c| c.url = "http://127.0.0.1:9/{query}".into(),
            "placeholders must be in the query string",
        ),
        (
            &|c| c.url = "http://127.0.0.1:9/?q={qeury}".into(),
            "unknown placeholder '{qeury}'",
        ),
        (
            &|c| c.url = "not a url?q={query}".into(),
            "is not a valid URL",
        ),
        (
            &|c| c.url = "http://127.0.0.1:9/?q=x".into(),
            "the query goes nowhere",
        ),
        (
            &|c| {
                c.url = "http://127.0.0.1:9/?q=x".into();
                c.query_param = Some("q".into());
            },
            "query_param 'q' clashes",
        ),
        (&|c| c.limits.timeout_ms = 0, "limits.timeout_ms is 0"),
        (
            &|c| c.limits.connect_timeout_ms = 0,
            "limits.connect_timeout_ms is 0",
        ),
        (
            &|c| c.body = Some(json!({"q": "{query}"})),
            "body is set but method is GET",
        ),
        (
            &|c| c.security.allowed_hosts = vec!["example.com".into()],
            "host '127.0.0.1' is not in allowed_hosts",
        ),
        (
            &|c| {
                c.headers.insert("X-Query".into(), "{query}".into());
            },
            "headers cannot carry the model's query",
        ),
    ];
    for (edit, expected) in cases {
        let mut config = config(addr, "/search?q={query}");
        edit(&mut config);
        let err = HttpSearchTool::new(config).unwrap_err().to_string();
        assert!(err.contains(expected), "expected '{expected}' in: {err}");
    }
}

/// Loads a shipped config and points it at the test server.
fn shipped(name: &str, addr: SocketAddr, host: &str) -> HttpSearchTool {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name);
    let mut config = HttpSearchConfig::from_toml_file(&path).unwrap();
    config.url = config.url.replace(host, &format!("http://{addr}"));
    config.security.allowed_hosts = vec!["127.0.0.1".into()];
    config.security.allow_private = true;
    HttpSearchTool::with_env(config, |_| Some("test-key".into())).unwrap()
}

#[tokio::test]
async fn the_shipped_configs_work_against_look_alike_servers() {
    let server = start_server().await;

    let searx = shipped("searxng.toml", server.addr, "http://searx.internal:8080");
    let text = call(&searx, "tote").await.unwrap();
    assert!(
        text.starts_with("1. First tote: A black leather tote."),
        "{text}"
    );
    let params = server.seen.last_params.lock().unwrap().clone();
    assert!(
        params.contains(&("format".into(), "json".into())),
        "{params:?}"
    );

    let opensearch = shipped(
        "opensearch.toml",
        server.addr,
        "https://search.example.com:9200",
    );
    let text = call(&opensearch, "tote").await.unwrap();
    assert_eq!(
        text,
        "1. Aurora Tote: matched tote (https://shop.example/BAG-1)"
    );
    let body = server.seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(body["size"], json!(5));
    let headers = server.seen.last_headers.lock().unwrap().clone();
    assert_eq!(headers.get("authorization").unwrap(), "ApiKey test-key");

    let rest = shipped("generic-rest.toml", server.addr, "https://api.example.com");
    let text = call(&rest, "refund").await.unwrap();
    assert_eq!(text, "1. Returns: 30 days. (https://help.example/returns)");
    let params = server.seen.last_params.lock().unwrap().clone();
    assert_eq!(
        params,
        [
            ("lang".to_string(), "en".to_string()),
            ("limit".to_string(), "3".to_string()),
            ("q".to_string(), "refund".to_string()),
        ]
    );
}
