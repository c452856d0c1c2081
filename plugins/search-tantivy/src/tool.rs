//! The catalog as a searchloop [`Tool`]: `<search>query</search>` becomes `{"query": ...}`.
//!
//! A search is short, CPU-bound work (term lookups, postings, a few stored records: about
//! 0.07 ms on a 100,000-product catalog), so by default it runs inline on the async worker that
//! awaits it. Handing it to tokio's blocking pool instead costs two thread wake-ups per call,
//! which measured as much CPU as the search itself and doubled p99 under 16 callers
//! (BENCHMARKS.md). Hosts whose index sits on a slow or cold disk, where a search can wait on
//! page faults, set [`CatalogToolConfig::blocking_pool`] to keep the executor free.
//!
//! At most [`CatalogToolConfig::max_parallel_searches`] searches run at once (by default one per
//! core); further callers wait their turn in order without holding a thread. Queueing short
//! searches beats running more of them than there are cores, which only lets the OS pause a
//! search half-way for a whole time slice. On the blocking pool, a call abandoned by its caller
//! (a timeout) still finishes there and its result is dropped; the index is only read.

use std::num::NonZeroUsize;
use std::sync::Arc;

use searchloop_core::{Tool, ToolError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::error::{CatalogError, Result};
use crate::index::CatalogIndex;
use crate::query::CatalogQuery;
use crate::snippet::render_observation;

/// Most results one call may ask for.
pub const MAX_LIMIT: u64 = 10;

/// How the tool presents itself and sizes its observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogToolConfig {
    /// The tool's name (default `"catalog"`).
    pub name: String,
    /// Results returned when the call gives no `limit` (default 3).
    pub default_limit: usize,
    /// Most characters of one result line (default 200).
    pub hit_chars: usize,
    /// Most characters of all result lines together (default 1,200); with many results each
    /// line gets a smaller share.
    pub max_chars: usize,
    /// Most searches running at once (default: the number of cores; at least 1).
    pub max_parallel_searches: usize,
    /// Run each search on tokio's blocking pool rather than inline (default `false`).
    pub blocking_pool: bool,
}

impl Default for CatalogToolConfig {
    fn default() -> Self {
        Self {
            name: "catalog".into(),
            default_limit: 3,
            hit_chars: 200,
            max_chars: 1_200,
            max_parallel_searches: std::thread::available_parallelism()
                .map_or(1, NonZeroUsize::get),
            blocking_pool: false,
        }
    }
}

/// Arguments of a catalog search.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SearchArgs {
    /// Product words or a product name, with optional filters.
    pub query: String,
    /// How many results, clamped to 1..=10. A model may write it as a number or as numeric
    /// text (`3`, `3.0`, `"3"`); anything else is refused.
    #[serde(default, deserialize_with = "lenient_limit")]
    pub limit: Option<u64>,
}

/// Reads a limit written as an integer, a float or numeric text; negative values read as 0
/// (and are then clamped to 1).
fn lenient_limit<'de, D>(deserializer: D) -> std::result::Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = Value::deserialize(deserializer)?;
    let number = match &value {
        Value::Null => return Ok(None),
        Value::Number(n) => n.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    };
    match number {
        // The float-to-integer cast saturates, so huge values become u64::MAX, then the clamp.
        Some(n) if n.is_finite() => Ok(Some(n.max(0.0).round() as u64)),
        _ => Err(serde::de::Error::custom(format!(
            "limit must be a number from 1 to {MAX_LIMIT}, not {}",
            searchloop_core::tool::truncate_chars(&value.to_string(), 40)
        ))),
    }
}

/// Full-text search over a [`CatalogIndex`], as a tool the agent calls.
#[derive(Debug, Clone)]
pub struct CatalogSearchTool {
    index: Arc<CatalogIndex>,
    config: CatalogToolConfig,
    /// One permit per search allowed to run; shared by clones.
    permits: Arc<Semaphore>,
}

impl CatalogSearchTool {
    /// The tool over `index` with the default configuration.
    pub fn new(index: Arc<CatalogIndex>) -> Self {
        Self::with_config(index, CatalogToolConfig::default())
    }

    /// The tool over `index` with `config`.
    pub fn with_config(index: Arc<CatalogIndex>, config: CatalogToolConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_parallel_searches.max(1)));
        Self {
            index,
            config,
            permits,
        }
    }

    /// The index searched.
    pub fn index(&self) -> &Arc<CatalogIndex> {
        &self.index
    }

    /// Runs a search and renders its observation; blocking.
    pub fn observe(&self, args: &SearchArgs) -> Result<String> {
        let query = CatalogQuery::parse(&args.query)?;
        let limit = args
            .limit
            .map_or(self.config.default_limit as u64, |l| l.clamp(1, MAX_LIMIT));
        let hits = self.index.search(&query, limit as usize)?;
        let categories = if hits.is_empty() {
            self.index.categories()?
        } else {
            Vec::new()
        };
        Ok(render_observation(
            &hits,
            &query,
            self.config.hit_chars,
            self.config.max_chars,
            &categories,
        ))
    }
}

impl Tool for CatalogSearchTool {
    type Args = SearchArgs;

    fn name(&self) -> &str {
        &self.config.name
    }

    fn description(&self) -> &str {
        "Searches the product catalog by product name or words. Filters: category:bags \
         color:black brand:Name material:leather price<200 price>50 stock>0 in_stock:yes."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": "Product name or words, optionally with filters, e.g. \"aurora tote\" or \"black bag price<200\"."
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIMIT,
                    "description": "How many products to return (default 3)."
                }
            },
            "required": ["query"]
        })
    }

    async fn call(&self, args: SearchArgs) -> Result<String, ToolError> {
        // On the blocking pool the permit moves into the search, so an abandoned call keeps it
        // until the search it started is done.
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|e| CatalogError::Task(e.to_string()))?;
        if !self.config.blocking_pool {
            // Nothing below awaits, so a cancelled call never leaves a search half-done.
            return self.observe(&args).map_err(ToolError::from);
        }
        let tool = self.clone();
        tokio::task::spawn_blocking(move || {
            let observation = tool.observe(&args);
            drop(permit);
            observation
        })
        .await
        .map_err(|e| CatalogError::Task(e.to_string()))?
        .map_err(ToolError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(value: Value) -> std::result::Result<Option<u64>, String> {
        serde_json::from_value::<SearchArgs>(json!({"query": "tote", "limit": value}))
            .map(|args| args.limit)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn limits_are_read_leniently_and_refused_clearly() {
        assert_eq!(limit(json!(4)), Ok(Some(4)));
        assert_eq!(limit(json!(3.0)), Ok(Some(3)));
        assert_eq!(limit(json!(" 5 ")), Ok(Some(5)));
        assert_eq!(limit(json!(-2)), Ok(Some(0)));
        assert_eq!(limit(json!(1e300)), Ok(Some(u64::MAX)));
        assert_eq!(limit(Value::Null), Ok(None));
        let args: SearchArgs = serde_json::from_value(json!({"query": "tote"})).unwrap();
        assert_eq!(args.limit, None);
        for bad in [json!("many"), json!([1]), json!({"n": 1}), json!(true)] {
            let err = limit(bad.clone()).unwrap_err();
            assert!(
                err.contains("limit must be a number from 1 to 10"),
                "{bad}: {err}"
            );
        }
    }
}
