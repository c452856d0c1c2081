//! The inventory tool's configuration: the database, the limits, and the named, parameterised
//! queries the host declares (serde structs, TOML or JSON, unknown fields rejected), with their
//! validation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    error::{Result, SqlError},
    placeholders::{PositionalSql, rewrite},
};

/// Longest string argument accepted when a parameter declares no `max_length`.
pub(crate) const DEFAULT_MAX_LENGTH: usize = 200;

/// A read-only SQL inventory: where it is, and the queries the model may run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryConfig {
    /// The name the model calls the tool by.
    #[serde(default = "default_name")]
    pub name: String,
    /// What the inventory holds, in one or two sentences for the model; the tool appends the
    /// list of queries.
    pub description: String,
    /// `sqlite://path/to/file.db` (the default backend; the file must exist) or
    /// `postgres://user@host/db`. A password is better left to `PGPASSWORD` than written here.
    pub database: String,
    /// Row, time and connection limits.
    #[serde(default)]
    pub limits: SqlLimits,
    /// The queries the model may run, by name.
    pub queries: Vec<QueryConfig>,
}

fn default_name() -> String {
    "inventory".into()
}

/// Limits applied to every call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqlLimits {
    /// Rows shown at most (1 to 500); the observation says when more matched.
    pub max_rows: usize,
    /// A statement running longer is stopped by the database (1 ms to 10 minutes).
    pub statement_timeout_ms: u64,
    /// Connections in the read-only pool (1 to 64).
    pub max_connections: u32,
    /// A cell's text is cut to this many characters (8 to 2,000).
    pub max_cell_chars: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        Self {
            max_rows: 20,
            statement_timeout_ms: 2_000,
            max_connections: 4,
            max_cell_chars: 120,
        }
    }
}

/// One named query. Its SQL refers to parameters as `:name`; each is bound as a typed value,
/// never pasted into the text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// The name the model picks it by (`[a-z][a-z0-9_]*`).
    pub name: String,
    /// What it answers, for the model.
    pub description: String,
    /// One SQL statement using `:param` placeholders (not `?` or `$1`).
    pub sql: String,
    /// Its parameters, in order.
    #[serde(default)]
    pub params: Vec<ParamConfig>,
}

/// A query parameter and the checks its argument must pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamConfig {
    /// The name, as the SQL (`:name`) and the model's JSON use it.
    pub name: String,
    /// The JSON type the argument must have.
    #[serde(rename = "type")]
    pub param_type: ParamType,
    /// What the argument means, for the model.
    #[serde(default)]
    pub description: Option<String>,
    /// Whether the argument must be given; an optional one left out is bound as NULL.
    #[serde(default = "required_by_default")]
    pub required: bool,
    /// Smallest accepted value (integer and number parameters).
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest accepted value (integer and number parameters).
    #[serde(default)]
    pub max: Option<f64>,
    /// Longest accepted string, in characters (string parameters; default 200).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// The accepted values (string parameters), matched case-insensitively and bound in the
    /// spelling declared here.
    #[serde(default, rename = "enum")]
    pub allowed: Option<Vec<String>>,
}

fn required_by_default() -> bool {
    true
}

/// JSON types a parameter can take, and the SQL type each is bound as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A JSON string, bound as text.
    String,
    /// A JSON whole number, bound as a 64-bit integer.
    Integer,
    /// Any JSON number, bound as a double.
    Number,
    /// A JSON boolean, bound as a boolean (1/0 in SQLite).
    Boolean,
}

impl ParamType {
    /// The type's name in the JSON Schema and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::Boolean => "boolean",
        }
    }
}

impl InventoryConfig {
    /// Parses a TOML config.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| SqlError::Config(e.to_string()))
    }

    /// Reads and parses a TOML config file; errors name the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| SqlError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| SqlError::ParseConfig {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

/// A validated query, its SQL rewritten for both databases.
#[derive(Debug, Clone)]
pub(crate) struct CompiledQuery {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) params: Vec<ParamConfig>,
    pub(crate) sql: PositionalSql,
}

/// Whether `name` is a lowercase identifier of at most 64 characters.
fn is_identifier(name: &str) -> bool {
    name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Checks the limits and every declared query; the error names the query, the parameter and
/// what is wrong.
pub(crate) fn compile(config: &InventoryConfig) -> Result<Vec<CompiledQuery>> {
    let invalid = SqlError::Config;
    if config.description.trim().is_empty() {
        return Err(invalid("description is empty".into()));
    }
    let limits = &config.limits;
    let ranges: [(&str, u64, u64, u64); 4] = [
        ("limits.max_rows", limits.max_rows as u64, 1, 500),
        (
            "limits.statement_timeout_ms",
            limits.statement_timeout_ms,
            1,
            600_000,
        ),
        (
            "limits.max_connections",
            u64::from(limits.max_connections),
            1,
            64,
        ),
        (
            "limits.max_cell_chars",
            limits.max_cell_chars as u64,
            8,
            2_000,
        ),
    ];
    for (field, value, min, max) in ranges {
        if !(min..=max).contains(&value) {
            return Err(invalid(format!(
                "{field} is {value}; it must be between {min} and {max}"
            )));
        }
    }
    if config.queries.is_empty() {
        return Err(invalid("no queries are declared".into()));
    }
    let mut compiled: Vec<CompiledQuery> = Vec::with_capacity(config.queries.len());
    for query in &config.queries {
        let name = &query.name;
        if !is_identifier(name) {
            return Err(invalid(format!(
                "query name '{name}' must be 1-64 characters of a-z, 0-9 and '_', starting \
                 with a letter"
            )));
        }
        if compiled.iter().any(|q| q.name == *name) {
            return Err(invalid(format!("query '{name}' is declared twice")));
        }
        if query.description.trim().is_empty() {
            return Err(invalid(format!("query '{name}': description is empty")));
        }
        for (i, param) in query.params.iter().enumerate() {
            check_param(param).map_err(|e| invalid(format!("query '{name}': {e}")))?;
            if query.params[..i].iter().any(|p| p.name == param.name) {
                return Err(invalid(format!(
                    "query '{name}': parameter '{}' is declared twice",
                    param.name
                )));
            }
        }
        let names: Vec<&str> = query.params.iter().map(|p| p.name.as_str()).collect();
        let sql =
            rewrite(&query.sql, &names).map_err(|e| invalid(format!("query '{name}': sql {e}")))?;
        compiled.push(CompiledQuery {
            name: name.clone(),
            description: query.description.clone(),
            params: query.params.clone(),
            sql,
        });
    }
    Ok(compiled)
}

/// Checks one parameter's declaration.
fn check_param(param: &ParamConfig) -> Result<(), String> {
    let name = &param.name;
    if !is_identifier(name) {
        return Err(format!(
            "parameter name '{name}' must be 1-64 characters of a-z, 0-9 and '_', starting \
             with a letter"
        ));
    }
    if name == "query" {
        return Err("a parameter cannot be named 'query': it names the query to run".into());
    }
    let numeric = matches!(param.param_type, ParamType::Integer | ParamType::Number);
    let textual = param.param_type == ParamType::String;
    let kind = param.param_type.as_str();
    if !numeric && (param.min.is_some() || param.max.is_some()) {
        return Err(format!(
            "parameter '{name}': min/max need an integer or number, not {kind}"
        ));
    }
    if !textual && (param.max_length.is_some() || param.allowed.is_some()) {
        return Err(format!(
            "parameter '{name}': max_length/enum need a string, not {kind}"
        ));
    }
    for (bound, value) in [("min", param.min), ("max", param.max)] {
        if let Some(value) = value
            && (!value.is_finite()
                || (param.param_type == ParamType::Integer && value.fract() != 0.0))
        {
            return Err(format!(
                "parameter '{name}': {bound} {value} is not a valid {kind}"
            ));
        }
    }
    if let (Some(min), Some(max)) = (param.min, param.max)
        && min > max
    {
        return Err(format!("parameter '{name}': min {min} is above max {max}"));
    }
    if param.max_length == Some(0) || param.max_length.is_some_and(|n| n > 10_000) {
        return Err(format!(
            "parameter '{name}': max_length must be between 1 and 10000"
        ));
    }
    if let Some(allowed) = &param.allowed {
        let longest = param.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
        if allowed.is_empty() {
            return Err(format!("parameter '{name}': enum is empty"));
        }
        if let Some(value) = allowed.iter().find(|v| v.chars().count() > longest) {
            return Err(format!(
                "parameter '{name}': enum value '{value}' is longer than max_length {longest}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(queries: &str) -> Result<InventoryConfig> {
        InventoryConfig::from_toml_str(&format!(
            "description = \"Stock.\"\ndatabase = \"sqlite://x.db\"\n{queries}"
        ))
    }

    fn compile_error(queries: &str) -> String {
        compile(&config(queries).unwrap()).unwrap_err().to_string()
    }

    const GOOD: &str = "[[queries]]\nname = \"stock_by_sku\"\ndescription = \"d\"\n\
                        sql = \"SELECT 1 WHERE :sku = :sku\"\n\
                        params = [{ name = \"sku\", type = \"string\", max_length = 20 }]\n";

    #[test]
    fn a_good_config_compiles() {
        let config = config(GOOD).unwrap();
        assert_eq!(config.name, "inventory");
        let compiled = compile(&config).unwrap();
        assert_eq!(compiled[0].sql.postgres, "SELECT 1 WHERE $1 = $1");
    }

    #[test]
    fn bad_declarations_are_named() {
        let cases = [
            (
                GOOD.replace(":sku = :sku", ":sku = :skew"),
                "query 'stock_by_sku': sql uses :skew",
            ),
            (GOOD.replace(":sku = :sku", "1 = 1"), "never uses :sku"),
            (
                GOOD.replace("stock_by_sku", "Stock By SKU"),
                "query name 'Stock By SKU'",
            ),
            (format!("{GOOD}{GOOD}"), "declared twice"),
            (
                GOOD.replace("\"sku\", type", "\"query\", type"),
                "cannot be named 'query'",
            ),
            (GOOD.replace("max_length = 20", "min = 1"), "min/max need"),
            (
                GOOD.replace("max_length = 20", "max_length = 0"),
                "max_length must be",
            ),
            (
                GOOD.replace("max_length = 20", "enum = []"),
                "enum is empty",
            ),
            (GOOD.replace("SELECT 1", "SELECT ?"), "not '?'"),
            (
                format!("[limits]\nstatement_timeout_ms = 0\n{GOOD}"),
                "limits.statement_timeout_ms is 0",
            ),
            (String::new(), "missing field `queries`"),
        ];
        for (queries, expected) in cases {
            let err = match config(&queries) {
                Ok(config) => compile(&config).unwrap_err().to_string(),
                Err(err) => err.to_string(),
            };
            assert!(err.contains(expected), "expected '{expected}' in: {err}");
        }
        let numbers = "[[queries]]\nname = \"q\"\ndescription = \"d\"\nsql = \"SELECT :n\"\n\
                       params = [{ name = \"n\", type = \"integer\", min = 5, max = 1 }]\n";
        assert!(compile_error(numbers).contains("min 5 is above max 1"));
        let fractional = numbers.replace("min = 5, max = 1", "max = 1.5");
        assert!(compile_error(&fractional).contains("not a valid integer"));
    }

    #[test]
    fn unknown_types_and_fields_are_rejected_by_the_parser() {
        let err = config(&GOOD.replace("\"string\"", "\"text\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `text`"), "{err}");
        let err = config(&GOOD.replace("max_length", "maxlen"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("maxlen"), "{err}");
    }
}
