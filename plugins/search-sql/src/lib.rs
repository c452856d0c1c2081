//! Read-only SQL inventory tool for searchloop (SQLite, PostgreSQL).
//!
//! The host declares named, parameterised queries in config ([`InventoryConfig`]); the model
//! picks one by name and supplies typed JSON arguments in the same object:
//!
//! ```json
//! {"query": "stock_in_store", "product_name": "Aurora Tote", "city": "Lyon"}
//! ```
//!
//! [`InventoryTool`] implements [`searchloop_core::DynTool`] directly, since its argument schema
//! is only known once the config is read. Its defences, for arguments written by a model:
//!
//! - SQL text from the model is never executed: only declared queries run, and every argument is
//!   checked against its declared type (string, integer, number, boolean; optional min, max,
//!   max_length, enum) and bound as a parameter, never pasted into SQL;
//! - connections are read-only: SQLite opened `mode=ro` with `PRAGMA query_only`, PostgreSQL in
//!   `READ ONLY` transactions on read-only sessions, so even a misdeclared write is refused by
//!   the database;
//! - a statement timeout stops slow statements inside the database (a SQLite progress handler, a
//!   PostgreSQL `statement_timeout`), and at most `max_rows` rows are read and shown.
//!
//! The demo's inventory (searchloop-demo) is a complete example: its seeding code writes the
//! `products`, `stores` and `stock` tables, and its `configs/inventory.toml` declares the
//! queries over them.
//!
//! ```toml
//! description = "Store inventory: stock per store, prices and restock dates."
//! database = "sqlite://inventory.db"
//! [[queries]]
//! name = "stock_by_sku"
//! description = "Units of one product in every store."
//! sql = "SELECT store_id, quantity FROM stock WHERE sku = :sku"
//! params = [{ name = "sku", type = "string", max_length = 32 }]
//! ```

mod args;
mod backend;
mod config;
mod error;
mod placeholders;
mod tool;

pub use config::{InventoryConfig, ParamConfig, ParamType, QueryConfig, SqlLimits};
pub use error::{Result, SqlError};
pub use tool::InventoryTool;
