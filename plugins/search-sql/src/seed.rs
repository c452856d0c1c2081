//! Seeds the retail inventory database from the data set generator's files (`catalog.jsonl`,
//! `stores.jsonl`, `stock.jsonl`), so the inventory and the catalog describe the same products
//! and multi-hop questions can join them.
//!
//! Seeding needs a writable connection, separate from the tool's read-only pool. It replaces the
//! three tables in one transaction: a failure leaves the database as it was.

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

use crate::{
    backend::{Backend, redact},
    error::{Result, SqlError},
};

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
    let connect_error = |source| SqlError::Connect {
        database: redact(url),
        source,
    };
    match Backend::of(url)? {
        Backend::Sqlite => {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(connect_error)?
                .create_if_missing(true);
            let mut conn = SqliteConnection::connect_with(&options)
                .await
                .map_err(connect_error)?;
            write_tables::<sqlx::Sqlite>(&mut conn, &tables, '?').await?;
            conn.close().await.map_err(connect_error)?;
        }
        Backend::Postgres => {
            let options = PgConnectOptions::from_str(url).map_err(connect_error)?;
            let mut conn = PgConnection::connect_with(&options)
                .await
                .map_err(connect_error)?;
            write_tables::<sqlx::Postgres>(&mut conn, &tables, '$').await?;
            conn.close().await.map_err(connect_error)?;
        }
    }
    Ok(report)
}

/// Reads a JSON-lines file; errors name the file and the line.
fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let read_error = |source| SqlError::ReadData {
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
            serde_json::from_str(&line).map_err(|source| SqlError::ParseData {
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
    let seed_error = |step| move |source| SqlError::Seed { step, source };
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
