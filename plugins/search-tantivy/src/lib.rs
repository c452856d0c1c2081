//! Full-text product catalog search tool for searchloop, on tantivy.
//!
//! - [`CatalogIndex`]: a persistent index in one directory, built from the retail
//!   generator's `catalog.jsonl` or `catalog.csv` (or any file with the same columns), updated
//!   by SKU ([`CatalogIndex::upsert`], [`CatalogIndex::delete`]) and searched from many threads.
//! - [`CatalogQuery`]: the query language the model writes, free text plus filters such as
//!   `category:bags price<200 in_stock:yes`, parsed without ever reaching tantivy's own query
//!   syntax, so no model output can make a search fail or panic.
//! - [`CatalogSearchTool`]: the searchloop [`Tool`](searchloop_core::Tool) answering
//!   `<search>query</search>` with a few compact result lines sized for a small model.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use searchloop_search_tantivy::{CatalogIndex, CatalogSearchTool};
//!
//! let index = CatalogIndex::create_or_open("catalog-index")?;
//! index.index_jsonl("catalog.jsonl")?;
//! let tool = CatalogSearchTool::new(Arc::new(index));
//! # Ok(()) }
//! ```

mod error;
mod index;
mod numeric;
mod product;
mod query;
mod schema;
mod snippet;
mod tool;

pub use error::{CatalogError, Result};
pub use index::{CatalogIndex, IndexReport, Progress, SearchHit};
pub use product::{CatalogSource, Product};
pub use query::{CatalogQuery, Comparison, Filter, MAX_FILTERS, MAX_QUERY_WORDS};
pub use snippet::render_hit;
pub use tool::{CatalogSearchTool, CatalogToolConfig, MAX_LIMIT, SearchArgs};
