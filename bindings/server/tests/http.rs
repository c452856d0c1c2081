//! The HTTP server for real: started on 127.0.0.1 with an ephemeral port, driven by a real HTTP
//! client (reqwest), recording into a real SQLite store. Episodes come from a scripted policy of
//! fixed cost (searchloop_core::scripted), except one test that asks the embedded model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::{Client, StatusCode};
use searchloop_core::{AgentConfig, Trajectory};
use searchloop_server::{
    ApiKey, AppState, ServerConfig, ServerError,
    api::{AskResponse, ErrorBody, FeedbackResponse, HealthResponse},
};
use searchloop_store_sql::{FeedbackOutcome, Store, StoreOptions};
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::support::SCRIPTED_ADAPTER;

/// A bad request: path, content type, body, and the status and error code it must get.
type BadPost<'a> = (&'a str, Option<&'a str>, Vec<u8>, StatusCode, &'a str);

/// A running server and what the tests need to check it.
struct TestServer {
    base: String,
    store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<searchloop_server::Result<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server whose scripted model takes `delay` per turn (two turns per episode).
    async fn start(config: ServerConfig, delay: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (state, store) =
            support::scripted_state(dir.path(), delay, StoreOptions::default()).await;
        Self::serve(state, store, config, dir).await
    }

    async fn serve(
        state: AppState,
        store: Arc<Store>,
        config: ServerConfig,
        dir: tempfile::TempDir,
    ) -> Self {
        let config = ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..config
        };
        let listener = searchloop_server::bind(&config).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            searchloop_server::serve(listener, state, &config, async {
                let _ = rx.await;
            })
            .await
        });
        Self {
            base,
            store,
            shutdown: Some(tx),
            task,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Signals shutdown and returns what `serve` returned.
    async fn stop(mut self) -> searchloop_server::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
    }
}

/// Checks that a response is an error with `status` and a JSON body `{"error": {code, message}}`
/// with `code`, and returns the message.
async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status(), status, "{}", response.url());
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(content_type, "application/json", "{}", response.url());
    let body: ErrorBody = response.json().await.expect("error body is not the schema");
    assert_eq!(body.error.code, code, "{}", body.error.message);
    assert!(!body.error.message.is_empty());
    body.error.message
}

async fn ask(client: &Client, server: &TestServer, body: Value) -> AskResponse {
    let response = client
        .post(server.url("/v1/ask"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// The value of an unlabelled or labelled sample line of the metrics text.
/// Sends `request` and reads its body as JSON of type `T`.
async fn json_of<T: serde::de::DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
    request.send().await.unwrap().json().await.unwrap()
}

/// Sends `request` and reads its body as text.
async fn text_of(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_feedback_and_trajectory_round_trip() {
    let server = TestServer::start(ServerConfig::default(), Duration::ZERO).await;
    let client = Client::new();

    let answer = ask(
        &client,
        &server,
        json!({"question": "What colour is the Nova Tote?"}),
    )
    .await;
    assert_eq!(answer.answer.as_deref(), Some("red"));
    assert_eq!(answer.adapter_version, Some(SCRIPTED_ADAPTER));
    assert_eq!(answer.turns, 2);
    assert_eq!(answer.tool_calls.len(), 1);
    assert_eq!(answer.tool_calls[0].tool, "catalog");
    assert_eq!(
        answer.tool_calls[0].arguments,
        json!({"query": "What colour is the Nova Tote?"})
    );
    assert!(answer.tool_calls[0].ok);
    assert!(answer.latency_ms > 0.0);

    // The trajectory the server names is the one in the store, served back whole.
    let response = client
        .get(server.url(&format!("/v1/trajectories/{}", answer.trajectory_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let served: Trajectory = response.json().await.unwrap();
    let stored = server
        .store
        .get_trajectory(&answer.trajectory_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(served, stored);
    assert_eq!(served.question, "What colour is the Nova Tote?");

    // Feedback lands in the ledger once, however often it is delivered.
    let feedback = json!({"trajectory_id": answer.trajectory_id, "source": "purchase",
        "value": 1.0, "idempotency_key": "order-17"});
    for expected in [FeedbackOutcome::Recorded, FeedbackOutcome::Duplicate] {
        let response = client
            .post(server.url("/v1/feedback"))
            .json(&feedback)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: FeedbackResponse = response.json().await.unwrap();
        assert_eq!(body.outcome, expected);
        assert_eq!(body.trajectory_id, answer.trajectory_id);
    }
    let conflict = client
        .post(server.url("/v1/feedback"))
        .json(
            &json!({"trajectory_id": answer.trajectory_id, "source": "purchase",
            "value": -1.0, "idempotency_key": "order-17"}),
        )
        .send()
        .await
        .unwrap();
    expect_error(conflict, StatusCode::CONFLICT, "idempotency_conflict").await;
    let stored = server
        .store
        .get_trajectory(&answer.trajectory_id)
        .await
        .unwrap()
        .unwrap();
    let purchases: Vec<_> = stored
        .rewards
        .iter()
        .filter(|r| r.source == "purchase")
        .collect();
    assert_eq!(purchases.len(), 1);
    assert_eq!(purchases[0].value, 1.0);

    // Sampling overrides apply to that episode only, and are recorded with it.
    let hot = ask(
        &client,
        &server,
        json!({"question": "Is it red?", "temperature": 0.9, "top_k": 5, "seed": 7}),
    )
    .await;
    let hot = server
        .store
        .get_trajectory(&hot.trajectory_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((hot.sampling.temperature, hot.sampling.top_k), (0.9, 5));
    let plain = ask(&client, &server, json!({"question": "Is it red?"})).await;
    let plain = server
        .store
        .get_trajectory(&plain.trajectory_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        plain.sampling.temperature,
        AgentConfig::default().sampling.temperature
    );

    let health: HealthResponse = json_of(client.get(server.url("/healthz"))).await;
    assert_eq!(health.status, "ok");
    assert_eq!(
        (health.model_id.as_str(), health.adapter_version),
        ("scripted", Some(SCRIPTED_ADAPTER))
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_json_4xx_and_the_server_keeps_serving() {
    let config = ServerConfig {
        body_limit_bytes: 4096,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, Duration::ZERO).await;
    let client = Client::new();
    let known = ask(&client, &server, json!({"question": "Nova Tote?"}))
        .await
        .trajectory_id;
    let post_raw = |path: &str, content_type: Option<&str>, body: Vec<u8>| {
        let mut request = client.post(server.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        request.send()
    };
    let json_type = Some("application/json");
    let cases: Vec<BadPost> = vec![
        (
            "/v1/ask",
            json_type,
            b"{\"question\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/v1/ask",
            json_type,
            b"not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/v1/ask",
            json_type,
            b"".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": \"\xff\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/v1/ask",
            json_type,
            b"[1, 2]".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": 5}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": \"q\", \"temprature\": 1}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": \"   \"}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": \"q\", \"temperature\": 9}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": \"q\", \"top_p\": 0}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": \"q\", \"top_k\": -1}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/ask",
            json_type,
            b"{\"question\": \"q\", \"temperature\": 1e999}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/v1/ask",
            None,
            b"{\"question\": \"q\"}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "/v1/ask",
            Some("text/plain"),
            b"{\"question\": \"q\"}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "/v1/ask",
            json_type,
            format!("{{\"question\": \"{}\"}}", "x".repeat(5000)).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "/v1/feedback",
            json_type,
            b"{\"trajectory_id\": \"nope\", \"source\": \"s\", \"value\": 1}".to_vec(),
            StatusCode::NOT_FOUND,
            "unknown_trajectory",
        ),
        (
            "/v1/feedback",
            json_type,
            format!("{{\"trajectory_id\": \"{known}\", \"source\": \"s\", \"value\": 7}}")
                .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_feedback",
        ),
        (
            "/v1/feedback",
            json_type,
            format!("{{\"trajectory_id\": \"{known}\", \"source\": \"no spaces\", \"value\": 1}}")
                .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_feedback",
        ),
        (
            "/v1/feedback",
            json_type,
            format!("{{\"trajectory_id\": \"{known}\", \"source\": \"s\"}}").into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/feedback",
            json_type,
            format!("{{\"trajectory_id\": \"{known}\", \"source\": \"s\", \"value\": \"1\"}}")
                .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/trajectories/x",
            json_type,
            b"{}".to_vec(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "/v2/ask",
            json_type,
            b"{}".to_vec(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        // One character over the default limit: refused before any model work.
        (
            "/v1/ask",
            json_type,
            format!(
                "{{\"question\": \"{}\"}}",
                "é".repeat(searchloop_core::DEFAULT_MAX_QUESTION_CHARS + 1)
            )
            .into_bytes(),
            StatusCode::BAD_REQUEST,
            "question_too_long",
        ),
    ];
    for (path, content_type, body, status, code) in cases {
        let response = post_raw(path, content_type, body).await.unwrap();
        expect_error(response, status, code).await;
    }
    let get_cases = [
        (
            "/v1/trajectories/no-such-id".to_string(),
            StatusCode::NOT_FOUND,
            "unknown_trajectory",
        ),
        (
            format!("/v1/trajectories/{}", "z".repeat(3000)),
            StatusCode::NOT_FOUND,
            "unknown_trajectory",
        ),
        (
            "/v1/trajectories/%FF%FE".to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "/v1/ask".to_string(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        ("/nowhere".to_string(), StatusCode::NOT_FOUND, "not_found"),
    ];
    for (path, status, code) in get_cases {
        let response = client.get(server.url(&path)).send().await.unwrap();
        expect_error(response, status, code).await;
    }

    // Nothing above was a server error, and the server still answers.
    let metrics = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    assert!(
        !text.contains("status=\"5"),
        "a bad request caused a 5xx:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            "searchloop_http_requests_total{route=\"/v1/ask\",method=\"POST\",status=\"422\"}"
        ),
        8.0
    );
    let again = ask(&client, &server, json!({"question": "Nova Tote?"})).await;
    assert_eq!(again.answer.as_deref(), Some("red"));
    assert_eq!(server.store.stats().await.unwrap().trajectories, 2);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_every_route_but_health() {
    let config = ServerConfig {
        api_key: Some(ApiKey::new("k3y-for-tests").unwrap()),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, Duration::ZERO).await;
    let client = Client::new();
    let ask_body = json!({"question": "Nova Tote?"});

    let missing = client
        .post(server.url("/v1/ask"))
        .json(&ask_body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        missing.headers()[reqwest::header::WWW_AUTHENTICATE],
        "Bearer"
    );
    let message = expect_error(missing, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert!(message.contains("missing"), "{message}");
    for (name, value) in [
        ("authorization", "Bearer k3y-for-test"),
        ("authorization", "Basic k3y-for-tests"),
        ("x-api-key", "k3y-for-tests2"),
        ("x-api-key", "K3Y-FOR-TESTS"),
    ] {
        let response = client
            .post(server.url("/v1/ask"))
            .header(name, value)
            .json(&ask_body)
            .send()
            .await
            .unwrap();
        let message = expect_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert!(message.contains("invalid"), "{name}: {value}: {message}");
    }
    for path in ["/metrics", "/v1/trajectories/x"] {
        let response = client.get(server.url(path)).send().await.unwrap();
        expect_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let response = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    for (name, value) in [
        ("authorization", "Bearer k3y-for-tests"),
        ("authorization", "bearer   k3y-for-tests"),
        ("x-api-key", "k3y-for-tests"),
    ] {
        let response = client
            .post(server.url("/v1/ask"))
            .header(name, value)
            .json(&ask_body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}: {value}");
        let response = client
            .get(server.url("/metrics"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}: {value}");
    }
    // Refused requests ran no episode.
    assert_eq!(server.store.stats().await.unwrap().trajectories, 3);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_gets_504_and_records_nothing() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, Duration::from_secs(2)).await;
    let client = Client::new();
    let started = Instant::now();
    let response = client
        .post(server.url("/v1/ask"))
        .json(&json!({"question": "Nova Tote?"}))
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::GATEWAY_TIMEOUT, "timeout").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The abandoned episode never reaches the store, even after its model turn would be done.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(server.store.stats().await.unwrap().trajectories, 0);
    server.stop().await.unwrap();
}

/// Sends a question in the background and returns once the server is running its episode.
async fn spawn_ask(server: &TestServer) -> JoinHandle<reqwest::Result<reqwest::Response>> {
    let client = Client::new();
    let task = tokio::spawn({
        let (client, url) = (client.clone(), server.url("/v1/ask"));
        async move {
            client
                .post(url)
                .json(&json!({"question": "Nova Tote?"}))
                .send()
                .await
        }
    });
    // The health check counts itself: 2 in flight means the question is being answered.
    for _ in 0..500 {
        let health: HealthResponse = json_of(client.get(server.url("/healthz"))).await;
        if health.in_flight >= 2 {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the question never reached the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_episode_in_flight() {
    // Two turns of 1 s: the episode is still running when shutdown begins.
    let mut server = TestServer::start(ServerConfig::default(), Duration::from_secs(1)).await;
    let in_flight = spawn_ask(&server).await;
    let health_url = server.url("/healthz");
    let _ = server.shutdown.take().unwrap().send(());

    // Soon no new connection is accepted, while the episode in flight goes on.
    let mut refused = false;
    for _ in 0..50 {
        if Client::new().get(&health_url).send().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "new connections are still accepted during shutdown"
    );

    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight was dropped");
    assert_eq!(response.status(), StatusCode::OK);
    let answer: AskResponse = response.json().await.unwrap();
    assert_eq!(answer.answer.as_deref(), Some("red"));
    let store = server.store.clone();
    server
        .stop()
        .await
        .expect("shutdown within the grace period is clean");
    assert!(
        store
            .get_trajectory(&answer.trajectory_id)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outliving_the_grace_period_get_503() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start(config, Duration::from_secs(5)).await;
    let in_flight = spawn_ask(&server).await;
    let started = Instant::now();
    let _ = server.shutdown.take().unwrap().send(());
    let response = in_flight.await.unwrap().unwrap();
    expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "shutting_down").await;
    let store = server.store.clone();
    match server.stop().await {
        Err(ServerError::ShutdownTimeout { abandoned, .. }) => assert_eq!(abandoned, 1),
        other => panic!("expected a shutdown timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(store.stats().await.unwrap().trajectories, 0);
}

/// 32 concurrent clients, 200 requests each: asks (some with a failing tool), trajectory reads,
/// feedback, health checks. Every response must be well-formed, every episode must be in the
/// store, and the metrics must add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_load_32_clients_200_requests_each() {
    const CLIENTS: usize = 32;
    const REQUESTS: usize = 200;
    let server =
        Arc::new(TestServer::start(ServerConfig::default(), Duration::from_millis(1)).await);
    let started = Instant::now();
    let clients = (0..CLIENTS).map(|c| {
        let server = server.clone();
        tokio::spawn(async move {
            let client = Client::new();
            let mut asked: Vec<AskResponse> = Vec::new();
            let mut feedback = 0u64;
            for i in 0..REQUESTS {
                match (i % 4, asked.last()) {
                    (0 | 1, _) | (_, None) => {
                        let question = if i % 20 == 1 {
                            format!("broken query {c}-{i}")
                        } else {
                            format!("Nova Tote {c}-{i}?")
                        };
                        let answer = ask(&client, &server, json!({"question": question})).await;
                        assert_eq!(answer.answer.as_deref(), Some("red"));
                        assert_eq!(answer.tool_calls.len(), 1);
                        assert_eq!(answer.tool_calls[0].ok, !question.starts_with("broken"));
                        asked.push(answer);
                    }
                    (2, Some(last)) => {
                        let url = server.url(&format!("/v1/trajectories/{}", last.trajectory_id));
                        let response = client.get(url).send().await.unwrap();
                        assert_eq!(response.status(), StatusCode::OK);
                        let t: Trajectory = response.json().await.unwrap();
                        assert_eq!(t.id, last.trajectory_id);
                    }
                    (_, Some(last)) => {
                        let response = client
                            .post(server.url("/v1/feedback"))
                            .json(&json!({"trajectory_id": last.trajectory_id,
                                "source": "thumbs", "value": 0.5}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(response.status(), StatusCode::OK);
                        let body: FeedbackResponse = response.json().await.unwrap();
                        assert_eq!(body.outcome, FeedbackOutcome::Recorded);
                        feedback += 1;
                    }
                }
            }
            (asked, feedback)
        })
    });
    let mut answers = Vec::new();
    let mut feedback = 0;
    for client in futures::future::join_all(clients).await {
        let (asked, given) = client.unwrap();
        answers.extend(asked);
        feedback += given;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "load: {} requests in {:.1} s ({:.0} req/s), {} episodes",
        CLIENTS * REQUESTS,
        elapsed.as_secs_f64(),
        (CLIENTS * REQUESTS) as f64 / elapsed.as_secs_f64(),
        answers.len()
    );

    // Every episode the server answered is in the store, and nothing else is.
    let stats = server.store.stats().await.unwrap();
    assert_eq!(stats.trajectories, answers.len() as u64);
    assert_eq!(stats.feedback_entries, feedback);
    let mut ids: Vec<_> = answers.iter().map(|a| a.trajectory_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), answers.len(), "trajectory ids are unique");
    let mut generated = 0u64;
    for answer in &answers {
        let t = server
            .store
            .get_trajectory(&answer.trajectory_id)
            .await
            .unwrap();
        let t = t.unwrap_or_else(|| panic!("{} is not in the store", answer.trajectory_id));
        generated += t.tokens_of(searchloop_core::SegmentKind::Model).len() as u64;
    }

    let text = Client::new()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let episodes = answers.len() as f64;
    let broken = answers.iter().filter(|a| !a.tool_calls[0].ok).count() as f64;
    assert_eq!(
        metric(
            &text,
            "searchloop_http_requests_total{route=\"/v1/ask\",method=\"POST\",status=\"200\"}"
        ),
        episodes
    );
    assert_eq!(
        metric(
            &text,
            "searchloop_http_request_duration_seconds_count{route=\"/v1/ask\",method=\"POST\",status=\"200\"}"
        ),
        episodes
    );
    assert_eq!(
        metric(
            &text,
            "searchloop_http_requests_total{route=\"/v1/feedback\",method=\"POST\",status=\"200\"}"
        ),
        feedback as f64
    );
    assert_eq!(
        metric(&text, "searchloop_episodes_total{end=\"answered\"}"),
        episodes
    );
    assert_eq!(
        metric(&text, "searchloop_tool_calls_total{tool=\"catalog\"}"),
        episodes
    );
    assert_eq!(
        metric(&text, "searchloop_tool_call_errors_total{tool=\"catalog\"}"),
        broken
    );
    assert!(broken > 0.0);
    assert_eq!(
        metric(&text, "searchloop_tokens_generated_total"),
        generated as f64
    );
    assert_eq!(metric(&text, "searchloop_store_trajectories"), episodes);
    assert_eq!(
        metric(&text, "searchloop_store_feedback_entries"),
        feedback as f64
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "searchloop_store_trajectories_by_adapter{{adapter_version=\"{SCRIPTED_ADAPTER}\"}}"
            )
        ),
        episodes
    );
    assert_eq!(
        metric(
            &text,
            "searchloop_store_reward_entries_by_source{source=\"thumbs\"}"
        ),
        feedback as f64
    );
    assert_eq!(
        metric(&text, "searchloop_http_requests_in_flight"),
        1.0,
        "the scrape itself"
    );
    assert!(!text.contains("status=\"5"), "{text}");

    let server = Arc::into_inner(server).unwrap();
    server.stop().await.unwrap();
}

/// One question to the embedded model through the whole stack: config, runtime, catalog index,
/// HTTP, store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_model_answers_over_http() {
    use searchloop_demo::retail::QuestionKind;
    use searchloop_runtime::Runtime;

    let dir = tempfile::tempdir().unwrap();
    let (config, dataset) = support::retail_config(dir.path());
    let runtime = Arc::new(Runtime::start(config).await.unwrap());
    let store = runtime.store().clone();
    let state = AppState::from_runtime(runtime);
    let server = TestServer::serve(state, store, ServerConfig::default(), dir).await;

    let question = dataset
        .questions
        .iter()
        .find(|q| q.kind == QuestionKind::SingleHop)
        .unwrap();
    let client = Client::new();
    let answer = ask(
        &client,
        &server,
        json!({"question": question.question, "seed": 1}),
    )
    .await;
    eprintln!(
        "real model: {:?} in {:.1} s (gold {:?})",
        answer.answer,
        answer.latency_ms / 1e3,
        question.answers
    );
    assert_ne!(answer.model_id, "scripted");
    assert!(!answer.tool_calls.is_empty(), "the model searched nothing");
    assert_eq!(answer.tool_calls[0].tool, "catalog");
    let stored = server
        .store
        .get_trajectory(&answer.trajectory_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.question, question.question);
    assert!(
        !stored
            .tokens_of(searchloop_core::SegmentKind::Model)
            .is_empty()
    );
    let text = text_of(client.get(server.url("/metrics"))).await;
    assert!(metric(&text, "searchloop_tokens_generated_total") > 0.0);
    server.stop().await.unwrap();
}

/// Sixty-four askers at once against the embedded model on the CPU: every one gets a well-formed
/// answer or a clean 503/504 within the request timeout, nothing answered is missing from the
/// store, and the server goes on serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_askers_on_the_real_model_get_answers_or_clean_refusals() {
    use searchloop_runtime::Runtime;

    let dir = tempfile::tempdir().unwrap();
    let (config, dataset) = support::retail_config(dir.path());
    let runtime = Arc::new(Runtime::start(config).await.unwrap());
    let store = runtime.store().clone();
    let state = AppState::from_runtime(runtime);
    let timeout = Duration::from_secs(30);
    let server_config = ServerConfig {
        request_timeout: timeout,
        ..ServerConfig::default()
    };
    let server = Arc::new(TestServer::serve(state, store, server_config, dir).await);
    let client = Client::new();
    let asks = dataset.questions.iter().take(64).enumerate().map(|(i, q)| {
        let (client, server) = (client.clone(), server.clone());
        let question = q.question.clone();
        tokio::spawn(async move {
            let response = client
                .post(server.url("/v1/ask"))
                .json(&json!({"question": question, "seed": i}))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        })
    });
    let started = std::time::Instant::now();
    let mut answered = 0u64;
    let mut refused = 0u64;
    for ask in asks.collect::<Vec<_>>() {
        let (status, body) = ask.await.unwrap();
        match status {
            StatusCode::OK => {
                assert!(body["trajectory_id"].is_string(), "{body}");
                assert!(body.get("end").is_some(), "{body}");
                answered += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                assert!(body["error"]["code"].is_string(), "{body}");
                refused += 1;
            }
            other => panic!("status {other}: {body}"),
        }
    }
    eprintln!(
        "64 askers: {answered} answered, {refused} refused in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(answered + refused, 64);
    assert!(answered > 0, "no asker got an answer");
    assert!(started.elapsed() < timeout + Duration::from_secs(30));
    // Every answer is in the store; refused episodes recorded nothing.
    assert_eq!(server.store.stats().await.unwrap().trajectories, answered);
    // The server survived and still answers.
    let health = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let after = ask(
        &client,
        &server,
        json!({"question": dataset.questions[0].question, "seed": 1}),
    )
    .await;
    assert!(!after.trajectory_id.is_empty());
    let server = Arc::into_inner(server).unwrap();
    server.stop().await.unwrap();
}

/// Loads scripted models that record the adapter version they were loaded for, so a swap shows
/// in every answer without loading real weights.
struct ScriptedLoader;

#[async_trait::async_trait]
impl searchloop_runtime::PolicyLoader for ScriptedLoader {
    async fn load(
        &self,
        _merged: Option<&std::path::Path>,
        version: Option<u64>,
    ) -> searchloop_loop::Result<Arc<dyn searchloop_core::Policy>> {
        Ok(Arc::new(
            searchloop_core::scripted::ScriptedPolicy::new(support::script)
                .with_adapter_version(version),
        ))
    }
}

/// A round that waits until the test releases it, then fails the way a broken round does.
struct HeldRound {
    release: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl searchloop_loop::RoundRunner for HeldRound {
    async fn run(
        &self,
        _job: &searchloop_loop::RoundJob,
    ) -> searchloop_loop::Result<searchloop_loop::RoundCandidate> {
        let mut release = self.release.clone();
        let _ = release.wait_for(|r| *r).await;
        Err(searchloop_loop::LoopError::Adapter(
            "the stand-in round trains nothing".into(),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_promotion_rollback_and_training_over_http() {
    use searchloop_runtime::{Runtime, SchedulerConfig};
    use searchloop_store_sql::NewAdapter;

    let dir = tempfile::tempdir().unwrap();
    let (mut config, _) = support::retail_config(dir.path());
    let mut learn = SchedulerConfig {
        adapters_dir: dir.path().join("adapters"),
        ..SchedulerConfig::default()
    };
    learn.eval.set = dir.path().join("data").join("questions.jsonl");
    learn.eval.questions = 2;
    config.learn = Some(learn);
    let runtime = Arc::new(
        Runtime::start_with(config, Vec::new(), Arc::new(ScriptedLoader))
            .await
            .unwrap(),
    );
    let (release, released) = tokio::sync::watch::channel(false);
    runtime.set_round_runner(Arc::new(HeldRound { release: released }));
    for version in 1..=2 {
        let folder = dir.path().join(format!("adapter-{version}"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(searchloop_loop::adapters::MERGED_FILE), b"").unwrap();
        runtime
            .store()
            .register_adapter(NewAdapter {
                content_hash: format!("hash-{version}"),
                parent_version: None,
                path: folder.display().to_string(),
                training_config: json!({}),
                metrics_summary: json!({}),
                created_at: None,
            })
            .await
            .unwrap();
    }
    let store = runtime.store().clone();
    let state = AppState::from_runtime(runtime);
    let server = TestServer::serve(state, store, ServerConfig::default(), dir).await;
    let client = Client::new();
    let post = |path: &str| client.post(server.url(path));

    let listing: Value = json_of(client.get(server.url("/v1/adapters"))).await;
    assert_eq!(listing["serving_version"], Value::Null);
    let statuses: Vec<&str> = listing["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["candidate", "candidate"]);

    let swap: Value = json_of(post("/v1/adapters/1/promote")).await;
    assert_eq!((&swap["from"], &swap["to"]), (&Value::Null, &json!(1)));
    let answer = ask(&client, &server, json!({"question": "red bags?"})).await;
    assert_eq!(answer.adapter_version, Some(1));
    let swap: Value = json_of(post("/v1/adapters/2/promote")).await;
    assert_eq!((&swap["from"], &swap["to"]), (&json!(1), &json!(2)));
    // No body at all: back to the adapter promoted before.
    let response = post("/v1/adapters/rollback").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let swap: Value = response.json().await.unwrap();
    assert_eq!((&swap["from"], &swap["to"]), (&json!(2), &json!(1)));
    let answer = ask(&client, &server, json!({"question": "red bags?"})).await;
    assert_eq!(answer.adapter_version, Some(1));

    // Bad requests get their 4xx and change nothing.
    let cases = [
        (
            "/v1/adapters/99/promote",
            None,
            StatusCode::NOT_FOUND,
            "unknown_adapter",
        ),
        (
            "/v1/adapters/two/promote",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_version",
        ),
        (
            "/v1/adapters/2/promote",
            None,
            StatusCode::CONFLICT,
            "adapter_refused",
        ),
        (
            "/v1/adapters/rollback",
            Some(json!({"to": 99})),
            StatusCode::NOT_FOUND,
            "unknown_adapter",
        ),
        (
            "/v1/adapters/rollback",
            Some(json!({"to": "one"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/v1/adapters/rollback",
            Some(json!({"version": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
    ];
    for (path, body, status, code) in cases {
        let request = match body {
            Some(body) => post(path).json(&body),
            None => post(path),
        };
        expect_error(request.send().await.unwrap(), status, code).await;
    }
    let listing: Value = json_of(client.get(server.url("/v1/adapters"))).await;
    assert_eq!(listing["serving_version"], json!(1));

    // Training: 202 at once, 409 while the round runs, its failure reported when it ends.
    let response = post("/v1/train").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let started: Value = response.json().await.unwrap();
    assert_eq!(started["running"], json!(true));
    expect_error(
        post("/v1/train").send().await.unwrap(),
        StatusCode::CONFLICT,
        "round_busy",
    )
    .await;
    release.send(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status: Value = json_of(client.get(server.url("/v1/train"))).await;
        if status["running"] == json!(false) {
            break status;
        }
        assert!(Instant::now() < deadline, "the round never ended: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = status["last"]["error"].as_str().unwrap();
    assert!(error.contains("trains nothing"), "{error}");
    assert_eq!(status["last"]["report"], Value::Null);

    let text = text_of(client.get(server.url("/metrics"))).await;
    assert_eq!(
        metric(&text, "searchloop_adapter_swaps_total{kind=\"promotion\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "searchloop_adapter_swaps_total{kind=\"rollback\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "searchloop_training_rounds_total{outcome=\"failed\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "searchloop_training_round_running"), 0.0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_runtime_refuses_learning_requests() {
    let server = TestServer::start(ServerConfig::default(), Duration::ZERO).await;
    let client = Client::new();
    let requests = [
        client.get(server.url("/v1/adapters")),
        client.post(server.url("/v1/adapters/1/promote")),
        client.post(server.url("/v1/adapters/rollback")),
        client.post(server.url("/v1/train")),
        client.get(server.url("/v1/train")),
    ];
    for request in requests {
        expect_error(
            request.send().await.unwrap(),
            StatusCode::CONFLICT,
            "learning_unavailable",
        )
        .await;
    }
    server.stop().await.unwrap();
}
