//! Fixtures and checks shared by the SQLite and PostgreSQL suites: the same retail inventory,
//! seeded from the generator, and the same assertions against both databases.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use searchloop_core::{
    DynTool, ToolError,
    conformance::{ConformanceConfig, check_tool},
};
use searchloop_demo::retail::{GeneratorConfig, QuestionKind, RetailDataset, generate};
use searchloop_search_sql::{InventoryConfig, InventoryTool, SqlError};
use serde_json::json;
use sqlx::{Connection, postgres::PgConnection, sqlite::SqliteConnection};
use tempfile::TempDir;

/// The generated data set, written once per test binary.
pub struct Dataset {
    pub dir: TempDir,
    pub data: RetailDataset,
}

pub fn dataset() -> &'static Dataset {
    static DATASET: OnceLock<Dataset> = OnceLock::new();
    DATASET.get_or_init(|| {
        let data = generate(&GeneratorConfig::default());
        let dir = tempfile::tempdir().unwrap();
        data.write_to(dir.path()).unwrap();
        Dataset { dir, data }
    })
}

/// The demo's inventory config, pointed at `database`.
pub fn retail_config(database: &str) -> InventoryConfig {
    let mut config =
        InventoryConfig::from_toml_str(searchloop_demo::INVENTORY_CONFIG_TOML).unwrap();
    config.database = database.to_string();
    config
}

/// A config with only the queries in `queries` (TOML `[[queries]]` tables).
pub fn custom_config(database: &str, limits: &str, queries: &str) -> InventoryConfig {
    InventoryConfig::from_toml_str(&format!(
        "description = \"Test inventory.\"\ndatabase = \"{database}\"\n[limits]\n{limits}\n{queries}"
    ))
    .unwrap()
}

/// Table sizes and total units: what "the data is still intact" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub products: i64,
    pub stores: i64,
    pub stock_rows: i64,
    pub units: i64,
}

const FINGERPRINT_SQL: &str = "SELECT (SELECT COUNT(*) FROM products), (SELECT COUNT(*) FROM stores), \
     (SELECT COUNT(*) FROM stock), (SELECT COALESCE(SUM(quantity), 0) FROM stock)";

/// The fingerprint read through a connection of its own (not the tool's).
pub async fn fingerprint(url: &str) -> Fingerprint {
    let row: (i64, i64, i64, i64) = if url.starts_with("sqlite:") {
        let mut conn = SqliteConnection::connect(url).await.unwrap();
        sqlx::query_as(FINGERPRINT_SQL)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    } else {
        let mut conn = PgConnection::connect(url).await.unwrap();
        sqlx::query_as(FINGERPRINT_SQL)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    Fingerprint {
        products: row.0,
        stores: row.1,
        stock_rows: row.2,
        units: row.3,
    }
}

/// The fingerprint of the generated data set.
pub fn expected_fingerprint() -> Fingerprint {
    let data = &dataset().data;
    Fingerprint {
        products: data.products.len() as i64,
        stores: data.stores.len() as i64,
        stock_rows: data.stock.len() as i64,
        units: data.stock.iter().map(|r| i64::from(r.quantity)).sum(),
    }
}

/// Asserts the inventory in `url` still holds exactly the seeded data.
pub async fn assert_intact(url: &str) {
    assert_eq!(
        fingerprint(url).await,
        expected_fingerprint(),
        "the data changed"
    );
}

pub async fn connect(config: InventoryConfig) -> InventoryTool {
    InventoryTool::connect(config).await.unwrap()
}

/// The cells of the rendered table's data lines.
pub fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(2)
        .map(|line| line.split(" | ").map(str::to_string).collect())
        .collect()
}

pub async fn check_conformance(url: &str) {
    let tool = connect(retail_config(url)).await;
    let sku = dataset().data.products[0].sku.clone();
    let report = check_tool(
        Arc::new(tool),
        &ConformanceConfig::new(json!({"query": "stock_by_sku", "sku": sku})),
    )
    .await
    .unwrap();
    assert!(report.errors > 0, "{report:?}");
    assert_intact(url).await;
}

/// Every inventory question of the generator is answered by `stock_in_store`, from the
/// product's name and the city in the question.
pub async fn check_inventory_questions(url: &str) {
    let tool = connect(retail_config(url)).await;
    let data = &dataset().data;
    let by_sku: BTreeMap<&str, &str> = data
        .products
        .iter()
        .map(|p| (p.sku.as_str(), p.name.as_str()))
        .collect();
    let mut answered = 0;
    for question in data
        .questions
        .iter()
        .filter(|q| q.kind == QuestionKind::Inventory)
    {
        let name = by_sku[question.skus[0].as_str()];
        let city = data
            .stores
            .iter()
            .find(|s| question.question.contains(&format!("the {} store", s.city)))
            .unwrap()
            .city
            .clone();
        // Names and cities in other cases still match.
        let text = tool
            .call_json(json!({
                "query": "stock_in_store",
                "product_name": name.to_uppercase(),
                "city": format!(" {} ", city.to_lowercase()),
            }))
            .await
            .unwrap();
        let rows = table_rows(&text);
        assert_eq!(rows.len(), 1, "{text}");
        let row = &rows[0];
        assert_eq!(
            (row[0].as_str(), row[1].as_str()),
            (name, city.as_str()),
            "{text}"
        );
        let gold = &question.answers[0];
        let answer = if question.question.starts_with("Is the") {
            &row[3]
        } else if question.question.starts_with("How many") {
            &row[2]
        } else {
            &row[4]
        };
        assert_eq!(answer, gold, "{}\n{text}", question.question);
        answered += 1;
    }
    assert!(answered >= 60, "{answered} inventory questions");
    assert_intact(url).await;
}

/// `find_products` joins catalog and stock the way a Rust filter over the data set does.
pub async fn check_find_products(url: &str) {
    let tool = connect(retail_config(url)).await;
    let data = &dataset().data;
    let units: BTreeMap<&str, u32> = data
        .products
        .iter()
        .map(|p| (p.sku.as_str(), p.stock))
        .collect();
    let mut checked = 0;
    for product in data.products.iter().step_by(97).take(12) {
        let max_price = (product.price * 1.2).round();
        for in_stock in [Some(true), Some(false), None] {
            let mut expected: Vec<&str> = data
                .products
                .iter()
                .filter(|p| {
                    p.category == product.category
                        && p.color == product.color
                        && p.price <= max_price
                        && in_stock.is_none_or(|s| (units[p.sku.as_str()] > 0) == s)
                })
                .map(|p| p.name.as_str())
                .collect();
            let mut args = json!({
                "query": "find_products",
                "category": product.category,
                "max_price": max_price,
                "color": product.color.to_uppercase(),
            });
            if let Some(flag) = in_stock {
                args["in_stock"] = json!(flag);
            }
            let text = tool.call_json(args).await.unwrap();
            if expected.len() > 20 {
                assert!(text.contains("first 20 rows (more not shown)"), "{text}");
                continue;
            }
            let mut found: Vec<String> = table_rows(&text)
                .into_iter()
                .map(|r| r[0].clone())
                .collect();
            expected.sort_unstable();
            found.sort_unstable();
            assert_eq!(found, expected, "{text}");
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked} filters checked");
    assert_intact(url).await;
}

/// Injection payloads: quote breaking, comments, stacked statements, unicode quotes, and
/// placeholder look-alikes.
pub const PAYLOADS: [&str; 14] = [
    "'; DROP TABLE stock; --",
    "' OR '1'='1",
    "Aurora Tote' --",
    "x'/**/OR/**/'1'='1",
    "’ OR ’1’=’1",
    "ʼ; DELETE FROM stock; --",
    "\" OR 1=1 --",
    "1; DELETE FROM products",
    "%' OR name LIKE '%",
    "Robert'); DROP TABLE products;--",
    "\\'; DROP TABLE stock; --",
    "$1",
    "?1 OR 1=1",
    ":city",
];

/// Every string parameter of every retail query receives every payload: each call finds
/// nothing (or, for an enum, is rejected), and the data stays intact.
pub async fn check_injection_is_inert(url: &str) {
    let tool = connect(retail_config(url)).await;
    let product = &dataset().data.products[0];
    let mut reached_the_database = 0;
    for payload in PAYLOADS {
        let calls = [
            json!({"query": "stock_by_sku", "sku": payload}),
            json!({"query": "product_stock", "product_name": payload}),
            json!({"query": "stock_in_store", "product_name": payload, "city": "Lyon"}),
            json!({"query": "stock_in_store", "product_name": product.name, "city": payload}),
            json!({"query": "find_products", "category": "bags", "color": payload}),
        ];
        for args in calls {
            match tool.call_json(args.clone()).await {
                Ok(text) => {
                    assert!(text.ends_with(": no rows"), "{args}: {text}");
                    reached_the_database += 1;
                }
                // A payload longer than the parameter's max_length never reaches the database.
                Err(ToolError::InvalidArguments(e)) if e.contains("characters long") => {}
                Err(e) => panic!("{args}: {e}"),
            }
        }
        let err = tool
            .call_json(json!({"query": "find_products", "category": payload}))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("must be one of"),
            "{payload}: {err}"
        );
    }
    assert!(
        reached_the_database >= 60,
        "{reached_the_database} payloads were bound and run"
    );
    assert_intact(url).await;
}

/// Wrong types, missing parameters, unknown queries and SQL text get one clear error each.
pub async fn check_bad_arguments(url: &str) {
    let tool = connect(retail_config(url)).await;
    let cases = [
        (
            json!({"query": "stock_by_sku"}),
            "stock_by_sku: missing argument 'sku' (string)",
        ),
        (
            json!({"query": "stock_by_sku", "sku": 17}),
            "'sku' must be a string, not 17",
        ),
        (
            json!({"query": "stock_in_store", "product_name": "x"}),
            "missing argument 'city'",
        ),
        (
            json!({"query": "find_products", "category": "bags", "max_price": "cheap"}),
            "'max_price' must be a number, not \"cheap\"",
        ),
        (
            json!({"query": "find_products", "category": "bags", "max_price": -5}),
            "'max_price' must be at least 0",
        ),
        (
            json!({"query": "find_products", "category": "bags", "in_stock": "yes"}),
            "'in_stock' must be a boolean",
        ),
        (
            json!({"query": "stock_by_sku", "sku": "BAG-1", "sql": "DELETE FROM stock"}),
            "unexpected argument 'sql'",
        ),
        (
            json!({"query": "drop_everything"}),
            "unknown query 'drop_everything'",
        ),
        (
            json!({"query": "SELECT * FROM stock; DELETE FROM stock"}),
            "unknown query 'SELECT * FROM stock; DELETE FROM stock'",
        ),
        (json!({"query": 3}), "'query' must be the name of a query"),
        (
            json!({"sku": "BAG-1"}),
            "arguments must be a JSON object like",
        ),
        (
            json!("stock_by_sku"),
            "arguments must be a JSON object like",
        ),
        (
            json!({"query": "stock_by_sku", "sku": "x".repeat(33)}),
            "33 characters long",
        ),
    ];
    for (args, expected) in cases {
        let err = tool.call_json(args.clone()).await.unwrap_err();
        assert!(
            matches!(err, ToolError::InvalidArguments(_)),
            "{args}: {err:?}"
        );
        assert!(
            err.to_string().contains(expected),
            "{args}: expected '{expected}' in: {err}"
        );
    }
    assert_intact(url).await;
}

const SLOW_QUERY: &str = r#"
[[queries]]
name = "count_to"
description = "Counts to n the slow way."
sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n) SELECT COUNT(*) AS n FROM c"
params = [{ name = "n", type = "integer", min = 1 }]
"#;

/// A slow statement is stopped by the database at the timeout, and the single pooled
/// connection answers the next call.
pub async fn check_slow_query_is_stopped(url: &str) {
    let config = custom_config(
        url,
        "statement_timeout_ms = 300\nmax_connections = 1",
        SLOW_QUERY,
    );
    let tool = connect(config).await;
    let started = Instant::now();
    let err = tool
        .call_json(json!({"query": "count_to", "n": 1_000_000_000_i64}))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err, ToolError::Timeout(300));
    assert!(
        elapsed < Duration::from_millis(1_500),
        "stopped after {elapsed:?}"
    );
    let text = tool
        .call_json(json!({"query": "count_to", "n": 1000}))
        .await
        .unwrap();
    assert_eq!(text, "count_to: 1 row\nn\n1000");
    assert_intact(url).await;
}

/// Declared queries that write (a host's mistake) are refused by the database itself.
pub async fn check_declared_writes_are_refused(url: &str, unlock_sql: &str) {
    let queries = format!(
        r#"
[[queries]]
name = "delete_stock"
description = "A misdeclared write."
sql = "DELETE FROM stock WHERE sku = :sku"
params = [{{ name = "sku", type = "string" }}]

[[queries]]
name = "zero_stock"
description = "A misdeclared write."
sql = "UPDATE stock SET quantity = 0"

[[queries]]
name = "add_store"
description = "A misdeclared write."
sql = "INSERT INTO stores (id, city) VALUES ('XXX', :city)"
params = [{{ name = "city", type = "string" }}]

[[queries]]
name = "drop_stock"
description = "A misdeclared write."
sql = "DROP TABLE stock"

[[queries]]
name = "unlock"
description = "Tries to turn read-only off for the session."
sql = "{unlock_sql}"
"#
    );
    let tool = connect(custom_config(url, "max_connections = 1", &queries)).await;
    let sku = dataset().data.products[0].sku.clone();
    let writes = [
        json!({"query": "delete_stock", "sku": sku}),
        json!({"query": "zero_stock"}),
        json!({"query": "add_store", "city": "Atlantis"}),
        json!({"query": "drop_stock"}),
    ];
    for round in 0..2 {
        for args in &writes {
            let err = tool.call_json(args.clone()).await.unwrap_err().to_string();
            assert!(
                err.contains("tried to write and the read-only database refused"),
                "round {round}, {args}: {err}"
            );
        }
        // Whatever the session-level switch does, the next round must still be refused.
        let _ = tool.call_json(json!({"query": "unlock"})).await;
    }
    assert_intact(url).await;
}

/// With a small row limit the observation says more rows exist.
pub async fn check_row_limit(url: &str) {
    let mut config = retail_config(url);
    config.limits.max_rows = 5;
    let tool = connect(config).await;
    let text = tool
        .call_json(json!({"query": "find_products", "category": "bags"}))
        .await
        .unwrap();
    assert!(
        text.starts_with("find_products: first 5 rows (more not shown)\n"),
        "{text}"
    );
    assert_eq!(table_rows(&text).len(), 5, "{text}");
    assert_intact(url).await;
}

/// A declared query naming a missing column fails when the tool is built, naming the query.
pub async fn check_bad_declarations_fail_at_connect(url: &str) {
    let queries = r#"
[[queries]]
name = "broken"
description = "Names a column that does not exist."
sql = "SELECT no_such_column FROM stock WHERE sku = :sku"
params = [{ name = "sku", type = "string" }]
"#;
    let err = InventoryTool::connect(custom_config(url, "", queries))
        .await
        .unwrap_err();
    assert!(matches!(err, SqlError::Prepare { .. }), "{err}");
    assert!(
        err.to_string().contains("query 'broken' does not prepare"),
        "{err}"
    );
    assert!(err.to_string().contains("no_such_column"), "{err}");
}

/// Seeding again replaces the data instead of duplicating it.
pub async fn check_reseeding_is_idempotent(url: &str) {
    let report = searchloop_demo::seed_retail_inventory(url, dataset().dir.path())
        .await
        .unwrap();
    let expected = expected_fingerprint();
    assert_eq!(report.products as i64, expected.products);
    assert_eq!(report.stock_rows as i64, expected.stock_rows);
    assert_intact(url).await;
}
