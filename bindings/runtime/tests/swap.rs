//! Blue/green swaps under load: no request fails across promotions and rollbacks, every
//! trajectory records the adapter version of the model that served it, and a restart serves
//! what the registry says.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    ScriptedLoader, Workspace, model_path, register, version_name, write_candidate,
    write_stub_candidate,
};
use searchloop_core::{SamplingParams, Tool, ToolError};
use searchloop_demo::retail::Split;
use searchloop_runtime::{Runtime, SwapReport};
use searchloop_store_sql::AdapterStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_askers_across_two_promotions_and_a_rollback() {
    let ws = Workspace::new(120);
    let loader = Arc::new(
        ScriptedLoader::naming_versions()
            .with_delays(Duration::from_millis(80), Duration::from_millis(15)),
    );
    let runtime = Arc::new(
        Runtime::start_with(ws.config.clone(), Vec::new(), loader.clone())
            .await
            .unwrap(),
    );
    let store = runtime.store().clone();
    for v in ["v1", "v2"] {
        let folder = ws.adapters_dir().join(v);
        write_stub_candidate(&folder);
        register(&store, &folder, None).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let askers: Vec<_> = (0..16)
        .map(|i| {
            let (runtime, stop) = (runtime.clone(), stop.clone());
            let question = ws.questions[i].question.clone();
            tokio::spawn(async move {
                let mut served = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let t = runtime.ask(&question).await.expect("no request fails");
                    served.push(t);
                }
                served
            })
        })
        .collect();
    let pause = || tokio::time::sleep(Duration::from_millis(250));
    pause().await;
    let swaps = [
        runtime.promote(1).await.unwrap(),
        {
            pause().await;
            runtime.promote(2).await.unwrap()
        },
        {
            pause().await;
            runtime.rollback(None).await.unwrap()
        },
    ];
    pause().await;
    stop.store(true, Ordering::SeqCst);
    let mut served = Vec::new();
    for asker in askers {
        served.extend(asker.await.unwrap());
    }

    let expected = [(None, Some(1)), (Some(1), Some(2)), (Some(2), Some(1))];
    let got: Vec<_> = swaps.iter().map(|s: &SwapReport| (s.from, s.to)).collect();
    assert_eq!(got, expected);
    let mut per_version: BTreeMap<Option<u64>, usize> = BTreeMap::new();
    for t in &served {
        // The answer names the model that wrote it; the record must name the same one.
        assert_eq!(
            t.answer.as_deref(),
            Some(version_name(t.adapter_version).as_str()),
            "trajectory {} records v{:?} but was written by another model",
            t.id,
            t.adapter_version
        );
        let stored = store.get_trajectory(&t.id).await.unwrap().expect("stored");
        assert_eq!(stored.adapter_version, t.adapter_version);
        *per_version.entry(t.adapter_version).or_default() += 1;
    }
    assert_eq!(
        per_version.keys().copied().collect::<Vec<_>>(),
        vec![None, Some(1), Some(2)],
        "every model served: {per_version:?}"
    );
    assert!(served.len() > 100, "only {} episodes", served.len());
    assert_eq!(
        runtime.store().promoted().await.unwrap().unwrap().version,
        1
    );
    let v2 = store.get_adapter(2).await.unwrap().unwrap();
    assert_eq!(v2.status, AdapterStatus::RolledBack);
    let metrics = runtime.loop_metrics();
    assert_eq!(
        (metrics.swaps, metrics.promotions, metrics.rollbacks),
        (3, 2, 1)
    );
    assert_eq!(metrics.serving_version, Some(1));
    // The base model at start-up, then one load per swap.
    assert_eq!(loader.loads.load(Ordering::SeqCst), 4);
    eprintln!("episodes per version: {per_version:?}");
}

/// A search tool that holds every call until the test releases it, and says when a call has
/// arrived: an episode waiting in it is surely in flight, whatever the model's speed.
struct HeldSearch {
    entered: Arc<tokio::sync::Notify>,
    released: tokio::sync::watch::Receiver<bool>,
}

#[derive(serde::Deserialize)]
struct QueryArgs {
    query: String,
}

impl Tool for HeldSearch {
    type Args = QueryArgs;
    fn name(&self) -> &str {
        "held_search"
    }
    fn description(&self) -> &str {
        "Finds products by name."
    }
    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"]
        })
    }
    async fn call(&self, args: QueryArgs) -> Result<String, ToolError> {
        self.entered.notify_one();
        let mut released = self.released.clone();
        let _ = released.wait_for(|r| *r).await;
        Ok(format!("[BAG-00001] {} - red leather, $89.00", args.query))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_swap_mid_episode_then_a_restart_serve_what_the_registry_says() {
    let ws = Workspace::new(120);
    let folder = ws.adapters_dir().join("v1");
    write_candidate(&model_path(), &folder, None);
    // The first turn's search goes to a tool that holds the episode until after the swap.
    let entered = Arc::new(tokio::sync::Notify::new());
    let (release, released) = tokio::sync::watch::channel(false);
    let mut config = ws.config.clone();
    config.default_tool = Some("held_search".into());
    config.tool_limits.timeout_ms = 300_000;
    let held = HeldSearch {
        entered: entered.clone(),
        released,
    };
    let runtime = Arc::new(
        Runtime::start_with_tools(config, vec![Arc::new(held)])
            .await
            .unwrap(),
    );
    register(runtime.store(), &folder, None).await;
    let mut heldout = ws.questions.iter().filter(|q| q.split == Split::Heldout);
    let (first_q, second_q) = (heldout.next().unwrap(), heldout.next().unwrap());

    let first = {
        let (runtime, request) = (runtime.clone(), ws.request(first_q, 1));
        tokio::spawn(async move {
            let t = runtime.run(request).await.unwrap();
            (t, Instant::now())
        })
    };
    tokio::time::timeout(Duration::from_secs(120), entered.notified())
        .await
        .expect("the first episode never searched");
    let swap = runtime.promote(1).await.unwrap();
    let swapped_at = Instant::now();
    release.send(true).unwrap();
    assert_eq!((swap.from, swap.to), (None, Some(1)));
    let second = runtime.run(ws.request(second_q, 2)).await.unwrap();
    let (first, first_done) = first.await.unwrap();
    assert!(
        first_done > swapped_at,
        "the first episode should still be running when the swap happens"
    );
    assert_eq!(
        first.adapter_version, None,
        "the in-flight episode kept the old model"
    );
    assert_eq!(second.adapter_version, Some(1));
    let store = runtime.store().clone();
    for t in [&first, &second] {
        let stored = store.get_trajectory(&t.id).await.unwrap().unwrap();
        assert_eq!(stored.adapter_version, t.adapter_version);
    }
    store.close().await;
    drop(store);
    drop(runtime);

    // A new process on the same store serves the registry's promoted adapter.
    let restarted = Runtime::start(ws.config.clone()).await.unwrap();
    let policy = restarted.agent().policy().current();
    assert_eq!(policy.adapter_version(), Some(1));
    let prompt = policy.tokenize("Hello").unwrap();
    let params = SamplingParams {
        max_tokens: 4,
        seed: Some(1),
        ..SamplingParams::default()
    };
    let samples = policy.sample(&prompt, &params, 1).await.unwrap();
    assert!(!samples[0].tokens.is_empty(), "the restored model samples");
}
