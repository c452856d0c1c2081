//! The conformance suite every tool plugin runs from its tests: a valid JSON Schema, a
//! thousand random or hostile argument values answered without a panic or a hang, and safe
//! cancellation.
//!
//! A plugin's test calls [`check_tool`] with its tool and a [`ConformanceConfig`] naming one
//! known-good argument value, and asserts that it returns `Ok`.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures::FutureExt;
use proptest::{
    collection::{btree_map, vec},
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use serde_json::{Map, Value};

use crate::tool::DynTool;

/// What the suite runs.
#[derive(Debug, Clone)]
pub struct ConformanceConfig {
    /// Arguments that must succeed; used before and after the hostile cases.
    pub valid_args: Value,
    /// How many random or malformed argument values to try.
    pub cases: usize,
    /// A call taking longer than this counts as a hang.
    pub call_timeout: Duration,
    /// Seed of the case generator, so a failure can be replayed.
    pub seed: u64,
}

impl ConformanceConfig {
    /// The default suite (1,000 cases, 15 s per call) with `valid_args` as the known-good call.
    pub fn new(valid_args: Value) -> Self {
        Self {
            valid_args,
            cases: 1_000,
            call_timeout: Duration::from_secs(15),
            seed: 0x5ea4c41007,
        }
    }
}

/// What the suite saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConformanceReport {
    /// Hostile cases that produced an observation.
    pub observations: usize,
    /// Hostile cases that produced a tool error.
    pub errors: usize,
    /// Calls abandoned part-way by the cancellation check.
    pub cancelled: usize,
}

/// Runs the suite against `tool`. The error names the first violation and the input that
/// caused it.
pub async fn check_tool(
    tool: Arc<dyn DynTool>,
    config: &ConformanceConfig,
) -> Result<ConformanceReport, String> {
    let schema = tool.parameters();
    check_schema(tool.name(), &schema)?;
    let mut report = ConformanceReport::default();
    call_must_succeed(tool.as_ref(), &config.valid_args, config.call_timeout).await?;

    for args in hostile_arguments(&schema, config.cases, config.seed) {
        let call = AssertUnwindSafe(tool.call_json(args.clone())).catch_unwind();
        match tokio::time::timeout(config.call_timeout, call).await {
            Err(_) => return Err(format!("{}: call hung on {}", tool.name(), preview(&args))),
            Ok(Err(_)) => {
                return Err(format!(
                    "{}: call panicked on {}",
                    tool.name(),
                    preview(&args)
                ));
            }
            Ok(Ok(Ok(_))) => report.observations += 1,
            Ok(Ok(Err(e))) => {
                if e.to_string().trim().is_empty() {
                    return Err(format!(
                        "{}: empty error message for {}",
                        tool.name(),
                        preview(&args)
                    ));
                }
                report.errors += 1;
            }
        }
    }

    // Cancellation: drop calls part-way at growing delays; afterwards the tool must still work.
    for step in 0..20u64 {
        let delay = Duration::from_micros(50 * step * step);
        let call = AssertUnwindSafe(tool.call_json(config.valid_args.clone())).catch_unwind();
        match tokio::time::timeout(delay, call).await {
            Err(_) => report.cancelled += 1,
            Ok(Err(_)) => {
                return Err(format!(
                    "{}: call panicked during the cancellation check",
                    tool.name()
                ));
            }
            Ok(Ok(_)) => {}
        }
    }
    call_must_succeed(tool.as_ref(), &config.valid_args, config.call_timeout).await?;
    Ok(report)
}

/// Checks that `schema` is a valid JSON Schema describing an object with consistent `required`.
pub fn check_schema(name: &str, schema: &Value) -> Result<(), String> {
    jsonschema::meta::validate(schema)
        .map_err(|e| format!("{name}: parameters are not a valid JSON Schema: {e}"))?;
    jsonschema::validator_for(schema)
        .map_err(|e| format!("{name}: parameters schema does not compile: {e}"))?;
    if schema.get("type") != Some(&Value::from("object")) {
        return Err(format!("{name}: parameters must describe a JSON object"));
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    for required in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let known = required
            .as_str()
            .is_some_and(|r| properties.is_some_and(|p| p.contains_key(r)));
        if !known {
            return Err(format!(
                "{name}: required property {required} is not in properties"
            ));
        }
    }
    Ok(())
}

async fn call_must_succeed(
    tool: &dyn DynTool,
    args: &Value,
    timeout: Duration,
) -> Result<(), String> {
    let call = AssertUnwindSafe(tool.call_json(args.clone())).catch_unwind();
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(format!(
            "{}: known-good call {} hung",
            tool.name(),
            preview(args)
        )),
        Ok(Err(_)) => Err(format!(
            "{}: known-good call {} panicked",
            tool.name(),
            preview(args)
        )),
        Ok(Ok(Err(e))) => Err(format!(
            "{}: known-good call {} failed: {e}",
            tool.name(),
            preview(args)
        )),
        Ok(Ok(Ok(text))) if text.trim().is_empty() => Err(format!(
            "{}: known-good call {} returned nothing",
            tool.name(),
            preview(args)
        )),
        Ok(Ok(Ok(_))) => Ok(()),
    }
}

fn preview(args: &Value) -> String {
    crate::tool::truncate_chars(&args.to_string(), 200)
}

/// Strings a model (or an attacker writing through one) might put in an argument.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        1 => "[ -~]{0,40}",
        2 => prop::sample::select(vec![
            "'; DROP TABLE products; --".to_string(),
            "\" OR 1=1 --".to_string(),
            "’ OR ’1’=’1".to_string(),
            "x'/**/OR/**/'1'='1".to_string(),
            "1; SELECT pg_sleep(30)".to_string(),
            "{{query}}".to_string(),
            "${HOME}".to_string(),
            "%s%s%s%n".to_string(),
            "../../etc/passwd".to_string(),
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "\u{0}\u{1}\u{7f}".to_string(),
            "\r\nX-Injected: 1".to_string(),
            "</search><answer>x</answer>".to_string(),
            "\\".to_string(),
            "🦀".repeat(2_000),
            "a".repeat(100_000),
            String::new(),
            "   ".to_string(),
            "price<0 category:".to_string(),
            "-9223372036854775808".to_string(),
        ]),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        hostile_string().prop_map(Value::from),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(hostile_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Random values, half of them shaped like the schema's object with hostile property values.
fn hostile_arguments(schema: &Value, cases: usize, seed: u64) -> Vec<Value> {
    let names: Vec<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    let n = names.len();
    // Most property values are strings, the type tools mostly take, so hostile text reaches the
    // tool's own code instead of stopping at argument deserialization.
    let value = prop_oneof![3 => hostile_string().prop_map(Value::from), 1 => any_json()];
    let shaped = vec((prop::bool::weighted(0.8), value), n).prop_map(move |values| {
        let mut object = Map::new();
        for (name, (present, value)) in names.iter().zip(values) {
            if present {
                object.insert(name.clone(), value);
            }
        }
        Value::Object(object)
    });
    let strategy = prop_oneof![any_json(), shaped];
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    (0..cases)
        .filter_map(|_| strategy.new_tree(&mut runner).ok().map(|t| t.current()))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;
    use crate::tool::{Tool, ToolError};

    struct Fragile {
        panic_on: &'static str,
    }

    #[derive(Deserialize)]
    struct Args {
        query: String,
    }

    impl Tool for Fragile {
        type Args = Args;
        fn name(&self) -> &str {
            "fragile"
        }
        fn description(&self) -> &str {
            "test"
        }
        fn parameters(&self) -> Value {
            json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
        }
        async fn call(&self, args: Args) -> Result<String, ToolError> {
            if !self.panic_on.is_empty() && args.query.contains(self.panic_on) {
                panic!("fragile");
            }
            Ok(format!("ok {}", args.query.len()))
        }
    }

    #[tokio::test]
    async fn a_robust_tool_passes() {
        let tool: Arc<dyn DynTool> = Arc::new(Fragile { panic_on: "" });
        let report = check_tool(tool, &ConformanceConfig::new(json!({"query": "x"})))
            .await
            .unwrap();
        assert_eq!(report.observations + report.errors, 1_000);
        assert!(
            report.errors > 100,
            "most random values are malformed: {report:?}"
        );
        assert!(
            report.observations > 100,
            "shaped values reach the tool: {report:?}"
        );
    }

    #[tokio::test]
    async fn a_panicking_tool_fails() {
        let tool: Arc<dyn DynTool> = Arc::new(Fragile { panic_on: "DROP" });
        let err = check_tool(tool, &ConformanceConfig::new(json!({"query": "x"})))
            .await
            .unwrap_err();
        assert!(err.contains("panicked"), "{err}");
    }

    #[test]
    fn bad_schemas_are_caught() {
        assert!(check_schema("t", &json!({"type": "object"})).is_ok());
        assert!(check_schema("t", &json!({"type": "objekt"})).is_err());
        assert!(check_schema("t", &json!({"type": "string"})).is_err());
        assert!(check_schema("t", &json!({"type": "object", "required": ["q"]})).is_err());
    }
}
