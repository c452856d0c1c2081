//! The bindings' Rust API end to end, on the scripted stand-in for the model: a real catalog
//! index, a real SQLite store, and a host tool written in Rust the way a host writes one in
//! Python. (The real model is exercised by the Python suite, `scripts/test-python.sh`.)

// Helpers of a test file may fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use searchloop_ffi::{
    Agent, AgentOptions, CatalogOptions, EpisodeEnd, FeedbackOutcome, HostToolError,
    ScriptedPolicyOptions, SearchTool, SearchloopError,
};

/// A host's product API that remembers what it was asked.
#[derive(Default)]
struct ProductApi {
    queries: Mutex<Vec<String>>,
}

impl SearchTool for ProductApi {
    fn name(&self) -> Result<String, HostToolError> {
        Ok("product_api".into())
    }

    fn description(&self) -> Result<String, HostToolError> {
        Ok("Finds products by name.".into())
    }

    fn call(&self, query: String) -> Result<String, HostToolError> {
        self.queries.lock().unwrap().push(query.clone());
        Ok(format!(
            "[BAG-00001] Nova Tote, red leather (asked: {query})"
        ))
    }
}

/// Options over a one-product catalog and a store in `dir`.
fn options(dir: &Path) -> AgentOptions {
    let products = dir.join("catalog.jsonl");
    std::fs::write(
        &products,
        r#"{"sku":"BAG-00001","name":"Nova Tote","brand":"Lumen","category":"bags","color":"red","material":"leather","price":89.0,"stock":4,"description":"A red leather tote."}"#,
    )
    .unwrap();
    AgentOptions {
        catalogs: vec![CatalogOptions {
            name: "catalog".into(),
            index: dir.join("index").to_string_lossy().into_owned(),
            products: vec![products.to_string_lossy().into_owned()],
            results: 3,
        }],
        store_url: Some(dir.join("store.db").to_string_lossy().into_owned()),
        ..AgentOptions::default()
    }
}

fn script() -> ScriptedPolicyOptions {
    ScriptedPolicyOptions {
        answer: "red".into(),
        turn_delay_ms: 0,
    }
}

/// Awaits `future` the way a host's single-threaded event loop does.
fn wait<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

#[test]
fn ask_feedback_trajectory_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::scripted(options(dir.path()), script(), Vec::new()).unwrap();
    assert_eq!(agent.tool_names(), vec!["catalog"]);
    assert_eq!(agent.model_id(), "scripted");

    let answer = wait(agent.ask("What colour is the Nova Tote?".into())).unwrap();
    assert_eq!(answer.text.as_deref(), Some("red"));
    assert_eq!(answer.end, EpisodeEnd::Answered);
    let [search] = answer.tool_calls.as_slice() else {
        panic!("one search: {:?}", answer.tool_calls);
    };
    assert_eq!(search.tool, "catalog");
    assert!(search.ok);
    assert!(
        search.observation.contains("Nova Tote"),
        "{}",
        search.observation
    );
    assert_eq!(
        search.arguments_json,
        r#"{"query":"What colour is the Nova Tote?"}"#
    );

    let id = answer.trajectory_id.clone();
    let outcome = wait(agent.feedback(id.clone(), "purchase".into(), 1.0, Some("k1".into())));
    assert_eq!(outcome.unwrap(), FeedbackOutcome::Recorded);
    let again = wait(agent.feedback(id.clone(), "purchase".into(), 1.0, Some("k1".into())));
    assert_eq!(again.unwrap(), FeedbackOutcome::Duplicate);
    let conflict = wait(agent.feedback(id.clone(), "purchase".into(), 0.5, Some("k1".into())));
    assert!(
        matches!(&conflict, Err(SearchloopError::InvalidFeedback(m)) if m.contains("k1")),
        "{conflict:?}"
    );

    let stored = wait(agent.trajectory(id.clone())).unwrap();
    assert_eq!(stored.answer.as_deref(), Some("red"));
    assert_eq!(stored.tool_calls, answer.tool_calls);
    let sources: Vec<&str> = stored.rewards.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(sources, ["format", "purchase"]);
    // format 1 at weight 0.1, purchase 1 at weight 1.
    assert!(
        (stored.reward.unwrap() - 1.1).abs() < 1e-9,
        "{:?}",
        stored.reward
    );

    let stats = wait(agent.stats()).unwrap();
    assert_eq!(stats.backend, "sqlite");
    assert_eq!(stats.trajectories, 1);
    assert_eq!(stats.feedback_entries, 1);
    assert!(stats.size_bytes > 0);

    let unknown = wait(agent.trajectory("nope".into()));
    assert!(
        matches!(&unknown, Err(SearchloopError::UnknownTrajectory(m)) if m.contains("'nope'")),
        "{unknown:?}"
    );
    let empty = wait(agent.ask(" \n".into()));
    assert!(
        matches!(empty, Err(SearchloopError::InvalidInput(_))),
        "{empty:?}"
    );
}

#[test]
fn a_host_tool_can_be_the_default_search_tool() {
    let dir = tempfile::tempdir().unwrap();
    let api = Arc::new(ProductApi::default());
    let options = AgentOptions {
        default_tool: Some("product_api".into()),
        ..options(dir.path())
    };
    let agent = Agent::scripted(options, script(), vec![api.clone()]).unwrap();
    assert_eq!(agent.tool_names(), vec!["catalog", "product_api"]);
    assert_eq!(agent.default_tool().as_deref(), Some("product_api"));
    let answer = wait(agent.ask("Is the Nova Tote red?".into())).unwrap();
    assert_eq!(*api.queries.lock().unwrap(), ["Is the Nova Tote red?"]);
    assert_eq!(answer.tool_calls[0].tool, "product_api");
    assert_eq!(
        answer.tool_calls[0].observation,
        "[BAG-00001] Nova Tote, red leather (asked: Is the Nova Tote red?)"
    );
}

#[test]
fn concurrent_asks_share_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let script = ScriptedPolicyOptions {
        turn_delay_ms: 200,
        ..script()
    };
    let agent = Agent::scripted(options(dir.path()), script, Vec::new()).unwrap();
    let started = std::time::Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let agent = agent.clone();
            std::thread::spawn(move || wait(agent.ask(format!("question {i} about the tote"))))
        })
        .collect();
    let ids: std::collections::BTreeSet<String> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap().trajectory_id)
        .collect();
    assert_eq!(ids.len(), 4);
    // Two turns of 200 ms each: four asks in a row would take 1.6 s.
    assert!(
        started.elapsed().as_millis() < 1_200,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(wait(agent.stats()).unwrap().trajectories, 4);
}

#[test]
fn bad_options_are_config_errors_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            AgentOptions {
                temperature: Some(f32::NAN),
                ..options(dir.path())
            },
            "temperature",
        ),
        (
            AgentOptions {
                default_tool: Some("missing".into()),
                ..options(dir.path())
            },
            "default tool 'missing'",
        ),
        (
            AgentOptions {
                config_path: Some(dir.path().join("absent.toml").to_string_lossy().into()),
                ..AgentOptions::default()
            },
            "absent.toml",
        ),
        (AgentOptions::default(), "at least one [[tools]]"),
    ];
    for (options, expected) in cases {
        let err = Agent::scripted(options, script(), Vec::new()).unwrap_err();
        assert!(
            matches!(&err, SearchloopError::Config(m) if m.contains(expected)),
            "{expected}: {err:?}"
        );
    }
}
