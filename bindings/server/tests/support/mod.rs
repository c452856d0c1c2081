//! Shared by the HTTP tests and the benchmark: an agent whose model is a scripted policy of
//! fixed cost over a real SQLite store, and a real-model config over a small generated retail
//! catalog.
// Each target that includes this module uses a different part of it, and a failed set-up is a
// failed test or benchmark run.
#![allow(dead_code, clippy::unwrap_used)]

use std::{path::Path, sync::Arc, time::Duration};

use searchloop_core::{
    Agent, AgentConfig, PolicySlot, Tool, ToolError, ToolRegistry, scripted::ScriptedPolicy,
};
use searchloop_demo::retail::{self, GeneratorConfig, RetailDataset};
use searchloop_runtime::{
    AppConfig,
    config::{CatalogSection, StoreSection, ToolSection},
};
use searchloop_server::AppState;
use searchloop_store_sql::{Store, StoreOptions};
use serde_json::{Value, json};

/// The adapter version the scripted model reports.
pub const SCRIPTED_ADAPTER: u64 = 3;

/// A catalog stand-in whose search fails for queries containing "broken", so tool errors show.
pub struct Catalog;

/// The catalog's arguments.
#[derive(serde::Deserialize)]
pub struct QueryArgs {
    query: String,
}

impl Tool for Catalog {
    type Args = QueryArgs;
    fn name(&self) -> &str {
        "catalog"
    }
    fn description(&self) -> &str {
        "Finds products by name."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
    }
    async fn call(&self, args: QueryArgs) -> Result<String, ToolError> {
        if args.query.contains("broken") {
            return Err(ToolError::Failed("the catalog index is unavailable".into()));
        }
        Ok(format!("[BAG-00001] {} - red leather, $89.00", args.query))
    }
}

/// The scripted model: searches for the question (the runtime prefilled `<search>`), then
/// answers "red" (the runtime prefilled `<answer>`). Two turns per episode.
pub fn script(context: &str) -> String {
    if context.ends_with("<search>") {
        let question = context
            .rsplit_once("<user>")
            .and_then(|(_, rest)| rest.split_once("</user>"))
            .map_or("", |(q, _)| q);
        format!("{question}</search>")
    } else {
        "red</answer>".to_string()
    }
}

/// A server state over the scripted model (taking `turn_delay` per turn) and a store in `dir`.
pub async fn scripted_state(
    dir: &Path,
    turn_delay: Duration,
    options: StoreOptions,
) -> (AppState, Arc<Store>) {
    scripted_state_at(&dir.join("store.db").to_string_lossy(), turn_delay, options).await
}

/// [`scripted_state`] over the store at `location` (a SQLite path or a PostgreSQL URL).
pub async fn scripted_state_at(
    location: &str,
    turn_delay: Duration,
    options: StoreOptions,
) -> (AppState, Arc<Store>) {
    let store = Arc::new(Store::open_with(location, options).await.unwrap());
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(Catalog)).unwrap();
    let policy = ScriptedPolicy::new(script)
        .with_delay(turn_delay)
        .with_adapter_version(Some(SCRIPTED_ADAPTER));
    let agent = Agent::new(
        Arc::new(PolicySlot::new(Arc::new(policy))),
        Arc::new(tools),
        AgentConfig::default(),
    )
    .unwrap()
    .with_sink(store.clone());
    (AppState::new(Arc::new(agent), store.clone()), store)
}

/// A config serving the embedded model with a catalog tool over a 200-product retail data set
/// generated in `dir`, and a store there; with the data set, for its questions. Panics with a
/// clear message when the model is not cached.
pub fn retail_config(dir: &Path) -> (AppConfig, RetailDataset) {
    let model_present = std::env::var_os("SEARCHLOOP_MODEL").is_some()
        || searchloop_runtime::default_model::cached_path().is_ok_and(|p| p.is_file());
    assert!(
        model_present,
        "the default model is not cached: run `searchloop model fetch` (or set SEARCHLOOP_MODEL)"
    );
    let dataset = retail::generate(&GeneratorConfig {
        products: 200,
        ..GeneratorConfig::default()
    });
    let files = dataset.write_to(&dir.join("data")).unwrap();
    let config = AppConfig {
        tools: vec![ToolSection::Catalog(CatalogSection {
            name: "catalog".into(),
            index: dir.join("index"),
            products: vec![files.catalog_jsonl],
            default_limit: 3,
            blocking_pool: false,
        })],
        store: StoreSection {
            url: dir.join("store.db").to_string_lossy().into_owned(),
            ..StoreSection::default()
        },
        ..AppConfig::default()
    };
    (config, dataset)
}
