//! Host-defined tools: the [`SearchTool`] foreign trait a Python, Kotlin or Swift host
//! implements (its own product API, say), and [`HostTool`], which adapts one to the core
//! [`Tool`] contract so it joins the same registry, limits and conformance rules as the Rust
//! tools.

use std::sync::Arc;

use searchloop_core::{Tool, ToolError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{HostToolError, Result, SearchloopError};

/// A search tool implemented by the host.
///
/// The model calls it with one query string: `<search>query</search>` when it is the default
/// tool, or `<tool name="NAME">{"query": "…"}</tool>`. `call` may block (it runs on a thread
/// of its own, so it never stalls the agent); whatever it raises becomes an `error: …`
/// observation the model reads, and the episode goes on. A call that outlives the agent's
/// tool timeout is abandoned (its result is dropped when it arrives).
#[uniffi::export(with_foreign)]
pub trait SearchTool: Send + Sync {
    /// The name the model calls the tool by: 1-64 characters of `a-z`, `0-9`, `_` or `-`,
    /// unique among the agent's tools. Read once, when the agent starts; an error refuses the
    /// tool (and the agent).
    fn name(&self) -> Result<String, HostToolError>;

    /// One or two sentences telling the model what the tool finds. Read once, when the agent
    /// starts, like the name.
    fn description(&self) -> Result<String, HostToolError>;

    /// Runs a search and returns the text the model will read (cut to the agent's
    /// `max_observation_chars`).
    fn call(&self, query: String) -> Result<String, HostToolError>;
}

/// A host tool as the registry sees it. The name and description are read once, so a host
/// cannot rename a tool under a running agent, and listing tools never calls into the host.
pub(crate) struct HostTool {
    name: String,
    description: String,
    host: Arc<dyn SearchTool>,
}

impl HostTool {
    /// Wraps `host`, reading its name and description.
    pub(crate) fn new(host: Arc<dyn SearchTool>) -> Result<Self> {
        let refused = |what: &str, e: HostToolError| {
            SearchloopError::Tool(format!("cannot read a host tool's {what}: {e}"))
        };
        let name = host.name().map_err(|e| refused("name", e))?;
        let description = host
            .description()
            .map_err(|e| refused(&format!("'{name}' description"), e))?;
        if description.trim().is_empty() {
            return Err(SearchloopError::Tool(format!(
                "host tool '{name}' has an empty description; the model needs one to know what it finds"
            )));
        }
        Ok(Self {
            name,
            description,
            host,
        })
    }
}

/// The arguments of every host tool.
#[derive(Debug, Deserialize)]
pub(crate) struct QueryArgs {
    /// The search text.
    query: String,
}

impl Tool for HostTool {
    type Args = QueryArgs;

    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to search for."}},
            "required": ["query"]
        })
    }

    async fn call(&self, args: QueryArgs) -> Result<String, ToolError> {
        let host = Arc::clone(&self.host);
        // Host code may block (a synchronous HTTP client, a database driver), so it runs on
        // the blocking pool; the registry's timeout then abandons it without stalling a
        // runtime worker.
        match tokio::task::spawn_blocking(move || host.call(args.query)).await {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(error)) => Err(ToolError::Failed(error.to_string())),
            Err(join) => Err(ToolError::Failed(format!(
                "the host tool '{}' crashed: {join}",
                self.name
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use searchloop_core::{
        DynTool, ToolLimits, ToolRegistry,
        conformance::{ConformanceConfig, check_tool},
    };

    use super::*;

    /// A host tool written the way a careless host writes one: it fails on some inputs,
    /// raises on others, and blows up on a few.
    struct Careless {
        reads: AtomicUsize,
    }

    impl SearchTool for Careless {
        fn name(&self) -> Result<String, HostToolError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Ok("careless".into())
        }

        fn description(&self) -> Result<String, HostToolError> {
            Ok("Finds products, usually.".into())
        }

        fn call(&self, query: String) -> Result<String, HostToolError> {
            if query.contains("DROP") {
                panic!("the host crashed on {query}");
            }
            if query.trim().is_empty() {
                return Err(HostToolError::Failed {
                    message: "an empty query".into(),
                });
            }
            Ok(format!("[BAG-00001] {} results", query.len()))
        }
    }

    fn careless() -> Arc<dyn DynTool> {
        let host = Arc::new(Careless {
            reads: AtomicUsize::new(0),
        });
        Arc::new(HostTool::new(host).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_tool_passes_the_conformance_suite() {
        let config = ConformanceConfig::new(json!({"query": "nova tote"}));
        let report = check_tool(careless(), &config).await.unwrap();
        assert_eq!(report.observations + report.errors, config.cases);
        assert!(report.errors > 100, "{report:?}");
        assert!(report.observations > 100, "{report:?}");
    }

    #[tokio::test]
    async fn failures_and_crashes_become_observations() {
        let mut registry = ToolRegistry::new().with_limits(ToolLimits::default());
        registry.register(careless()).unwrap();
        let cases = [
            (json!({"query": "   "}), "error: an empty query"),
            (
                json!({"query": "DROP TABLE"}),
                "error: the host tool 'careless' crashed",
            ),
            (json!({"q": "x"}), "error: invalid arguments"),
        ];
        for (args, expected) in cases {
            let outcome = registry.invoke("careless", args.clone()).await;
            assert!(outcome.error.is_some(), "{args}");
            assert!(
                outcome.observation.starts_with(expected),
                "{args}: {}",
                outcome.observation
            );
        }
        let ok = registry.invoke("careless", json!({"query": "tote"})).await;
        assert_eq!(ok.observation, "[BAG-00001] 4 results");
    }

    #[test]
    fn the_name_is_read_once_and_a_description_is_required() {
        let host = Arc::new(Careless {
            reads: AtomicUsize::new(0),
        });
        let tool = HostTool::new(host.clone()).unwrap();
        for _ in 0..3 {
            assert_eq!(Tool::name(&tool), "careless");
        }
        assert_eq!(host.reads.load(Ordering::Relaxed), 1);

        struct Mute;
        impl SearchTool for Mute {
            fn name(&self) -> Result<String, HostToolError> {
                Ok("mute".into())
            }
            fn description(&self) -> Result<String, HostToolError> {
                Ok(" ".into())
            }
            fn call(&self, _query: String) -> Result<String, HostToolError> {
                Ok("x".into())
            }
        }
        let err = HostTool::new(Arc::new(Mute)).err().unwrap();
        assert!(
            matches!(&err, SearchloopError::Tool(m) if m.contains("'mute'") && m.contains("empty description")),
            "{err:?}"
        );
    }
}
