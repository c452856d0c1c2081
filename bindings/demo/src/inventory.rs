//! Seeds the retail inventory database (the demo's SQL tool reads it through
//! [`INVENTORY_CONFIG_TOML`]'s queries) from the data set generator's files (`catalog.jsonl`,
//! `stores.jsonl`, `stock.jsonl`), so the inventory and the catalog describe the same products
//! and multi-hop questions can join them.
//!
//! Seeding needs a writable connection, which is why it lives here and not in the read-only
//! SQL tool. It replaces the three tables in one transaction: a failure leaves the database as
//! it was.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
    str::FromStr,
};

use serde::{Deserialize, de::DeserializeOwned};
use sqlx::{
    Connection, Database, Encode, Executor, IntoArguments, Type,
    postgres::{PgConnectOptions, PgConnection},
    sqlite::{SqliteConnectOptions, SqliteConnection},
};

use crate::error::{DemoError, Result};

/// Bound values per INSERT statement, well under SQLite's 32,766 and PostgreSQL's 65,535.
const BINDS_PER_STATEMENT: usize = 4_000;

/// The schema, the same text for both databases (SQLite reads `DOUBLE PRECISION` as REAL).
/// Dates are ISO-8601 text, which sorts and compares correctly and renders the same everywhere.
const SCHEMA: [&str; 9] = [
    "DROP TABLE IF EXISTS stock",
    "DROP TABLE IF EXISTS stores",
    "DROP TABLE IF EXISTS products",
    "CREATE TABLE products (
        sku TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        brand TEXT NOT NULL,
        category TEXT NOT NULL,
        color TEXT NOT NULL,
        material TEXT NOT NULL,
        price DOUBLE PRECISION NOT NULL,
        width_cm DOUBLE PRECISION NOT NULL,
        height_cm DOUBLE PRECISION NOT NULL,
        depth_cm DOUBLE PRECISION NOT NULL,
        dimensions TEXT NOT NULL,
        total_stock INTEGER NOT NULL,
        description TEXT NOT NULL,
        attributes TEXT NOT NULL
    )",
    "CREATE TABLE stores (id TEXT PRIMARY KEY, city TEXT NOT NULL UNIQUE)",
    "CREATE TABLE stock (
        sku TEXT NOT NULL REFERENCES products (sku),
        store_id TEXT NOT NULL REFERENCES stores (id),
        quantity INTEGER NOT NULL CHECK (quantity >= 0),
        restock_date TEXT,
        PRIMARY KEY (sku, store_id)
    )",
    "CREATE INDEX products_category ON products (category)",
    "CREATE INDEX products_lower_name ON products (lower(name))",
    "CREATE INDEX stock_store ON stock (store_id)",
];

/// One line of `catalog.jsonl` (fields the inventory keeps; others are ignored).
#[derive(Debug, Deserialize)]
struct ProductRecord {
    sku: String,
    name: String,
    brand: String,
    category: String,
    color: String,
    material: String,
    price: f64,
    width_cm: f64,
    height_cm: f64,
    depth_cm: f64,
    dimensions: String,
    stock: i64,
    description: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

/// One line of `stores.jsonl`.
#[derive(Debug, Deserialize)]
struct StoreRecord {
    id: String,
    city: String,
}

/// One line of `stock.jsonl`.
#[derive(Debug, Deserialize)]
struct StockRecord {
    sku: String,
    store_id: String,
    quantity: i64,
    restock_date: Option<String>,
}

/// What seeding wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    /// Rows in `products`.
    pub products: usize,
    /// Rows in `stores`.
    pub stores: usize,
    /// Rows in `stock`.
    pub stock_rows: usize,
}

/// A value to bind while seeding.
enum SeedValue {
    Text(String),
    OptionalText(Option<String>),
    Float(f64),
    Integer(i64),
}

/// One table's rows, ready to insert.
struct TableRows {
    table: &'static str,
    columns: &'static [&'static str],
    rows: Vec<Vec<SeedValue>>,
}

/// Replaces the `products`, `stores` and `stock` tables of the database at `url` (a
/// `sqlite://` file, created if missing, or a `postgres://` URL) with the data set in `dir`.
pub async fn seed_retail_inventory(url: &str, dir: &Path) -> Result<SeedReport> {
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(DemoError::InvalidDataset {
            reason: "the inventory database must be a sqlite:// or postgres:// URL".into(),
        });
    }
    let products: Vec<ProductRecord> = read_jsonl(&dir.join("catalog.jsonl"))?;
    let stores: Vec<StoreRecord> = read_jsonl(&dir.join("stores.jsonl"))?;
    let stock: Vec<StockRecord> = read_jsonl(&dir.join("stock.jsonl"))?;
    let report = SeedReport {
        products: products.len(),
        stores: stores.len(),
        stock_rows: stock.len(),
    };
    let tables = [
        TableRows {
            table: "products",
            columns: &[
                "sku",
                "name",
                "brand",
                "category",
                "color",
                "material",
                "price",
                "width_cm",
                "height_cm",
                "depth_cm",
                "dimensions",
                "total_stock",
                "description",
                "attributes",
            ],
            rows: products
                .into_iter()
                .map(|p| {
                    let attributes = serde_json::to_string(&p.attributes).unwrap_or_default();
                    vec![
                        SeedValue::Text(p.sku),
                        SeedValue::Text(p.name),
                        SeedValue::Text(p.brand),
                        SeedValue::Text(p.category),
                        SeedValue::Text(p.color),
                        SeedValue::Text(p.material),
                        SeedValue::Float(p.price),
                        SeedValue::Float(p.width_cm),
                        SeedValue::Float(p.height_cm),
                        SeedValue::Float(p.depth_cm),
                        SeedValue::Text(p.dimensions),
                        SeedValue::Integer(p.stock),
                        SeedValue::Text(p.description),
                        SeedValue::Text(attributes),
                    ]
                })
                .collect(),
        },
        TableRows {
            table: "stores",
            columns: &["id", "city"],
            rows: stores
                .into_iter()
                .map(|s| vec![SeedValue::Text(s.id), SeedValue::Text(s.city)])
                .collect(),
        },
        TableRows {
            table: "stock",
            columns: &["sku", "store_id", "quantity", "restock_date"],
            rows: stock
                .into_iter()
                .map(|s| {
                    vec![
                        SeedValue::Text(s.sku),
                        SeedValue::Text(s.store_id),
                        SeedValue::Integer(s.quantity),
                        SeedValue::OptionalText(s.restock_date),
                    ]
                })
                .collect(),
        },
    ];
    let connect_error = |source| DemoError::Connect { source };
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_error)?
            .create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(connect_error)?;
        write_tables::<sqlx::Sqlite>(&mut conn, &tables, '?').await?;
        conn.close().await.map_err(connect_error)?;
    } else {
        let options = PgConnectOptions::from_str(url).map_err(connect_error)?;
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(connect_error)?;
        write_tables::<sqlx::Postgres>(&mut conn, &tables, '$').await?;
        conn.close().await.map_err(connect_error)?;
    }
    Ok(report)
}

/// Reads a JSON-lines file; errors name the file and the line.
fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let read_error = |source| DemoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut records = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(read_error)?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(
            serde_json::from_str(&line).map_err(|source| DemoError::Json {
                path: path.to_path_buf(),
                line: n + 1,
                source,
            })?,
        );
    }
    Ok(records)
}

/// Recreates the schema and inserts every table in one transaction. `placeholder` is `?` for
/// SQLite (`?1`) or `$` for PostgreSQL (`$1`).
async fn write_tables<DB>(
    conn: &mut DB::Connection,
    tables: &[TableRows],
    placeholder: char,
) -> Result<()>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> f64: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    let seed_error = |step| move |source| DemoError::Seed { step, source };
    let mut tx = conn.begin().await.map_err(seed_error("starting"))?;
    for statement in SCHEMA {
        sqlx::query::<DB>(statement)
            .execute(&mut *tx)
            .await
            .map_err(seed_error("creating the schema"))?;
    }
    for table in tables {
        let columns = table.columns.len();
        for batch in table.rows.chunks(BINDS_PER_STATEMENT / columns) {
            let mut sql = format!(
                "INSERT INTO {} ({}) VALUES ",
                table.table,
                table.columns.join(", ")
            );
            for (r, _) in batch.iter().enumerate() {
                sql.push_str(if r == 0 { "(" } else { ", (" });
                for c in 0..columns {
                    if c > 0 {
                        sql.push_str(", ");
                    }
                    sql.push(placeholder);
                    sql.push_str(&(r * columns + c + 1).to_string());
                }
                sql.push(')');
            }
            let mut query = sqlx::query::<DB>(&sql);
            for value in batch.iter().flatten() {
                query = match value {
                    SeedValue::Text(text) => query.bind(text.clone()),
                    SeedValue::OptionalText(text) => query.bind(text.clone()),
                    SeedValue::Float(x) => query.bind(*x),
                    SeedValue::Integer(n) => query.bind(*n),
                };
            }
            query
                .execute(&mut *tx)
                .await
                .map_err(seed_error("inserting rows"))?;
        }
    }
    // Fresh tables have no statistics; without them PostgreSQL plans the name lookups as scans.
    // Only these tables: a bare ANALYZE would lock every table of the database, other
    // schemas' included.
    for table in tables {
        sqlx::query::<DB>(&format!("ANALYZE {}", table.table))
            .execute(&mut *tx)
            .await
            .map_err(seed_error("analyzing the tables"))?;
    }
    tx.commit().await.map_err(seed_error("committing"))?;
    Ok(())
}

/// The demo's inventory config (`configs/inventory.toml`): the SQL tool's named queries over the
/// tables [`seed_retail_inventory`] creates, with `database = "sqlite://inventory.db"`.
pub const INVENTORY_CONFIG_TOML: &str = include_str!("../configs/inventory.toml");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retail::{GeneratorConfig, generate};

    #[tokio::test]
    async fn seeding_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("inventory.db").display());
        let err = seed_retail_inventory(&url, dir.path()).await.unwrap_err();
        assert!(matches!(err, DemoError::Read { .. }), "{err}");
        assert!(err.to_string().contains("catalog.jsonl"), "{err}");

        let data = tempfile::tempdir().unwrap();
        generate(&GeneratorConfig {
            products: 60,
            ..GeneratorConfig::default()
        })
        .write_to(data.path())
        .unwrap();
        for file in ["catalog.jsonl", "stores.jsonl", "stock.jsonl"] {
            std::fs::copy(data.path().join(file), dir.path().join(file)).unwrap();
        }
        std::fs::write(dir.path().join("stock.jsonl"), "{\"sku\": \"X\"}\n").unwrap();
        let err = seed_retail_inventory(&url, dir.path()).await.unwrap_err();
        assert!(err.to_string().contains("stock.jsonl:1"), "{err}");

        let err = seed_retail_inventory("mysql://x", dir.path())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("sqlite:// or postgres://"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_seeded_inventory_holds_the_data_set() {
        let data = tempfile::tempdir().unwrap();
        let dataset = generate(&GeneratorConfig {
            products: 60,
            ..GeneratorConfig::default()
        });
        dataset.write_to(data.path()).unwrap();
        let url = format!("sqlite://{}", data.path().join("inventory.db").display());
        let report = seed_retail_inventory(&url, data.path()).await.unwrap();
        assert_eq!(report.products, dataset.products.len());
        assert_eq!(report.stores, dataset.stores.len());
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stock")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n as usize, report.stock_rows);
    }
}
