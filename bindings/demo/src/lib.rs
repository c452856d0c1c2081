//! searchloop's demo: what `searchloop demo` and the learning benchmark run on.
//!
//! - [`retail`]: the seeded retail data set generator (catalog, stores with addresses and
//!   opening hours, stock, and questions verified against them);
//! - [`inventory`]: seeding the SQL inventory database from the data set, and the SQL tool's
//!   queries over it;
//! - [`help_center`]: the store's help pages behind a SearxNG-shaped HTTP search API;
//! - [`plot`]: curves of training metrics, drawn with an embedded font.

// Tests may unwrap: a panic with the error is the clearest failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod error;
pub mod help_center;
pub mod inventory;
pub mod plot;
pub mod retail;

pub use error::{DemoError, Result};
pub use inventory::{INVENTORY_CONFIG_TOML, SeedReport, seed_retail_inventory};
pub use retail::{
    DatasetFiles, GeneratorConfig, Hours, Product, Question, QuestionKind, RetailDataset, Split,
    StockRow, Store, StoreHours, Vocabulary, generate, read_products_csv, read_products_jsonl,
    read_questions, read_stock_jsonl, read_stores_jsonl,
};
