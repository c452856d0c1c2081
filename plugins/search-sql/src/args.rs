//! The model's arguments checked against a declared query's parameters and turned into typed
//! values to bind. Nothing the model writes reaches the SQL text.

use searchloop_core::tool::truncate_chars;
use serde_json::{Map, Value};

use crate::config::{CompiledQuery, DEFAULT_MAX_LENGTH, ParamConfig, ParamType};

/// A value bound to one placeholder; `None` binds a NULL of the parameter's type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Bound {
    /// Text.
    Text(Option<String>),
    /// A 64-bit integer.
    Integer(Option<i64>),
    /// A double.
    Number(Option<f64>),
    /// A boolean.
    Boolean(Option<bool>),
}

impl Bound {
    /// A NULL of `param_type`.
    fn null(param_type: ParamType) -> Self {
        match param_type {
            ParamType::String => Self::Text(None),
            ParamType::Integer => Self::Integer(None),
            ParamType::Number => Self::Number(None),
            ParamType::Boolean => Self::Boolean(None),
        }
    }
}

/// A short rendering of a value the model wrote, for messages.
fn preview(value: &Value) -> String {
    truncate_chars(&value.to_string(), 40)
}

/// The values to bind for `query`, in declaration order, from the model's arguments (the
/// `query` key names the query and is skipped). The error names the query and the parameter.
pub(crate) fn bind(query: &CompiledQuery, args: &Map<String, Value>) -> Result<Vec<Bound>, String> {
    let name = &query.name;
    let expected = || {
        let names: Vec<&str> = query.params.iter().map(|p| p.name.as_str()).collect();
        if names.is_empty() {
            "it takes no arguments".to_string()
        } else {
            format!("it takes: {}", names.join(", "))
        }
    };
    if let Some(unknown) = args
        .keys()
        .find(|key| *key != "query" && !query.params.iter().any(|p| p.name == **key))
    {
        return Err(format!(
            "{name}: unexpected argument '{}'; {}",
            truncate_chars(unknown, 40),
            expected()
        ));
    }
    query
        .params
        .iter()
        .map(|param| match args.get(&param.name) {
            None | Some(Value::Null) if param.required => Err(format!(
                "{name}: missing argument '{}' ({}); {}",
                param.name,
                param.param_type.as_str(),
                expected()
            )),
            None | Some(Value::Null) => Ok(Bound::null(param.param_type)),
            Some(value) => check(param, value).map_err(|e| format!("{name}: {e}")),
        })
        .collect()
}

/// Checks one argument against its declaration.
fn check(param: &ParamConfig, value: &Value) -> Result<Bound, String> {
    let name = &param.name;
    let wrong_type = || {
        format!(
            "'{name}' must be {} {}, not {}",
            if param.param_type == ParamType::Integer {
                "an"
            } else {
                "a"
            },
            param.param_type.as_str(),
            preview(value)
        )
    };
    match param.param_type {
        ParamType::String => {
            let text = value.as_str().ok_or_else(wrong_type)?;
            check_text(param, text).map(|text| Bound::Text(Some(text)))
        }
        ParamType::Integer => {
            let number = value.as_i64().ok_or_else(wrong_type)?;
            check_range(param, number as f64, value)?;
            Ok(Bound::Integer(Some(number)))
        }
        ParamType::Number => {
            let number = value.as_f64().ok_or_else(wrong_type)?;
            check_range(param, number, value)?;
            Ok(Bound::Number(Some(number)))
        }
        ParamType::Boolean => value
            .as_bool()
            .map(|b| Bound::Boolean(Some(b)))
            .ok_or_else(wrong_type),
    }
}

/// Checks a string argument's length, characters and allowed values; returns the text to bind,
/// trimmed (small models pad values with spaces).
fn check_text(param: &ParamConfig, text: &str) -> Result<String, String> {
    let name = &param.name;
    let max_length = param.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
    let length = text.chars().count();
    if length > max_length {
        return Err(format!(
            "'{name}' is {length} characters long; the limit is {max_length}"
        ));
    }
    // PostgreSQL text cannot hold NUL, and no inventory value contains control characters.
    if text.chars().any(char::is_control) {
        return Err(format!("'{name}' contains control characters"));
    }
    match &param.allowed {
        None => Ok(text.trim().to_string()),
        Some(allowed) => allowed
            .iter()
            .find(|candidate| candidate.to_lowercase() == text.trim().to_lowercase())
            .cloned()
            .ok_or_else(|| {
                format!(
                    "'{name}' must be one of: {} (got {})",
                    allowed.join(", "),
                    preview(&Value::from(text))
                )
            }),
    }
}

/// Checks a numeric argument against min/max.
fn check_range(param: &ParamConfig, number: f64, value: &Value) -> Result<(), String> {
    let name = &param.name;
    if let Some(min) = param.min
        && number < min
    {
        return Err(format!(
            "'{name}' must be at least {min}, not {}",
            preview(value)
        ));
    }
    if let Some(max) = param.max
        && number > max
    {
        return Err(format!(
            "'{name}' must be at most {max}, not {}",
            preview(value)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{InventoryConfig, compile};

    fn query() -> CompiledQuery {
        let config = InventoryConfig::from_toml_str(
            r#"
            description = "d"
            database = "sqlite://x.db"
            [[queries]]
            name = "find"
            description = "d"
            sql = "SELECT :category, :max_price, :limit, :in_stock"
            params = [
              { name = "category", type = "string", enum = ["bags", "shoes"] },
              { name = "max_price", type = "number", required = false, min = 0 },
              { name = "limit", type = "integer", required = false, min = 1, max = 50 },
              { name = "in_stock", type = "boolean", required = false },
            ]
            "#,
        )
        .unwrap();
        compile(&config).unwrap().remove(0)
    }

    fn args(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn good_arguments_bind_in_declaration_order() {
        let bound = bind(
            &query(),
            &args(json!({"query": "find", "in_stock": true, "category": " Bags", "limit": 3})),
        )
        .unwrap();
        assert_eq!(
            bound,
            [
                Bound::Text(Some("bags".into())),
                Bound::Number(None),
                Bound::Integer(Some(3)),
                Bound::Boolean(Some(true)),
            ]
        );
    }

    #[test]
    fn bad_arguments_get_one_clear_error() {
        let cases = [
            (json!({}), "missing argument 'category' (string)"),
            (json!({"category": null}), "missing argument 'category'"),
            (json!({"category": 3}), "'category' must be a string, not 3"),
            (json!({"category": "hats"}), "must be one of: bags, shoes"),
            (
                json!({"category": "bags", "limit": 2.5}),
                "'limit' must be an integer",
            ),
            (
                json!({"category": "bags", "limit": "2"}),
                "'limit' must be an integer",
            ),
            (json!({"category": "bags", "limit": 51}), "at most 50"),
            (json!({"category": "bags", "max_price": -1}), "at least 0"),
            (
                json!({"category": "bags", "in_stock": "yes"}),
                "must be a boolean",
            ),
            (
                json!({"category": "bags", "sql": "DROP TABLE x"}),
                "unexpected argument 'sql'",
            ),
            (json!({"category": "bags\u{0}"}), "control characters"),
        ];
        for (value, expected) in cases {
            let err = bind(&query(), &args(value.clone())).unwrap_err();
            assert!(err.starts_with("find: "), "{err}");
            assert!(
                err.contains(expected),
                "{value}: expected '{expected}' in: {err}"
            );
        }
    }
}
