//! The inventory tool: the model picks a declared query by name and supplies its arguments in
//! the same JSON object, e.g. `{"query": "stock_in_store", "product_name": "Aurora Tote",
//! "city": "Lyon"}`.
//!
//! Arguments are flat rather than nested under an `args` key: one level of braces is easier for
//! a small model to write, and the JSON Schema still describes each query exactly (one `oneOf`
//! branch per query, `query` fixed to its name, no other keys).

use std::fmt::Write as _;

use async_trait::async_trait;
use searchloop_core::{DynTool, ToolError, tool::truncate_chars};
use serde_json::{Map, Value, json};

use crate::{
    args::bind,
    backend::{Cell, Pool, Rows, redact},
    config::{
        CompiledQuery, DEFAULT_MAX_LENGTH, InventoryConfig, ParamConfig, ParamType, SqlLimits,
        compile,
    },
    error::{Result, SqlError},
};

/// A read-only SQL inventory the model queries through declared, parameterised queries. Build
/// it with [`InventoryTool::connect`]; register it in a `ToolRegistry` as `Arc::new(tool)`.
pub struct InventoryTool {
    name: String,
    description: String,
    queries: Vec<CompiledQuery>,
    limits: SqlLimits,
    schema: Value,
    database: String,
    pool: Pool,
}

impl std::fmt::Debug for InventoryTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventoryTool")
            .field("name", &self.name)
            .field("database", &self.database)
            .field("queries", &self.query_names().collect::<Vec<_>>())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl InventoryTool {
    /// Validates `config`, opens a read-only pool on its database and prepares every declared
    /// query, so mistakes show now rather than mid-episode.
    pub async fn connect(config: InventoryConfig) -> Result<Self> {
        let queries = compile(&config)?;
        let pool = Pool::connect_read_only(&config.database, &config.limits).await?;
        for query in &queries {
            if let Err(error) = pool.prepare(query).await {
                pool.close().await;
                return Err(error);
            }
        }
        Ok(Self {
            description: describe(&config.description, &queries),
            schema: schema(&queries),
            name: config.name,
            queries,
            limits: config.limits,
            database: redact(&config.database),
            pool,
        })
    }

    /// The declared queries' names.
    pub fn query_names(&self) -> impl Iterator<Item = &str> {
        self.queries.iter().map(|q| q.name.as_str())
    }

    /// Runs the query the arguments name and renders its rows.
    pub async fn run(&self, args: &Value) -> Result<String> {
        let invalid = SqlError::InvalidArguments;
        let usage = || {
            format!(
                "arguments must be a JSON object like {{\"query\": \"{}\", ...}}; queries: {}",
                self.queries.first().map_or("", |q| q.name.as_str()),
                self.query_names().collect::<Vec<_>>().join(", ")
            )
        };
        let object = args.as_object().ok_or_else(|| invalid(usage()))?;
        let name = match object.get("query") {
            Some(Value::String(name)) => name,
            Some(other) => {
                return Err(invalid(format!(
                    "'query' must be the name of a query, not {}; {}",
                    truncate_chars(&other.to_string(), 40),
                    usage()
                )));
            }
            None => return Err(invalid(usage())),
        };
        let query = self
            .queries
            .iter()
            .find(|q| q.name == *name)
            .ok_or_else(|| {
                invalid(format!(
                    "unknown query '{}'; queries: {}",
                    truncate_chars(name, 40),
                    self.query_names().collect::<Vec<_>>().join(", ")
                ))
            })?;
        let bound = bind(query, object).map_err(invalid)?;
        let rows = self.pool.fetch(query, &bound, &self.limits).await?;
        Ok(render(&query.name, &rows, self.limits.max_cell_chars))
    }

    /// Closes the pool; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl DynTool for InventoryTool {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn parameters(&self) -> Value {
        self.schema.clone()
    }

    async fn call_json(&self, args: Value) -> std::result::Result<String, ToolError> {
        self.run(&args).await.map_err(ToolError::from)
    }
}

/// The host's description followed by one line per query: `name(param, optional?: type)`.
fn describe(description: &str, queries: &[CompiledQuery]) -> String {
    let mut text = format!(
        "{} Pass {{\"query\": <name>, <its arguments>}}. Queries:",
        description.trim()
    );
    for query in queries {
        let params: Vec<String> = query
            .params
            .iter()
            .map(|p| {
                let optional = if p.required { "" } else { "?" };
                match p.param_type {
                    ParamType::String => format!("{}{optional}", p.name),
                    other => format!("{}{optional}: {}", p.name, other.as_str()),
                }
            })
            .collect();
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "\n- {}({}): {}",
            query.name,
            params.join(", "),
            query.description.trim()
        );
    }
    text
}

/// The JSON Schema of one parameter's argument.
fn param_schema(param: &ParamConfig) -> Value {
    let json_type = param.param_type.as_str();
    let mut schema = Map::new();
    schema.insert(
        "type".into(),
        if param.required {
            json!(json_type)
        } else {
            json!([json_type, "null"])
        },
    );
    if let Some(description) = &param.description {
        schema.insert("description".into(), json!(description));
    }
    if param.param_type == ParamType::String && param.allowed.is_none() {
        schema.insert(
            "maxLength".into(),
            json!(param.max_length.unwrap_or(DEFAULT_MAX_LENGTH)),
        );
    }
    if let Some(allowed) = &param.allowed {
        let mut values: Vec<Value> = allowed.iter().map(|v| json!(v)).collect();
        if !param.required {
            values.push(Value::Null);
        }
        schema.insert("enum".into(), Value::Array(values));
    }
    if let Some(min) = param.min {
        schema.insert("minimum".into(), json!(min));
    }
    if let Some(max) = param.max {
        schema.insert("maximum".into(), json!(max));
    }
    Value::Object(schema)
}

/// The tool's JSON Schema: `query` names the query, and one `oneOf` branch per query fixes its
/// arguments. The top-level `properties` list every argument name, with its schema when all
/// queries that take it agree on one.
fn schema(queries: &[CompiledQuery]) -> Value {
    let names: Vec<&str> = queries.iter().map(|q| q.name.as_str()).collect();
    let mut properties = Map::new();
    properties.insert(
        "query".into(),
        json!({"type": "string", "enum": names, "description": "Which query to run."}),
    );
    let mut branches = Vec::with_capacity(queries.len());
    for query in queries {
        let mut branch_properties = Map::new();
        branch_properties.insert("query".into(), json!({"const": query.name}));
        let mut required = vec![json!("query")];
        for param in &query.params {
            let schema = param_schema(param);
            match properties.get(&param.name) {
                None => {
                    properties.insert(param.name.clone(), schema.clone());
                }
                Some(existing) if *existing != schema => {
                    properties.insert(param.name.clone(), json!({}));
                }
                Some(_) => {}
            }
            branch_properties.insert(param.name.clone(), schema);
            if param.required {
                required.push(json!(param.name));
            }
        }
        branches.push(json!({
            "description": query.description,
            "properties": branch_properties,
            "required": required,
            "additionalProperties": false,
        }));
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": ["query"],
        "oneOf": branches,
    })
}

/// A cell as compact text: NULL as `none`, control characters as spaces, cut to `max_chars`.
fn cell_text(cell: &Cell, max_chars: usize) -> String {
    match cell {
        Cell::Null => "none".into(),
        Cell::Integer(n) => n.to_string(),
        Cell::Float(x) => x.to_string(),
        Cell::Boolean(b) => b.to_string(),
        Cell::Text(text) => {
            let clean: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            truncate_chars(clean.trim(), max_chars)
        }
    }
}

/// Rows as a small table: a count line, the column names, then one line per row, cells
/// separated by ` | `.
fn render(query: &str, rows: &Rows, max_cell_chars: usize) -> String {
    if rows.rows.is_empty() {
        return format!("{query}: no rows");
    }
    let n = rows.rows.len();
    let mut text = if rows.truncated {
        format!("{query}: first {n} rows (more not shown)")
    } else {
        format!("{query}: {n} row{}", if n == 1 { "" } else { "s" })
    };
    text.push('\n');
    text.push_str(&rows.columns.join(" | "));
    for row in &rows.rows {
        text.push('\n');
        let cells: Vec<String> = row.iter().map(|c| cell_text(c, max_cell_chars)).collect();
        text.push_str(&cells.join(" | "));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_render_compactly() {
        let rows = Rows {
            columns: vec!["city".into(), "quantity".into(), "restock_date".into()],
            rows: vec![
                vec![
                    Cell::Text("Lyon".into()),
                    Cell::Integer(0),
                    Cell::Text("2025-06-10".into()),
                ],
                vec![Cell::Text("Paris\n".into()), Cell::Float(12.5), Cell::Null],
            ],
            truncated: false,
        };
        assert_eq!(
            render("stock", &rows, 20),
            "stock: 2 rows\ncity | quantity | restock_date\nLyon | 0 | 2025-06-10\nParis | 12.5 | none"
        );
        let more = Rows {
            truncated: true,
            ..rows.clone()
        };
        assert!(render("stock", &more, 20).starts_with("stock: first 2 rows (more not shown)"));
        assert_eq!(render("stock", &Rows::default(), 20), "stock: no rows");
        assert_eq!(cell_text(&Cell::Text("abcdefghij".into()), 8), "abcdefgh …");
    }
}
