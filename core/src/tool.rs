//! Search tools: a typed trait for tool authors, its dyn-compatible erased form, and the
//! registry the agent calls tools through.
//!
//! Tool authors implement [`Tool`] with a typed `Args`; the registry stores every tool as
//! `Arc<dyn DynTool>`, which takes and validates raw JSON. Hosts that cannot name Rust types
//! (the FFI bindings) implement [`DynTool`] directly.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::FutureExt;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use thiserror::Error;

use crate::error::{Error, Result};

/// Why a tool call produced no result. Every variant becomes an observation for the model; none
/// ends an episode.
#[derive(Debug, Clone, Error, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ToolError {
    /// The arguments do not fit the tool's schema.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// No tool has that name.
    #[error("unknown tool '{0}'")]
    UnknownTool(String),
    /// The call did not finish in time.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// The tool ran and failed (backend down, query refused, ...).
    #[error("{0}")]
    Failed(String),
}

/// A tool with typed arguments.
///
/// Two things are required beyond the metadata: the argument type and [`Tool::call`]. The
/// argument type is deserialized from the model's JSON, so a malformed call is rejected before
/// `call` runs.
pub trait Tool: Send + Sync + 'static {
    /// The arguments, deserialized from the JSON the model wrote.
    type Args: DeserializeOwned + Send;

    /// The name the model calls the tool by (`[a-z0-9_-]+`).
    fn name(&self) -> &str;

    /// One or two sentences telling the model what the tool finds.
    fn description(&self) -> &str;

    /// JSON Schema of `Args`.
    fn parameters(&self) -> Value;

    /// Runs the tool and returns the observation text shown to the model.
    fn call(&self, args: Self::Args) -> impl Future<Output = Result<String, ToolError>> + Send;
}

/// The dyn-compatible form of a tool, as the registry stores it.
#[async_trait]
pub trait DynTool: Send + Sync {
    /// See [`Tool::name`].
    fn name(&self) -> &str;
    /// See [`Tool::description`].
    fn description(&self) -> &str;
    /// See [`Tool::parameters`].
    fn parameters(&self) -> Value;
    /// Runs the tool on raw JSON arguments.
    async fn call_json(&self, args: Value) -> Result<String, ToolError>;
}

#[async_trait]
impl<T: Tool> DynTool for T {
    fn name(&self) -> &str {
        Tool::name(self)
    }

    fn description(&self) -> &str {
        Tool::description(self)
    }

    fn parameters(&self) -> Value {
        Tool::parameters(self)
    }

    async fn call_json(&self, args: Value) -> Result<String, ToolError> {
        let args: T::Args =
            serde_json::from_value(args).map_err(|e| ToolError::InvalidArguments(e.to_string()))?;
        self.call(args).await
    }
}

/// What one tool call produced, as recorded in a trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolOutcome {
    /// The observation text shown to the model (an error message when the call failed).
    pub observation: String,
    /// The error, when the call failed.
    pub error: Option<ToolError>,
    /// Wall time of the call.
    pub latency_ms: f64,
}

/// Limits the registry applies to every call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolLimits {
    /// A call that runs longer is abandoned and reported as a timeout.
    pub timeout_ms: u64,
    /// Observations are cut to this many characters, so one result cannot fill a small
    /// model's context.
    pub max_observation_chars: usize,
}

impl Default for ToolLimits {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            max_observation_chars: 1_500,
        }
    }
}

/// The tools an agent may call, by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: Vec<Arc<dyn DynTool>>,
    default_tool: Option<String>,
    limits: ToolLimits,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry")
            .field("tools", &self.names())
            .field("default_tool", &self.default_tool)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Whether `name` is a valid tool name: the model writes it inside an XML-like attribute, so
/// it is kept to a safe alphabet.
fn is_valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl ToolRegistry {
    /// An empty registry with default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the per-call limits.
    pub fn with_limits(mut self, limits: ToolLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The per-call limits.
    pub fn limits(&self) -> &ToolLimits {
        &self.limits
    }

    /// Adds a tool. The first tool added becomes the default (the one `<search>` calls) unless
    /// [`ToolRegistry::set_default`] says otherwise.
    pub fn register(&mut self, tool: Arc<dyn DynTool>) -> Result<()> {
        let name = tool.name().to_string();
        if !is_valid_tool_name(&name) {
            return Err(Error::Config(format!(
                "tool name '{name}' must be 1-64 characters of a-z, 0-9, '_' or '-'"
            )));
        }
        if self.get(&name).is_some() {
            return Err(Error::Config(format!(
                "a tool named '{name}' is already registered"
            )));
        }
        if self.default_tool.is_none() {
            self.default_tool = Some(name);
        }
        self.tools.push(tool);
        Ok(())
    }

    /// Makes `name` the tool that `<search>query</search>` calls, with `{"query": query}`.
    pub fn set_default(&mut self, name: &str) -> Result<()> {
        if self.get(name).is_none() {
            return Err(Error::Config(format!(
                "default tool '{name}' is not registered (registered: {})",
                self.names().join(", ")
            )));
        }
        self.default_tool = Some(name.to_string());
        Ok(())
    }

    /// The name `<search>` calls, if any tool is registered.
    pub fn default_tool(&self) -> Option<&str> {
        self.default_tool.as_deref()
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn DynTool>> {
        self.tools.iter().find(|t| t.name() == name)
    }

    /// Names of all tools, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.tools.iter().map(|t| t.name().to_string()).collect()
    }

    /// Whether no tool is registered.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// A description of every tool for the system prompt: name, purpose, and a compact
    /// signature of its arguments (see [`signature`]). Full JSON Schemas would cost a small
    /// model hundreds of prompt tokens per tool, and prompt processing dominates an episode's
    /// time on a CPU.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for tool in &self.tools {
            let default = if self.default_tool.as_deref() == Some(tool.name()) {
                " Call it with <search>query</search>."
            } else {
                ""
            };
            out.push_str(&format!(
                "- {}: {}{} Arguments: {}\n",
                tool.name(),
                tool.description().trim(),
                default,
                signature(&tool.parameters())
            ));
        }
        out
    }

    /// Calls `name` with `args`. Never fails and never panics: an unknown tool, invalid
    /// arguments, a tool error, a timeout or even a panic inside the tool all become an
    /// observation the model can read.
    pub async fn invoke(&self, name: &str, args: Value) -> ToolOutcome {
        let started = Instant::now();
        let result = match self.get(name) {
            None => Err(ToolError::UnknownTool(name.to_string())),
            Some(tool) => {
                let call = AssertUnwindSafe(tool.call_json(args)).catch_unwind();
                match tokio::time::timeout(Duration::from_millis(self.limits.timeout_ms), call)
                    .await
                {
                    Err(_) => Err(ToolError::Timeout(self.limits.timeout_ms)),
                    Ok(Err(panic)) => Err(ToolError::Failed(format!(
                        "the tool crashed: {}",
                        panic_message(&panic)
                    ))),
                    Ok(Ok(result)) => result,
                }
            }
        };
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(text) => ToolOutcome {
                observation: truncate_chars(&text, self.limits.max_observation_chars),
                error: None,
                latency_ms,
            },
            Err(error) => {
                tracing::debug!(tool = name, %error, "tool call failed");
                ToolOutcome {
                    observation: truncate_chars(
                        &format!("error: {error}"),
                        self.limits.max_observation_chars,
                    ),
                    error: Some(error),
                    latency_ms,
                }
            }
        }
    }
}

/// A compact rendering of an argument schema: `{"query": string, "limit"?: integer}`, a constant
/// property as its value (`{"query": "stock_by_sku", "sku": string}`), and `oneOf`/`anyOf`
/// alternatives joined by ` | `.
pub fn signature(schema: &Value) -> String {
    if let Some(alternatives) = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)
    {
        return alternatives
            .iter()
            .map(signature)
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return type_name(schema);
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let fields: Vec<String> = properties
        .iter()
        .map(|(name, property)| {
            let optional = if required.contains(&name.as_str()) {
                ""
            } else {
                "?"
            };
            let value = match property.get("const") {
                Some(constant) => constant.to_string(),
                None => type_name(property),
            };
            format!("\"{name}\"{optional}: {value}")
        })
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// The JSON type a schema names (`string`, `integer`, one of several joined by `/`), or `any`.
fn type_name(schema: &Value) -> String {
    match schema.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("/"),
        _ => match schema.get("enum").and_then(Value::as_array) {
            Some(values) => values
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("/"),
            None => "any".to_string(),
        },
    }
}

/// The message of a caught panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// `text` cut to at most `max_chars` characters, on a character boundary, marked when cut.
pub fn truncate_chars(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_string(),
        Some((cut, _)) => format!("{} …", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Echo;

    #[derive(Deserialize)]
    struct EchoArgs {
        query: String,
    }

    impl Tool for Echo {
        type Args = EchoArgs;
        fn name(&self) -> &str {
            "echo"
        }
        fn description(&self) -> &str {
            "Repeats the query."
        }
        fn parameters(&self) -> Value {
            json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
        }
        async fn call(&self, args: EchoArgs) -> Result<String, ToolError> {
            match args.query.as_str() {
                "panic" => panic!("boom"),
                "fail" => Err(ToolError::Failed("backend down".into())),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok("late".into())
                }
                q => Ok(format!("echo: {q}")),
            }
        }
    }

    fn registry() -> ToolRegistry {
        registry_with_max_chars(200)
    }

    fn registry_with_max_chars(max_observation_chars: usize) -> ToolRegistry {
        let mut r = ToolRegistry::new().with_limits(ToolLimits {
            timeout_ms: 100,
            max_observation_chars,
        });
        r.register(Arc::new(Echo)).unwrap();
        r
    }

    #[tokio::test]
    async fn typed_tool_is_called_through_json() {
        let out = registry().invoke("echo", json!({"query": "hi"})).await;
        assert_eq!(out.observation, "echo: hi");
        assert!(out.error.is_none());
    }

    #[tokio::test]
    async fn every_failure_becomes_an_observation() {
        let r = registry();
        let cases = [
            ("echo", json!({"query": 3}), "invalid arguments"),
            ("echo", json!({}), "invalid arguments"),
            ("nope", json!({"query": "x"}), "unknown tool"),
            ("echo", json!({"query": "fail"}), "backend down"),
            ("echo", json!({"query": "panic"}), "crashed"),
            ("echo", json!({"query": "slow"}), "timed out"),
        ];
        for (name, args, expected) in cases {
            let out = r.invoke(name, args.clone()).await;
            assert!(out.error.is_some(), "{name} {args}");
            assert!(
                out.observation.contains(expected),
                "{name} {args}: {}",
                out.observation
            );
        }
    }

    #[tokio::test]
    async fn observations_are_truncated_on_char_boundaries() {
        let out = registry_with_max_chars(20)
            .invoke("echo", json!({"query": "ééééééééééééééééééééé"}))
            .await;
        assert!(out.observation.ends_with(" …"));
        assert_eq!(out.observation.chars().count(), 22);
    }

    #[test]
    fn signatures_are_compact() {
        // Properties are written in sorted order: serde_json keeps insertion order when another
        // crate in the build (mistral.rs) enables `preserve_order`, and sorted order otherwise.
        let schema = json!({"oneOf": [
            {"type": "object", "properties": {"query": {"const": "stock_by_sku"}, "sku": {"type": "string", "maxLength": 32}}, "required": ["query", "sku"]},
            {"type": "object", "properties": {"max_price": {"type": ["number", "null"]}, "query": {"const": "find"}}, "required": ["query"]}
        ]});
        assert_eq!(
            signature(&schema),
            r#"{"query": "stock_by_sku", "sku": string} | {"max_price"?: number/null, "query": "find"}"#
        );
        assert_eq!(signature(&json!({"type": "string"})), "string");
        assert_eq!(signature(&json!({"enum": ["a", "b"]})), r#""a"/"b""#);
        assert_eq!(signature(&json!({})), "any");
    }

    #[test]
    fn names_are_validated_and_unique() {
        let mut r = registry();
        assert!(r.register(Arc::new(Echo)).is_err());
        assert_eq!(r.default_tool(), Some("echo"));
        assert!(r.set_default("missing").is_err());
        assert!(!is_valid_tool_name("Bad Name"));
        assert!(!is_valid_tool_name(""));
        assert!(is_valid_tool_name("inventory_v2"));
        assert_eq!(
            r.describe(),
            "- echo: Repeats the query. Call it with <search>query</search>. Arguments: {\"query\": string}\n"
        );
    }
}
