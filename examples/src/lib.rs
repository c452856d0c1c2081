//! Runnable examples and the retail data set generator of searchloop.

pub mod help_center;
pub mod retail;

pub use retail::{
    DatasetFiles, GeneratorConfig, Hours, Product, Question, QuestionKind, RetailDataset,
    RetailError, Split, StockRow, Store, StoreHours, generate, read_products_csv,
    read_products_jsonl, read_questions, read_stock_jsonl, read_stores_jsonl,
};
