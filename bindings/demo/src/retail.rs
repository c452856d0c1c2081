//! Deterministic, seeded generator of the retail data set: catalog, stores, stock and questions.
//!
//! The data set is what the demo agent searches (the catalog goes into tantivy, the stock table
//! into the SQL inventory database) and what it is trained and evaluated on (the questions).
//!
//! Design notes:
//!
//! - Every random choice comes from a `ChaCha8Rng` seeded by the configured seed, with one
//!   ChaCha stream per stage (products, stock, questions, split). A change to how questions are
//!   drawn therefore leaves the catalog byte-identical. Output order follows `Vec` order or
//!   `BTreeMap` order, never `HashMap` order, so the same seed gives byte-identical files.
//! - Questions are rendered from fixed templates, and [`RetailDataset::verify`] parses the text
//!   back with the same templates and recomputes the gold answers from the catalog and the stock
//!   table. It needs nothing but the files, so it also checks a data set read back from disk or
//!   edited by hand. A multi-hop question is parsed into its constraints, and verification counts
//!   the products that satisfy them all: exactly one must, and it must be the gold answer.
//! - [`generate`] keeps only the questions that pass that check, so it never emits an
//!   unverifiable question.
//! - Gold answers are short strings compared by exact match after the Search-R1 normalisation
//!   (lowercase, no punctuation, no articles, collapsed whitespace); each question lists every
//!   accepted spelling ("$129.99" and "129.99", "13-inch" and "13 inch").

mod vocab;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{Days, NaiveDate};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use searchloop_core::SolutionStep;
use searchloop_core::reward::normalize_answer;

use crate::error::DemoError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use vocab::{
    ALT_NAME_FIRST, ALT_NAME_SECOND, ALT_STORES, AttrKind, AttrSpec, CATEGORIES, CategorySpec,
    LAPTOP_ALTS, LAPTOP_FORMAT, LAPTOPS, LITRES_ALTS, LITRES_FORMAT, NAME_FIRST, NAME_SECOND,
    STORES, STREETS,
};

/// Single-hop questions the generator aims for.
const SINGLE_HOP_TARGET: usize = 180;
/// Multi-hop questions the generator aims for.
const MULTI_HOP_TARGET: usize = 150;
/// "Is it in stock" questions the generator aims for (half "yes", half "no").
const IN_STOCK_TARGET: usize = 50;
/// "How many units" questions the generator aims for.
const COUNT_TARGET: usize = 45;
/// "When will it be restocked" questions the generator aims for.
const RESTOCK_TARGET: usize = 25;
/// At or below this quantity a store row carries a restock date.
const LOW_STOCK: u32 = 2;
/// Most constraints a multi-hop question may carry besides the category.
const MAX_CONSTRAINTS: usize = 4;
/// Longest gold answer, in words after normalisation.
const MAX_ANSWER_WORDS: usize = 3;

/// The date the stock snapshot is taken; restock dates count from it, so they never depend on
/// the clock.
const SNAPSHOT_DATE: NaiveDate = match NaiveDate::from_ymd_opt(2025, 6, 2) {
    Some(date) => date,
    // A const item is evaluated at compile time, so this arm can only ever fail the build.
    None => panic!("the snapshot date is not a valid calendar date"),
};

/// Tool name of the full-text product catalog.
pub const TOOL_CATALOG: &str = "catalog";
/// Tool name of the SQL inventory database.
pub const TOOL_INVENTORY: &str = "inventory";
/// Tool name of the help center, an HTTP search service (see [`crate::help_center`]).
pub const TOOL_HELP: &str = "help";

/// Single-hop question templates for the fields every product has.
const MATERIAL_TEMPLATE: &str = "What material is the {name} made of?";
const COLOUR_TEMPLATE: &str = "What colour is the {name}?";
const BRAND_TEMPLATE: &str = "Which brand makes the {name}?";
const PRICE_TEMPLATE: &str = "How much does the {name} cost?";
const WIDTH_TEMPLATE: &str = "How wide is the {name}?";

/// Inventory question templates.
const IN_STOCK_TEMPLATE: &str = "Is the {name} in stock in the {city} store?";
const COUNT_TEMPLATE: &str = "How many units of the {name} does the {city} store have?";
const RESTOCK_TEMPLATE: &str = "When will the {name} be restocked in the {city} store?";
const INVENTORY_TEMPLATES: [&str; 3] = [IN_STOCK_TEMPLATE, COUNT_TEMPLATE, RESTOCK_TEMPLATE];

/// Store question templates, answered from the help center's store pages.
const WEEKDAY_OPENS_TEMPLATE: &str = "What time does the {city} store open on weekdays?";
const SATURDAY_CLOSES_TEMPLATE: &str = "What time does the {city} store close on Saturdays?";
const SUNDAY_OPEN_TEMPLATE: &str = "Is the {city} store open on Sundays?";
const ADDRESS_TEMPLATE: &str = "What is the street address of the {city} store?";
const STORE_TEMPLATES: [&str; 4] = [
    WEEKDAY_OPENS_TEMPLATE,
    SATURDAY_CLOSES_TEMPLATE,
    SUNDAY_OPEN_TEMPLATE,
    ADDRESS_TEMPLATE,
];

/// One product of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// Stock-keeping unit, unique, e.g. `"BAG-00017"`.
    pub sku: String,
    /// Unique, searchable name: an evocative name and the product type, e.g. `"Aurora Tote"`.
    pub name: String,
    /// Brand.
    pub brand: String,
    /// Category (plural), e.g. `"bags"`.
    pub category: String,
    /// Colour, lowercase.
    pub color: String,
    /// Main material, lowercase.
    pub material: String,
    /// Width in centimetres.
    pub width_cm: f64,
    /// Height in centimetres.
    pub height_cm: f64,
    /// Depth in centimetres.
    pub depth_cm: f64,
    /// The three dimensions as text, e.g. `"38 x 30 x 12 cm"`.
    pub dimensions: String,
    /// Price in US dollars, with two decimals.
    pub price: f64,
    /// Units in stock over all stores; the sum of the product's [`StockRow`]s.
    pub stock: u32,
    /// One-paragraph description that repeats the searchable facts.
    pub description: String,
    /// Category-specific attributes, e.g. `laptop_size = "13-inch"`, `capacity = "20 L"`.
    pub attributes: BTreeMap<String, String>,
}

/// A physical store that holds stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    /// Short identifier, e.g. `"LYO"`.
    pub id: String,
    /// City the store is in, as questions name it, e.g. `"Lyon"`.
    pub city: String,
    /// Street address, e.g. `"14 Market Street"`; empty in data sets written before stores had
    /// one.
    #[serde(default)]
    pub address: String,
    /// Opening hours; `None` in data sets written before stores had them.
    #[serde(default)]
    pub hours: Option<StoreHours>,
}

/// A store's opening hours over the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHours {
    /// Monday to Friday.
    pub weekdays: Hours,
    /// Saturday.
    pub saturday: Hours,
    /// Sunday; `None` when the store is closed on Sundays.
    pub sunday: Option<Hours>,
}

/// Opening and closing time of one day, in whole hours on the 24-hour clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hours {
    /// Opening hour, 0 to 23.
    pub opens: u8,
    /// Closing hour, after `opens`, 1 to 24.
    pub closes: u8,
}

impl std::fmt::Display for Hours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:00-{}:00", self.opens, self.closes)
    }
}

/// Stock of one product in one store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockRow {
    /// The product's SKU.
    pub sku: String,
    /// The store's id.
    pub store_id: String,
    /// Units on hand.
    pub quantity: u32,
    /// Expected restock date (`YYYY-MM-DD`) when the quantity is zero or low, else `None`.
    pub restock_date: Option<String>,
}

/// What a question needs to be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionKind {
    /// One fact of one named product, from the catalog.
    SingleHop,
    /// Several constraints that exactly one product of the catalog satisfies.
    MultiHop,
    /// A named product's stock in a named store, from the inventory.
    Inventory,
    /// A store's address or opening hours, from the help center.
    StoreInfo,
}

impl QuestionKind {
    /// Every kind, in the order the generator emits them.
    pub const ALL: [QuestionKind; 4] = [
        Self::SingleHop,
        Self::MultiHop,
        Self::Inventory,
        Self::StoreInfo,
    ];

    /// The kind as it is written in `questions.jsonl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SingleHop => "single_hop",
            Self::MultiHop => "multi_hop",
            Self::Inventory => "inventory",
            Self::StoreInfo => "store_info",
        }
    }

    /// The tools a question of this kind needs, in the order an agent calls them.
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            Self::SingleHop | Self::MultiHop => &[TOOL_CATALOG],
            Self::Inventory => &[TOOL_CATALOG, TOOL_INVENTORY],
            Self::StoreInfo => &[TOOL_HELP],
        }
    }
}

/// Which part of the data set a question belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Used for training.
    Train,
    /// Held out for evaluation.
    Heldout,
}

impl Split {
    /// The split as it is written in `questions.jsonl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Heldout => "heldout",
        }
    }
}

/// A question with its gold answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// Unique id, e.g. `"q0001"`.
    pub id: String,
    /// The question text; it names the products it is about exactly.
    pub question: String,
    /// Every accepted answer; any one matches after normalisation.
    pub answers: Vec<String>,
    /// What the question needs.
    pub kind: QuestionKind,
    /// Train or held out.
    pub split: Split,
    /// SKUs of the products the answer depends on; empty for store questions.
    pub skus: Vec<String>,
    /// Tools needed to answer: [`TOOL_CATALOG`], [`TOOL_INVENTORY`], [`TOOL_HELP`].
    pub tools: Vec<String>,
    /// A worked solution: the tool calls that lead to the answer, in order. Written for the
    /// catalog questions (single-hop: a search for the product's name; multi-hop: the question
    /// itself as the search) and the inventory questions (the name's search, then the
    /// inventory's `stock_in_store` query for the product and city); empty for store questions,
    /// whose help-center search no protocol that opens with a catalog search can play.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub solution: Vec<SolutionStep>,
}

/// The worked solution of a question of `kind` with text `text` about `product`.
fn solution_for(kind: QuestionKind, text: &str, product: Option<&Product>) -> Vec<SolutionStep> {
    let step = |tool: &str, input: String| SolutionStep {
        tool: tool.to_string(),
        input,
    };
    match (kind, product) {
        (QuestionKind::SingleHop, Some(product)) => {
            vec![step(TOOL_CATALOG, product.name.clone())]
        }
        // The question pasted whole ranks its product first more often than its constraints
        // written as catalog filters did (86 against 63 of 150 on the default data set), and
        // copying the question is what a small model imitates best: a warm start on these
        // solutions opened multi-hop questions, where filter solutions had lowered single-hop
        // EM (BENCHMARKS.md).
        (QuestionKind::MultiHop, _) => vec![step(TOOL_CATALOG, text.to_string())],
        (QuestionKind::Inventory, Some(product)) => match_inventory(text)
            .map(|(_, _, city)| {
                vec![
                    step(TOOL_CATALOG, product.name.clone()),
                    step(
                        TOOL_INVENTORY,
                        stock_in_store_arguments(&product.name, city),
                    ),
                ]
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The template an inventory question fills in, with its product name and city.
fn match_inventory(text: &str) -> Option<(&'static str, &str, &str)> {
    INVENTORY_TEMPLATES
        .into_iter()
        .find_map(|template| match_two(template, text).map(|(name, city)| (template, name, city)))
}

/// The inventory tool's arguments for its `stock_in_store` query, keys in the order the tool
/// describes them (a JSON map would sort them), as the system prompt's example writes a call.
fn stock_in_store_arguments(product_name: &str, city: &str) -> String {
    let quoted = |value: &str| serde_json::Value::from(value).to_string();
    format!(
        "{{\"query\": \"stock_in_store\", \"product_name\": {}, \"city\": {}}}",
        quoted(product_name),
        quoted(city)
    )
}

/// Parameters of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of products in the catalog.
    pub products: usize,
    /// Share of each question kind held out for evaluation, in `[0, 1]`.
    pub heldout_fraction: f64,
    /// The words product names are made of, and the stores' cities.
    pub vocabulary: Vocabulary,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            products: 2400,
            heldout_fraction: 0.25,
            vocabulary: Vocabulary::Retail,
        }
    }
}

/// The words a catalog's product names are drawn from, and its stores' cities.
///
/// The alternate vocabulary shares no name word and no city with the standard one: a model
/// trained on one catalog and evaluated on a catalog of the other has seen none of its product
/// names or stores, only the kinds of question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Vocabulary {
    /// The standard retail vocabulary.
    #[default]
    Retail,
    /// A disjoint vocabulary, for generalization checks.
    Alternate,
}

impl Vocabulary {
    fn name_words(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Vocabulary::Retail => (NAME_FIRST, NAME_SECOND),
            Vocabulary::Alternate => (ALT_NAME_FIRST, ALT_NAME_SECOND),
        }
    }

    fn stores(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Vocabulary::Retail => STORES,
            Vocabulary::Alternate => ALT_STORES,
        }
    }
}

/// The whole data set.
#[derive(Debug, Clone, PartialEq)]
pub struct RetailDataset {
    /// The catalog, in SKU order.
    pub products: Vec<Product>,
    /// The stores.
    pub stores: Vec<Store>,
    /// One row per product and store, product-major.
    pub stock: Vec<StockRow>,
    /// The questions, single-hop first, then multi-hop, inventory, and store questions.
    pub questions: Vec<Question>,
}

/// Paths of the files [`RetailDataset::write_to`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetFiles {
    /// `catalog.jsonl`: one [`Product`] per line.
    pub catalog_jsonl: PathBuf,
    /// `catalog.csv`: one product per row, attributes flattened as `key=value;key=value`.
    pub catalog_csv: PathBuf,
    /// `stores.jsonl`: one [`Store`] per line.
    pub stores: PathBuf,
    /// `stock.jsonl`: one [`StockRow`] per line.
    pub stock: PathBuf,
    /// `questions.jsonl`: one [`Question`] per line.
    pub questions: PathBuf,
}

impl DatasetFiles {
    /// The paths of the data set's files inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            catalog_jsonl: dir.join("catalog.jsonl"),
            catalog_csv: dir.join("catalog.csv"),
            stores: dir.join("stores.jsonl"),
            stock: dir.join("stock.jsonl"),
            questions: dir.join("questions.jsonl"),
        }
    }
}

/// Generates the data set for `config`. The same config always gives the same data set.
///
/// Every question is verified against the catalog and stock before it is kept.
pub fn generate(config: &GeneratorConfig) -> RetailDataset {
    let mut products = generate_products(config.seed, config.products, config.vocabulary);
    let stores = generate_stores(config.seed, config.vocabulary);
    let stock = generate_stock(config.seed, &mut products, &stores);
    let mut dataset = RetailDataset {
        products,
        stores,
        stock,
        questions: Vec::new(),
    };
    let mut questions = generate_questions(config.seed, &dataset);
    let index = Index::new(&dataset);
    questions.retain(|q| index.check_question(q).is_ok());
    for (n, q) in questions.iter_mut().enumerate() {
        q.id = format!("q{:04}", n + 1);
    }
    assign_splits(config.seed, &mut questions, config.heldout_fraction);
    dataset.questions = questions;
    dataset
}

impl RetailDataset {
    /// Checks the data set: unique SKUs and names, one stock row per product and store summing
    /// to the product's stock, restock dates where stock is out, and every question's gold
    /// answers recomputed from its text, the catalog and the stock.
    pub fn verify(&self) -> Result<(), DemoError> {
        let invalid = |reason: String| DemoError::InvalidDataset { reason };
        let index = Index::new(self);
        if index.by_sku.len() != self.products.len() {
            return Err(invalid("two products share a SKU".into()));
        }
        if index.by_name.len() != self.products.len() {
            return Err(invalid("two products share a name".into()));
        }
        if index.store_by_city.len() != self.stores.len()
            || index.store_by_id.len() != self.stores.len()
        {
            return Err(invalid("two stores share an id or a city".into()));
        }
        for store in &self.stores {
            let days = store.hours.iter().flat_map(|h| {
                [Some(h.weekdays), Some(h.saturday), h.sunday]
                    .into_iter()
                    .flatten()
            });
            for day in days {
                if day.opens >= day.closes || day.closes > 24 {
                    return Err(invalid(format!(
                        "the {} store has impossible opening hours {day}",
                        store.city
                    )));
                }
            }
        }
        let mut totals: BTreeMap<&str, (u32, usize)> = BTreeMap::new();
        let mut pairs = BTreeSet::new();
        for row in &self.stock {
            if !index.by_sku.contains_key(row.sku.as_str()) {
                return Err(invalid(format!("stock row for unknown SKU {}", row.sku)));
            }
            if !index.store_by_id.contains_key(row.store_id.as_str()) {
                return Err(invalid(format!(
                    "stock row for unknown store {}",
                    row.store_id
                )));
            }
            if !pairs.insert((row.sku.as_str(), row.store_id.as_str())) {
                return Err(invalid(format!(
                    "two stock rows for {} in {}",
                    row.sku, row.store_id
                )));
            }
            if row.quantity == 0 && row.restock_date.is_none() {
                return Err(invalid(format!(
                    "{} is out of stock in {} without a restock date",
                    row.sku, row.store_id
                )));
            }
            if let Some(date) = &row.restock_date
                && date.parse::<NaiveDate>().is_err()
            {
                return Err(invalid(format!("restock date {date:?} is not YYYY-MM-DD")));
            }
            let total = totals.entry(row.sku.as_str()).or_default();
            total.0 = total.0.saturating_add(row.quantity);
            total.1 += 1;
        }
        for product in &self.products {
            let (sum, rows) = totals
                .get(product.sku.as_str())
                .copied()
                .unwrap_or_default();
            if rows != self.stores.len() || sum != product.stock {
                return Err(invalid(format!(
                    "{} has stock {} but {rows} store rows summing to {sum}",
                    product.sku, product.stock
                )));
            }
        }
        let mut ids = BTreeSet::new();
        let mut texts = BTreeSet::new();
        for q in &self.questions {
            let fail = |reason: String| DemoError::InvalidQuestion {
                id: q.id.clone(),
                reason,
            };
            if !ids.insert(q.id.as_str()) {
                return Err(fail("duplicate id".into()));
            }
            if !texts.insert(q.question.as_str()) {
                return Err(fail("duplicate question text".into()));
            }
            index.check_question(q).map_err(fail)?;
        }
        Ok(())
    }

    /// Writes the data set into `dir` (created if missing) and returns the files' paths.
    pub fn write_to(&self, dir: &Path) -> Result<DatasetFiles, DemoError> {
        fs::create_dir_all(dir).map_err(|source| DemoError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let files = DatasetFiles::in_dir(dir);
        write_jsonl(&files.catalog_jsonl, &self.products)?;
        write_catalog_csv(&files.catalog_csv, &self.products)?;
        write_jsonl(&files.stores, &self.stores)?;
        write_jsonl(&files.stock, &self.stock)?;
        write_jsonl(&files.questions, &self.questions)?;
        Ok(files)
    }

    /// Reads a data set that [`RetailDataset::write_to`] wrote into `dir` (the JSONL files).
    pub fn read_from(dir: &Path) -> Result<Self, DemoError> {
        let files = DatasetFiles::in_dir(dir);
        Ok(Self {
            products: read_products_jsonl(&files.catalog_jsonl)?,
            stores: read_jsonl(&files.stores)?,
            stock: read_jsonl(&files.stock)?,
            questions: read_questions(&files.questions)?,
        })
    }
}

/// Reads `questions.jsonl`.
pub fn read_questions(path: &Path) -> Result<Vec<Question>, DemoError> {
    read_jsonl(path)
}

/// Reads `catalog.jsonl`.
pub fn read_products_jsonl(path: &Path) -> Result<Vec<Product>, DemoError> {
    read_jsonl(path)
}

/// Reads `stores.jsonl`.
pub fn read_stores_jsonl(path: &Path) -> Result<Vec<Store>, DemoError> {
    read_jsonl(path)
}

/// Reads `stock.jsonl`.
pub fn read_stock_jsonl(path: &Path) -> Result<Vec<StockRow>, DemoError> {
    read_jsonl(path)
}

/// Columns of `catalog.csv`, in order.
pub const CSV_COLUMNS: [&str; 14] = [
    "sku",
    "name",
    "brand",
    "category",
    "color",
    "material",
    "width_cm",
    "height_cm",
    "depth_cm",
    "dimensions",
    "price",
    "stock",
    "description",
    "attributes",
];

/// Reads `catalog.csv`, turning the `attributes` column back into a map.
pub fn read_products_csv(path: &Path) -> Result<Vec<Product>, DemoError> {
    let csv_error = |source| DemoError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| DemoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = csv::Reader::from_reader(BufReader::new(file));
    let header = reader.headers().map_err(csv_error)?;
    if header.iter().ne(CSV_COLUMNS) {
        return Err(DemoError::CsvField {
            path: path.to_path_buf(),
            line: 1,
            message: format!("expected the header {}", CSV_COLUMNS.join(",")),
        });
    }
    let mut products = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, csv::Position::line);
        let field_error = |message: String| DemoError::CsvField {
            path: path.to_path_buf(),
            line,
            message,
        };
        let field = |i: usize| record.get(i).unwrap_or_default().to_string();
        let number = |i: usize| -> Result<f64, DemoError> {
            let text = record.get(i).unwrap_or_default();
            text.parse()
                .map_err(|_| field_error(format!("{} is not a number: {text:?}", CSV_COLUMNS[i])))
        };
        let stock_text = record.get(11).unwrap_or_default();
        let stock = stock_text
            .parse()
            .map_err(|_| field_error(format!("stock is not a count: {stock_text:?}")))?;
        let mut attributes = BTreeMap::new();
        let flat = record.get(13).unwrap_or_default();
        for pair in flat.split(';').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| field_error(format!("attribute {pair:?} is not key=value")))?;
            attributes.insert(key.to_string(), value.to_string());
        }
        products.push(Product {
            sku: field(0),
            name: field(1),
            brand: field(2),
            category: field(3),
            color: field(4),
            material: field(5),
            width_cm: number(6)?,
            height_cm: number(7)?,
            depth_cm: number(8)?,
            dimensions: field(9),
            price: number(10)?,
            stock,
            description: field(12),
            attributes,
        });
    }
    Ok(products)
}

/// An RNG for one generation stage; separate streams keep the stages independent.
fn stage_rng(seed: u64, stage: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stage);
    rng
}

/// Picks one item of a non-empty static table.
fn pick<T: Copy, R: Rng>(rng: &mut R, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// The table entry of a category name.
fn category_spec(name: &str) -> Option<(usize, &'static CategorySpec)> {
    CATEGORIES.iter().enumerate().find(|(_, c)| c.name == name)
}

/// The whole number a value starts with: 13 for "13-inch", 350 for "350 ml".
fn leading_number(value: &str) -> Option<u32> {
    let end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    value[..end].parse().ok()
}

/// The largest laptop, in inches, that fits a product's face (`width` by `height` cm, either
/// way up) with a centimetre of padding on each side.
fn laptop_size(width: u32, height: u32) -> Option<u32> {
    let (long, short) = (width.max(height), width.min(height));
    LAPTOPS
        .iter()
        .rev()
        .find(|(_, w, d)| w + 2 <= long && d + 2 <= short)
        .map(|(inches, _, _)| *inches)
}

/// "a" or "an", by the first letter of the next word.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn generate_products(seed: u64, count: usize, vocabulary: Vocabulary) -> Vec<Product> {
    let mut rng = stage_rng(seed, 1);
    let mut taken = BTreeSet::new();
    let mut products = Vec::with_capacity(count);
    for i in 0..count {
        // Dealing products round-robin keeps the categories balanced for any count.
        let spec = &CATEGORIES[i % CATEGORIES.len()];
        let name = draw_name(&mut rng, spec, &mut taken, i, vocabulary);
        let brand = pick(&mut rng, spec.brands);
        let color = pick(&mut rng, spec.colours);
        let material = pick(&mut rng, spec.materials);
        let width = rng.random_range(spec.width.0..=spec.width.1);
        let height = rng.random_range(spec.height.0..=spec.height.1);
        let depth = rng.random_range(spec.depth.0..=spec.depth.1);
        let whole = rng.random_range(spec.price.0..=spec.price.1);
        let cents = pick(&mut rng, &[99u32, 49, 0, 95, 50]);
        let price = f64::from(whole * 100 + cents) / 100.0;
        let attributes = draw_attributes(&mut rng, spec, (width, height, depth));
        let dimensions = format!("{width} x {height} x {depth} cm");
        let features: Vec<String> = attributes
            .iter()
            .map(|(key, value)| format!("{} {value}", key.replace('_', " ")))
            .collect();
        let description = format!(
            "The {name} by {brand} is {article} {color} {material} {noun} measuring \
             {dimensions}. Features: {features}.",
            article = article(color),
            noun = spec.noun,
            features = features.join(", "),
        );
        products.push(Product {
            sku: format!("{}-{:05}", spec.sku_prefix, i + 1),
            name,
            brand: brand.to_string(),
            category: spec.name.to_string(),
            color: color.to_string(),
            material: material.to_string(),
            width_cm: f64::from(width),
            height_cm: f64::from(height),
            depth_cm: f64::from(depth),
            dimensions,
            price,
            stock: 0,
            description,
            attributes,
        });
    }
    products
}

/// Draws a product name not yet taken.
fn draw_name<R: Rng>(
    rng: &mut R,
    spec: &CategorySpec,
    taken: &mut BTreeSet<String>,
    index: usize,
    vocabulary: Vocabulary,
) -> String {
    let (first_words, second_words) = vocabulary.name_words();
    let mut last = String::new();
    for _ in 0..64 {
        let first = pick(rng, first_words);
        let kind = pick(rng, spec.types);
        let name = if rng.random_bool(0.35) {
            format!("{first} {kind}")
        } else {
            format!("{first} {} {kind}", pick(rng, second_words))
        };
        if taken.insert(name.clone()) {
            return name;
        }
        last = name;
    }
    // The word lists allow about 150,000 names; past that a catalog gets numbered names, which
    // are unique because the index is.
    let name = format!("{last} {}", index + 1);
    taken.insert(name.clone());
    name
}

fn draw_attributes<R: Rng>(
    rng: &mut R,
    spec: &CategorySpec,
    (width, height, depth): (u32, u32, u32),
) -> BTreeMap<String, String> {
    let mut attributes = BTreeMap::new();
    for attr in spec.attrs {
        // Presence and value are drawn for every attribute, so the number of draws per product
        // does not depend on earlier outcomes.
        let present = rng.random_bool(attr.presence);
        let value = match &attr.kind {
            AttrKind::Flag { yes_share } => Some(
                if rng.random_bool(*yes_share) {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
            ),
            AttrKind::Choice(values) => Some(pick(rng, values).to_string()),
            AttrKind::Number { values, format, .. } => {
                Some(format.replace("{}", &pick(rng, values).to_string()))
            }
            AttrKind::Laptop => laptop_size(width, height)
                .map(|inches| LAPTOP_FORMAT.replace("{}", &inches.to_string())),
            AttrKind::Litres => {
                let litres = (f64::from(width * height * depth) / 1000.0)
                    .round()
                    .max(1.0);
                Some(LITRES_FORMAT.replace("{}", &litres.to_string()))
            }
        };
        if let (true, Some(value)) = (present, value) {
            attributes.insert(attr.key.to_string(), value);
        }
    }
    // A wired headset has no battery.
    if attributes.get("connectivity").map(String::as_str) == Some("wired") {
        attributes.remove("battery_life");
    }
    attributes
}

fn generate_stock(seed: u64, products: &mut [Product], stores: &[Store]) -> Vec<StockRow> {
    let mut rng = stage_rng(seed, 2);
    let mut rows = Vec::with_capacity(products.len() * stores.len());
    for product in products.iter_mut() {
        let mut total = 0u32;
        for store in stores {
            let quantity = if rng.random_bool(0.2) {
                0
            } else {
                rng.random_range(1..=24)
            };
            let restock_date = if quantity <= LOW_STOCK {
                SNAPSHOT_DATE
                    .checked_add_days(Days::new(rng.random_range(3..=45)))
                    .map(|date| date.to_string())
            } else {
                None
            };
            total += quantity;
            rows.push(StockRow {
                sku: product.sku.clone(),
                store_id: store.id.clone(),
                quantity,
                restock_date,
            });
        }
        product.stock = total;
    }
    rows
}

/// A question before it gets its id and split.
/// `product` is the product the answer depends on, `None` for a store question.
fn draft(
    text: String,
    answers: Vec<String>,
    kind: QuestionKind,
    product: Option<&Product>,
) -> Question {
    Question {
        id: String::new(),
        solution: solution_for(kind, &text, product),
        question: text,
        answers,
        kind,
        split: Split::Train,
        skus: product.into_iter().map(|p| p.sku.clone()).collect(),
        tools: kind.tools().iter().map(|t| t.to_string()).collect(),
    }
}

/// The vocabulary's stores, each with an address and opening hours drawn from the seed.
fn generate_stores(seed: u64, vocabulary: Vocabulary) -> Vec<Store> {
    let mut rng = stage_rng(seed, 5);
    vocabulary
        .stores()
        .iter()
        .map(|(id, city)| {
            let number = rng.random_range(1..=120u32);
            let street = pick(&mut rng, STREETS);
            let weekdays = Hours {
                opens: pick(&mut rng, &[8, 9, 10]),
                closes: pick(&mut rng, &[18, 19, 20]),
            };
            let saturday = Hours {
                opens: pick(&mut rng, &[9, 10]),
                closes: pick(&mut rng, &[17, 18, 19]),
            };
            let sunday = Hours {
                opens: pick(&mut rng, &[10, 11]),
                closes: pick(&mut rng, &[16, 17]),
            };
            // Drawn for every store, like the Sunday hours, so the draws per store are fixed.
            let open_on_sunday = rng.random_bool(0.5);
            Store {
                id: (*id).to_string(),
                city: (*city).to_string(),
                address: format!("{number} {street}"),
                hours: Some(StoreHours {
                    weekdays,
                    saturday,
                    sunday: open_on_sunday.then_some(sunday),
                }),
            }
        })
        .collect()
}

/// Every accepted spelling of a whole hour: "9:00", "09:00", "9 am", "9am", "9:00 am"; "19:00",
/// "7 pm", "7pm", "7:00 pm".
fn hour_answers(hour: u8) -> Vec<String> {
    let (twelve, half) = match hour {
        0 | 24 => (12, "am"),
        1..=11 => (hour, "am"),
        12 => (12, "pm"),
        _ => (hour - 12, "pm"),
    };
    let mut answers = vec![format!("{hour}:00")];
    for answer in [
        format!("{hour:02}:00"),
        format!("{twelve} {half}"),
        format!("{twelve}{half}"),
        format!("{twelve}:00 {half}"),
    ] {
        if !answers.contains(&answer) {
            answers.push(answer);
        }
    }
    answers
}

/// The accepted answers to a store template, or `None` when the store lacks the fact.
fn store_answers(template: &str, store: &Store) -> Option<Vec<String>> {
    let hours = store.hours.as_ref();
    match template {
        WEEKDAY_OPENS_TEMPLATE => Some(hour_answers(hours?.weekdays.opens)),
        SATURDAY_CLOSES_TEMPLATE => Some(hour_answers(hours?.saturday.closes)),
        SUNDAY_OPEN_TEMPLATE => Some(vec![
            if hours?.sunday.is_some() { "yes" } else { "no" }.into(),
        ]),
        ADDRESS_TEMPLATE => (!store.address.is_empty()).then(|| vec![store.address.clone()]),
        _ => None,
    }
}

/// One question per store template and store; they need no draws.
fn store_questions(stores: &[Store]) -> Vec<Question> {
    let mut questions = Vec::new();
    for template in STORE_TEMPLATES {
        for store in stores {
            if let Some(answers) = store_answers(template, store) {
                let text = template.replace("{city}", &store.city);
                questions.push(draft(text, answers, QuestionKind::StoreInfo, None));
            }
        }
    }
    questions
}

fn generate_questions(seed: u64, dataset: &RetailDataset) -> Vec<Question> {
    let mut rng = stage_rng(seed, 3);
    let mut questions = single_hop_questions(&mut rng, &dataset.products);
    questions.extend(multi_hop_questions(&mut rng, &dataset.products));
    questions.extend(inventory_questions(&mut rng, dataset));
    questions.extend(store_questions(&dataset.stores));
    // Names are unique, so texts are too; this guards the invariant anyway.
    let mut seen = BTreeSet::new();
    questions.retain(|q| seen.insert(q.question.clone()));
    questions
}

/// A fact a single-hop question asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Material,
    Colour,
    Brand,
    Price,
    Width,
    /// `CATEGORIES[category].attrs[attr]`.
    Attr {
        category: usize,
        attr: usize,
    },
}

impl Field {
    fn template(self) -> &'static str {
        match self {
            Self::Material => MATERIAL_TEMPLATE,
            Self::Colour => COLOUR_TEMPLATE,
            Self::Brand => BRAND_TEMPLATE,
            Self::Price => PRICE_TEMPLATE,
            Self::Width => WIDTH_TEMPLATE,
            Self::Attr { category, attr } => CATEGORIES[category].attrs[attr].question,
        }
    }

    /// Every field, for parsing questions back.
    fn all() -> Vec<Field> {
        let mut fields = vec![
            Self::Material,
            Self::Colour,
            Self::Brand,
            Self::Price,
            Self::Width,
        ];
        for (category, spec) in CATEGORIES.iter().enumerate() {
            fields.extend((0..spec.attrs.len()).map(|attr| Self::Attr { category, attr }));
        }
        fields
    }

    /// The accepted answers for `product`, or `None` when the field does not apply to it.
    fn answers(self, product: &Product) -> Option<Vec<String>> {
        let answers = match self {
            Self::Material => vec![product.material.clone()],
            Self::Colour => vec![product.color.clone()],
            Self::Brand => vec![product.brand.clone()],
            Self::Price => price_answers(product.price),
            Self::Width => {
                let width = product.width_cm;
                ["{} cm", "{} centimetres", "{} centimeters", "{}"]
                    .iter()
                    .map(|form| form.replace("{}", &width.to_string()))
                    .collect()
            }
            Self::Attr { category, attr } => {
                let spec = &CATEGORIES[category];
                if spec.name != product.category {
                    return None;
                }
                let attr = &spec.attrs[attr];
                attr_answers(attr, product.attributes.get(attr.key)?)
            }
        };
        Some(with_variants(answers))
    }
}

/// "$129.99" and "129.99", plus "$129" and "129" for a whole-dollar price.
fn price_answers(price: f64) -> Vec<String> {
    let text = format!("{price:.2}");
    let mut answers = vec![format!("${text}"), text.clone()];
    if let Some(whole) = text.strip_suffix(".00") {
        answers.push(format!("${whole}"));
        answers.push(whole.to_string());
    }
    answers
}

fn attr_answers(attr: &AttrSpec, value: &str) -> Vec<String> {
    let alts: &[&str] = match &attr.kind {
        AttrKind::Flag { .. } | AttrKind::Choice(_) => &[],
        AttrKind::Number { alts, .. } => alts,
        AttrKind::Laptop => LAPTOP_ALTS,
        AttrKind::Litres => LITRES_ALTS,
    };
    let mut answers = vec![value.to_string()];
    if let Some(number) = leading_number(value) {
        answers.extend(
            alts.iter()
                .map(|alt| alt.replace("{}", &number.to_string())),
        );
    }
    answers
}

/// Adds the spelling with spaces for hyphens ("13 inch" for "13-inch"), since normalisation
/// deletes hyphens rather than splitting on them; drops duplicates, keeping order.
fn with_variants(answers: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for answer in answers {
        let spaced = answer.replace('-', " ");
        for candidate in [answer, spaced] {
            if !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out
}

fn single_hop_questions<R: Rng>(rng: &mut R, products: &[Product]) -> Vec<Question> {
    let mut order: Vec<usize> = (0..products.len()).collect();
    order.shuffle(rng);
    let mut questions = Vec::new();
    for &i in order.iter().take(SINGLE_HOP_TARGET) {
        let product = &products[i];
        let field = draw_field(rng, product);
        if let Some(answers) = field.answers(product) {
            let text = field.template().replace("{name}", &product.name);
            questions.push(draft(text, answers, QuestionKind::SingleHop, Some(product)));
        }
    }
    questions
}

fn draw_field<R: Rng>(rng: &mut R, product: &Product) -> Field {
    let roll = rng.random_range(0..100);
    let attrs: Vec<Field> = match category_spec(&product.category) {
        Some((category, spec)) => (0..spec.attrs.len())
            .filter(|&attr| product.attributes.contains_key(spec.attrs[attr].key))
            .map(|attr| Field::Attr { category, attr })
            .collect(),
        None => Vec::new(),
    };
    match roll {
        0..18 => Field::Material,
        18..36 => Field::Colour,
        36..48 => Field::Brand,
        48..63 => Field::Price,
        63..68 => Field::Width,
        _ if !attrs.is_empty() => pick(rng, &attrs),
        _ => Field::Material,
    }
}

/// One constraint of a multi-hop question; the category is implied by the question's noun.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Constraint {
    Colour(&'static str),
    Material(&'static str),
    Brand(&'static str),
    /// Price strictly below this many dollars.
    PriceUnder(u32),
    /// A test on `attrs[attr]` of the category.
    Attr {
        attr: usize,
        test: AttrTest,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AttrTest {
    /// The flag is "yes".
    Yes,
    /// The value equals this.
    Equals(&'static str),
    /// The value's number is at least this.
    AtLeast(u32),
}

impl Constraint {
    /// Position in the rendered question; constraints render sorted by it.
    fn slot(&self) -> usize {
        match self {
            Self::Colour(_) => 0,
            Self::Material(_) => 1,
            Self::Brand(_) => 2,
            Self::PriceUnder(_) => 3,
            Self::Attr { attr, .. } => 4 + attr,
        }
    }

    fn matches(&self, spec: &CategorySpec, product: &Product) -> bool {
        match self {
            Self::Colour(colour) => product.color == *colour,
            Self::Material(material) => product.material == *material,
            Self::Brand(brand) => product.brand == *brand,
            Self::PriceUnder(dollars) => product.price < f64::from(*dollars),
            Self::Attr { attr, test } => {
                let Some(value) = spec
                    .attrs
                    .get(*attr)
                    .and_then(|a| product.attributes.get(a.key))
                else {
                    return false;
                };
                match test {
                    AttrTest::Yes => value == "yes",
                    AttrTest::Equals(expected) => value == expected,
                    AttrTest::AtLeast(min) => leading_number(value).is_some_and(|n| n >= *min),
                }
            }
        }
    }
}

/// A multi-hop question: a category and constraints, in rendering order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MultiHop {
    category: usize,
    constraints: Vec<Constraint>,
}

impl MultiHop {
    fn spec(&self) -> &'static CategorySpec {
        &CATEGORIES[self.category]
    }

    fn matches(&self, product: &Product) -> bool {
        product.category == self.spec().name
            && self
                .constraints
                .iter()
                .all(|c| c.matches(self.spec(), product))
    }

    /// "Which black leather bag is made by Hollis and costs under $150?": colour and material
    /// go in front of the noun, every other constraint is a predicate joined by "and".
    fn render(&self) -> String {
        let spec = self.spec();
        let mut text = String::from("Which");
        let mut predicates = Vec::new();
        for constraint in &self.constraints {
            match constraint {
                Constraint::Colour(word) | Constraint::Material(word) => {
                    text.push(' ');
                    text.push_str(word);
                }
                Constraint::Brand(brand) => predicates.push(format!("is made by {brand}")),
                Constraint::PriceUnder(dollars) => {
                    predicates.push(format!("costs under ${dollars}"));
                }
                Constraint::Attr { attr, test } => {
                    let phrase = spec.attrs[*attr].phrase.unwrap_or_default();
                    predicates.push(match test {
                        AttrTest::Yes => phrase.to_string(),
                        AttrTest::Equals(value) => phrase.replace("{}", value),
                        AttrTest::AtLeast(n) => phrase.replace("{}", &n.to_string()),
                    });
                }
            }
        }
        text.push(' ');
        text.push_str(spec.noun);
        if !predicates.is_empty() {
            text.push(' ');
            text.push_str(&predicates.join(" and "));
        }
        text.push('?');
        text
    }

    /// Parses a rendered question back; the inverse of [`MultiHop::render`].
    fn parse(text: &str) -> Result<Self, String> {
        let body = text
            .strip_prefix("Which ")
            .and_then(|t| t.strip_suffix('?'))
            .ok_or("not of the form \"Which ...?\"")?;
        let words: Vec<&str> = body.split(' ').collect();
        let hits: Vec<(usize, usize)> = words
            .iter()
            .enumerate()
            .filter_map(|(at, word)| {
                CATEGORIES
                    .iter()
                    .position(|c| c.noun == *word)
                    .map(|category| (at, category))
            })
            .collect();
        let &[(at, category)] = hits.as_slice() else {
            return Err(format!("names {} product categories, not one", hits.len()));
        };
        let spec = &CATEGORIES[category];
        let mut constraints = parse_adjectives(spec, &words[..at].join(" "))?;
        let rest = words[at + 1..].join(" ");
        if !rest.is_empty() {
            for predicate in rest.split(" and ") {
                constraints.push(parse_predicate(spec, predicate)?);
            }
        }
        let parsed = Self {
            category,
            constraints,
        };
        // Rendering back catches anything the parser accepted loosely (order, spacing, repeats).
        if parsed.render() != text {
            return Err("is not in the canonical multi-hop form".into());
        }
        Ok(parsed)
    }
}

/// Parses "[colour] [material]" in front of the noun.
fn parse_adjectives(spec: &CategorySpec, left: &str) -> Result<Vec<Constraint>, String> {
    let mut constraints = Vec::new();
    let mut rest = left;
    // Longest first, so "matte grey" is not read as an unknown "matte" and a colour "grey".
    let mut colours = spec.colours.to_vec();
    colours.sort_by_key(|c| std::cmp::Reverse(c.len()));
    for colour in colours {
        if rest == colour {
            rest = "";
        } else if let Some(tail) = rest.strip_prefix(colour).and_then(|t| t.strip_prefix(' ')) {
            rest = tail;
        } else {
            continue;
        }
        constraints.push(Constraint::Colour(colour));
        break;
    }
    if !rest.is_empty() {
        let material = spec
            .materials
            .iter()
            .copied()
            .find(|m| *m == rest)
            .ok_or_else(|| format!("{rest:?} is no {} colour or material", spec.name))?;
        constraints.push(Constraint::Material(material));
    }
    Ok(constraints)
}

/// Parses one predicate: a brand, a price bound, or an attribute phrase that must be readable
/// in exactly one way.
fn parse_predicate(spec: &CategorySpec, phrase: &str) -> Result<Constraint, String> {
    if let Some(brand) = phrase.strip_prefix("is made by ") {
        return spec
            .brands
            .iter()
            .copied()
            .find(|b| *b == brand)
            .map(Constraint::Brand)
            .ok_or_else(|| format!("unknown {} brand {brand:?}", spec.name));
    }
    if let Some(amount) = phrase.strip_prefix("costs under $") {
        return amount
            .parse()
            .map(Constraint::PriceUnder)
            .map_err(|_| format!("price bound {amount:?} is not whole dollars"));
    }
    let mut found = Vec::new();
    for (attr, a) in spec.attrs.iter().enumerate() {
        let Some(template) = a.phrase else { continue };
        let test = match (template.split_once("{}"), &a.kind) {
            (None, AttrKind::Flag { .. }) => (phrase == template).then_some(AttrTest::Yes),
            (Some((pre, suf)), kind) => {
                let value = phrase.strip_prefix(pre).and_then(|t| t.strip_suffix(suf));
                match (value, kind) {
                    (Some(value), AttrKind::Choice(values)) => values
                        .iter()
                        .copied()
                        .find(|v| *v == value)
                        .map(AttrTest::Equals),
                    (
                        Some(value),
                        AttrKind::Number { .. } | AttrKind::Laptop | AttrKind::Litres,
                    ) => value.parse().ok().map(AttrTest::AtLeast),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(test) = test {
            found.push(Constraint::Attr { attr, test });
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(format!(
            "phrase {phrase:?} reads as {n} {} attributes",
            spec.name
        )),
    }
}

/// The constraints `target` satisfies that a multi-hop question may use.
fn candidate_constraints<R: Rng>(
    rng: &mut R,
    spec: &'static CategorySpec,
    target: &Product,
) -> Vec<Constraint> {
    let mut out = Vec::new();
    if let Some(colour) = spec.colours.iter().copied().find(|c| *c == target.color) {
        out.push(Constraint::Colour(colour));
    }
    if let Some(material) = spec
        .materials
        .iter()
        .copied()
        .find(|m| *m == target.material)
    {
        out.push(Constraint::Material(material));
    }
    if let Some(brand) = spec.brands.iter().copied().find(|b| *b == target.brand) {
        out.push(Constraint::Brand(brand));
    }
    // A round bound just above the price: steps of $5 below $50, then $10, $25 and $50.
    let cents = (target.price * 100.0).round() as u64;
    let step = match cents {
        0..5_000 => 5,
        5_000..10_000 => 10,
        10_000..30_000 => 25,
        _ => 50,
    };
    let bound = (cents / (step * 100) + 1) * step;
    if let Ok(bound) = u32::try_from(bound) {
        out.push(Constraint::PriceUnder(bound));
    }
    for (attr, a) in spec.attrs.iter().enumerate() {
        let (Some(_), Some(value)) = (a.phrase, target.attributes.get(a.key)) else {
            continue;
        };
        let test = match &a.kind {
            AttrKind::Flag { .. } => (value == "yes").then_some(AttrTest::Yes),
            AttrKind::Choice(values) => values
                .iter()
                .copied()
                .find(|v| v == value)
                .map(AttrTest::Equals),
            AttrKind::Number { values, .. } => leading_number(value).map(|n| {
                // Half the time ask for the next lower value, so "at least" is not always
                // an equality in disguise.
                let lower = values.iter().copied().filter(|v| *v < n).max();
                AttrTest::AtLeast(match lower {
                    Some(lower) if rng.random_bool(0.5) => lower,
                    _ => n,
                })
            }),
            AttrKind::Laptop => leading_number(value).map(AttrTest::AtLeast),
            AttrKind::Litres => leading_number(value)
                .map(|n| AttrTest::AtLeast(if n >= 10 { n / 5 * 5 } else { n })),
        };
        if let Some(test) = test {
            out.push(Constraint::Attr { attr, test });
        }
    }
    out
}

fn multi_hop_questions<R: Rng>(rng: &mut R, products: &[Product]) -> Vec<Question> {
    let mut by_category: Vec<Vec<&Product>> = vec![Vec::new(); CATEGORIES.len()];
    for product in products {
        if let Some((category, _)) = category_spec(&product.category) {
            by_category[category].push(product);
        }
    }
    let mut order: Vec<usize> = (0..products.len()).collect();
    order.shuffle(rng);
    let mut questions = Vec::new();
    for i in order {
        if questions.len() == MULTI_HOP_TARGET {
            break;
        }
        let target = &products[i];
        let Some((category, spec)) = category_spec(&target.category) else {
            continue;
        };
        let mut candidates = candidate_constraints(rng, spec, target);
        candidates.shuffle(rng);
        // Greedy: keep a constraint only when it rules products out, until the target is alone.
        let mut matching = by_category[category].clone();
        let mut chosen: Vec<Constraint> = Vec::new();
        for constraint in candidates {
            if chosen.len() == MAX_CONSTRAINTS || (matching.len() == 1 && chosen.len() >= 2) {
                break;
            }
            let next: Vec<&Product> = matching
                .iter()
                .copied()
                .filter(|p| constraint.matches(spec, p))
                .collect();
            if next.len() < matching.len() {
                chosen.push(constraint);
                matching = next;
            }
        }
        let unique = matches!(matching.as_slice(), [only] if only.sku == target.sku);
        // A question needs a verb, so at least one constraint must be a predicate.
        let has_predicate = chosen
            .iter()
            .any(|c| !matches!(c, Constraint::Colour(_) | Constraint::Material(_)));
        if !unique || chosen.len() < 2 || !has_predicate {
            continue;
        }
        chosen.sort_by_key(Constraint::slot);
        let question = MultiHop {
            category,
            constraints: chosen,
        };
        questions.push(draft(
            question.render(),
            vec![target.name.clone()],
            QuestionKind::MultiHop,
            Some(target),
        ));
    }
    questions
}

/// Fills an inventory template with a product name and a city.
fn fill(template: &str, name: &str, city: &str) -> String {
    template.replace("{name}", name).replace("{city}", city)
}

/// The accepted answers to an inventory template for one stock row.
fn inventory_answers(template: &str, row: &StockRow) -> Option<Vec<String>> {
    match template {
        IN_STOCK_TEMPLATE => Some(vec![
            if row.quantity > 0 { "yes" } else { "no" }.to_string(),
        ]),
        COUNT_TEMPLATE => Some(vec![row.quantity.to_string()]),
        RESTOCK_TEMPLATE => row.restock_date.clone().map(|date| vec![date]),
        _ => None,
    }
}

fn inventory_questions<R: Rng>(rng: &mut R, dataset: &RetailDataset) -> Vec<Question> {
    let products: BTreeMap<&str, &Product> = dataset
        .products
        .iter()
        .map(|p| (p.sku.as_str(), p))
        .collect();
    let cities: BTreeMap<&str, &str> = dataset
        .stores
        .iter()
        .map(|s| (s.id.as_str(), s.city.as_str()))
        .collect();
    let shuffled = |rng: &mut R, keep: &dyn Fn(&StockRow) -> bool| {
        let mut rows: Vec<&StockRow> = dataset.stock.iter().filter(|r| keep(r)).collect();
        rows.shuffle(rng);
        rows
    };
    let in_stock = shuffled(rng, &|r| r.quantity > 0);
    let out_of_stock = shuffled(rng, &|r| r.quantity == 0);
    let any = shuffled(rng, &|_| true);
    let restocking = shuffled(rng, &|r| r.restock_date.is_some());
    let half = IN_STOCK_TARGET / 2;
    let plan: [(&str, &[&StockRow], usize); 4] = [
        (IN_STOCK_TEMPLATE, &in_stock, half),
        (IN_STOCK_TEMPLATE, &out_of_stock, IN_STOCK_TARGET - half),
        (COUNT_TEMPLATE, &any, COUNT_TARGET),
        (RESTOCK_TEMPLATE, &restocking, RESTOCK_TARGET),
    ];
    let mut questions = Vec::new();
    for (template, rows, count) in plan {
        for row in rows.iter().take(count) {
            let (Some(product), Some(city)) = (
                products.get(row.sku.as_str()),
                cities.get(row.store_id.as_str()),
            ) else {
                continue;
            };
            if let Some(answers) = inventory_answers(template, row) {
                questions.push(draft(
                    fill(template, &product.name, city),
                    answers,
                    QuestionKind::Inventory,
                    Some(product),
                ));
            }
        }
    }
    questions
}

/// Marks a `fraction` of each kind held out, chosen by the seed.
fn assign_splits(seed: u64, questions: &mut [Question], fraction: f64) {
    let mut rng = stage_rng(seed, 4);
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    for kind in QuestionKind::ALL {
        let mut positions: Vec<usize> = (0..questions.len())
            .filter(|&i| questions[i].kind == kind)
            .collect();
        positions.shuffle(&mut rng);
        let held = (positions.len() as f64 * fraction).round() as usize;
        for (rank, &i) in positions.iter().enumerate() {
            questions[i].split = if rank < held {
                Split::Heldout
            } else {
                Split::Train
            };
        }
    }
}

/// Lookup tables over a data set, for verification.
struct Index<'a> {
    by_sku: BTreeMap<&'a str, &'a Product>,
    by_name: BTreeMap<&'a str, &'a Product>,
    by_category: BTreeMap<&'a str, Vec<&'a Product>>,
    store_by_id: BTreeMap<&'a str, &'a Store>,
    store_by_city: BTreeMap<&'a str, &'a Store>,
    stock: BTreeMap<(&'a str, &'a str), &'a StockRow>,
}

impl<'a> Index<'a> {
    fn new(dataset: &'a RetailDataset) -> Self {
        let mut by_category: BTreeMap<&str, Vec<&Product>> = BTreeMap::new();
        for product in &dataset.products {
            by_category
                .entry(product.category.as_str())
                .or_default()
                .push(product);
        }
        Self {
            by_sku: dataset
                .products
                .iter()
                .map(|p| (p.sku.as_str(), p))
                .collect(),
            by_name: dataset
                .products
                .iter()
                .map(|p| (p.name.as_str(), p))
                .collect(),
            by_category,
            store_by_id: dataset.stores.iter().map(|s| (s.id.as_str(), s)).collect(),
            store_by_city: dataset
                .stores
                .iter()
                .map(|s| (s.city.as_str(), s))
                .collect(),
            stock: dataset
                .stock
                .iter()
                .map(|r| ((r.sku.as_str(), r.store_id.as_str()), r))
                .collect(),
        }
    }

    /// Recomputes a question's answers, SKUs and tools from its text, and compares.
    fn check_question(&self, q: &Question) -> Result<(), String> {
        let with_product = |(answers, product)| (answers, Some(product));
        let (expected, product): (Vec<String>, Option<&Product>) = match q.kind {
            QuestionKind::SingleHop => with_product(self.single_hop(&q.question)?),
            QuestionKind::MultiHop => with_product(self.multi_hop(&q.question)?),
            QuestionKind::Inventory => with_product(self.inventory(&q.question)?),
            QuestionKind::StoreInfo => (self.store_info(&q.question)?, None),
        };
        if q.answers.is_empty() {
            return Err("has no gold answer".into());
        }
        let accepted: BTreeSet<String> = expected.iter().map(|a| normalize_answer(a)).collect();
        for answer in &q.answers {
            let normal = normalize_answer(answer);
            if normal.is_empty() || normal.split(' ').count() > MAX_ANSWER_WORDS {
                return Err(format!("gold answer {answer:?} is empty or too long"));
            }
            if !accepted.contains(&normal) {
                return Err(format!(
                    "gold answer {answer:?} does not match the data (expected {expected:?})"
                ));
            }
        }
        let skus: Vec<&str> = product.map(|p| p.sku.as_str()).into_iter().collect();
        if q.skus != skus {
            return Err(format!("lists SKUs {:?}, expected {skus:?}", q.skus));
        }
        let tools = q.kind.tools();
        if q.tools != tools {
            return Err(format!("lists tools {:?}, expected {tools:?}", q.tools));
        }
        let solution = solution_for(q.kind, &q.question, product);
        if q.solution != solution {
            return Err(format!(
                "has the solution {:?}, expected {solution:?}",
                q.solution
            ));
        }
        Ok(())
    }

    fn single_hop(&self, text: &str) -> Result<(Vec<String>, &'a Product), String> {
        let mut readings = Vec::new();
        for field in Field::all() {
            let Some(name) = match_template(field.template(), text) else {
                continue;
            };
            let Some(product) = self.by_name.get(name) else {
                continue;
            };
            if let Some(answers) = field.answers(product) {
                readings.push((answers, *product));
            }
        }
        match readings.len() {
            1 => Ok(readings.remove(0)),
            n => Err(format!(
                "reads as {n} single-hop questions about the catalog, not one"
            )),
        }
    }

    fn multi_hop(&self, text: &str) -> Result<(Vec<String>, &'a Product), String> {
        let question = MultiHop::parse(text)?;
        let candidates = self
            .by_category
            .get(question.spec().name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let matching: Vec<&Product> = candidates
            .iter()
            .copied()
            .filter(|p| question.matches(p))
            .collect();
        match matching.as_slice() {
            [only] => Ok((vec![only.name.clone()], *only)),
            other => Err(format!(
                "{} products satisfy the constraints, not one",
                other.len()
            )),
        }
    }

    fn inventory(&self, text: &str) -> Result<(Vec<String>, &'a Product), String> {
        let (template, name, city) =
            match_inventory(text).ok_or("matches no inventory question template")?;
        let product = self
            .by_name
            .get(name)
            .ok_or_else(|| format!("no product is named {name:?}"))?;
        let store = self
            .store_by_city
            .get(city)
            .ok_or_else(|| format!("no store is in {city:?}"))?;
        let row = self
            .stock
            .get(&(product.sku.as_str(), store.id.as_str()))
            .ok_or_else(|| format!("no stock row for {} in {}", product.sku, store.id))?;
        let answers = inventory_answers(template, row)
            .ok_or_else(|| format!("{} has no restock date in {city}", product.name))?;
        Ok((answers, *product))
    }

    fn store_info(&self, text: &str) -> Result<Vec<String>, String> {
        for template in STORE_TEMPLATES {
            let Some(city) = match_slot(template, "{city}", text) else {
                continue;
            };
            let store = self
                .store_by_city
                .get(city)
                .ok_or_else(|| format!("no store is in {city:?}"))?;
            return store_answers(template, store)
                .ok_or_else(|| format!("the {city} store lacks the fact asked for"));
        }
        Err("matches no store question template".into())
    }
}

/// The `{name}` of `text` if it is `template` filled in.
fn match_template<'t>(template: &str, text: &'t str) -> Option<&'t str> {
    match_slot(template, "{name}", text)
}

/// What fills `slot` in `text` if it is `template` filled in.
fn match_slot<'t>(template: &str, slot: &str, text: &'t str) -> Option<&'t str> {
    let (prefix, suffix) = template.split_once(slot)?;
    let value = text.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!value.is_empty()).then_some(value)
}

/// The `{name}` and `{city}` of `text` if it is `template` filled in.
fn match_two<'t>(template: &str, text: &'t str) -> Option<(&'t str, &'t str)> {
    let (prefix, rest) = template.split_once("{name}")?;
    let (middle, suffix) = rest.split_once("{city}")?;
    let inner = text.strip_prefix(prefix)?.strip_suffix(suffix)?;
    // City names never contain the middle text, so the last occurrence is the separator.
    let (name, city) = inner.rsplit_once(middle)?;
    (!name.is_empty() && !city.is_empty()).then_some((name, city))
}

fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<(), DemoError> {
    let write_error = |source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut out = BufWriter::new(File::create(path).map_err(write_error)?);
    for item in items {
        serde_json::to_writer(&mut out, item).map_err(|source| DemoError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
        out.write_all(b"\n").map_err(write_error)?;
    }
    out.flush().map_err(write_error)
}

fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, DemoError> {
    let read_error = |source| DemoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(read_error)?);
    let mut items = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(read_error)?;
        if line.trim().is_empty() {
            continue;
        }
        items.push(
            serde_json::from_str(&line).map_err(|source| DemoError::Json {
                path: path.to_path_buf(),
                line: n + 1,
                source,
            })?,
        );
    }
    Ok(items)
}

fn write_catalog_csv(path: &Path, products: &[Product]) -> Result<(), DemoError> {
    let csv_error = |source| DemoError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(|source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let mut writer = csv::Writer::from_writer(BufWriter::new(file));
    writer.write_record(CSV_COLUMNS).map_err(csv_error)?;
    for p in products {
        let attributes: Vec<String> = p
            .attributes
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        writer
            .write_record([
                p.sku.as_str(),
                &p.name,
                &p.brand,
                &p.category,
                &p.color,
                &p.material,
                &p.width_cm.to_string(),
                &p.height_cm.to_string(),
                &p.depth_cm.to_string(),
                &p.dimensions,
                &format!("{:.2}", p.price),
                &p.stock.to_string(),
                &p.description,
                &attributes.join(";"),
            ])
            .map_err(csv_error)?;
    }
    writer.flush().map_err(|source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn dataset(seed: u64) -> RetailDataset {
        generate(&GeneratorConfig {
            seed,
            ..GeneratorConfig::default()
        })
    }

    /// Each data set file's name and bytes.
    type FileBytes = Vec<(String, Vec<u8>)>;

    fn read_dir_bytes(dir: &Path) -> Result<FileBytes, Box<dyn std::error::Error>> {
        let files = DatasetFiles::in_dir(dir);
        let mut out = Vec::new();
        for path in [
            files.catalog_jsonl,
            files.catalog_csv,
            files.stores,
            files.stock,
            files.questions,
        ] {
            let name = path.file_name().ok_or("no file name")?;
            out.push((name.to_string_lossy().into_owned(), fs::read(&path)?));
        }
        Ok(out)
    }

    #[test]
    fn same_seed_gives_identical_files_and_another_seed_differs() -> TestResult {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        let c = tempfile::tempdir()?;
        dataset(7).write_to(a.path())?;
        dataset(7).write_to(b.path())?;
        dataset(8).write_to(c.path())?;
        let (a, b, c) = (
            read_dir_bytes(a.path())?,
            read_dir_bytes(b.path())?,
            read_dir_bytes(c.path())?,
        );
        assert_eq!(a, b);
        for ((name, first), (_, other)) in a.iter().zip(&c) {
            // The cities are fixed, but addresses and opening hours depend on the seed too.
            assert_ne!(first, other, "{name} did not change with the seed");
        }
        Ok(())
    }

    #[test]
    fn counts_kinds_splits_and_categories() {
        let data = dataset(42);
        assert!(data.products.len() >= 2000);
        assert_eq!(data.products.len(), 2400);
        assert!(
            data.questions.len() >= 300,
            "{} questions",
            data.questions.len()
        );
        assert!(data.stores.len() >= 8);
        let categories: BTreeSet<&str> =
            data.products.iter().map(|p| p.category.as_str()).collect();
        assert_eq!(categories.len(), 8);
        for kind in QuestionKind::ALL {
            let of_kind: Vec<&Question> =
                data.questions.iter().filter(|q| q.kind == kind).collect();
            let held = of_kind.iter().filter(|q| q.split == Split::Heldout).count();
            if kind == QuestionKind::StoreInfo {
                // Every store template for every store: all stores have every fact.
                assert_eq!(of_kind.len(), STORE_TEMPLATES.len() * data.stores.len());
            } else {
                assert!(of_kind.len() >= 60, "{} {kind:?} questions", of_kind.len());
            }
            // Stratified: each kind holds out a quarter, rounded.
            assert_eq!(
                held,
                (of_kind.len() as f64 * 0.25).round() as usize,
                "{kind:?}"
            );
        }
        let yes = data
            .questions
            .iter()
            .filter(|q| q.answers == ["yes"] && q.kind == QuestionKind::Inventory)
            .count();
        let no = data
            .questions
            .iter()
            .filter(|q| q.answers == ["no"] && q.kind == QuestionKind::Inventory)
            .count();
        assert!(yes >= 20 && no >= 20, "yes {yes}, no {no}");
    }

    #[test]
    fn names_are_unique_short_and_mentioned() {
        let data = dataset(42);
        let names: BTreeSet<&str> = data.products.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), data.products.len());
        let skus: BTreeSet<&str> = data.products.iter().map(|p| p.sku.as_str()).collect();
        assert_eq!(skus.len(), data.products.len());
        for p in &data.products {
            let words = p.name.split(' ').count();
            assert!((2..=3).contains(&words), "{}", p.name);
        }
        let by_sku: BTreeMap<&str, &Product> =
            data.products.iter().map(|p| (p.sku.as_str(), p)).collect();
        for q in &data.questions {
            for sku in &q.skus {
                let product = by_sku[sku.as_str()];
                match q.kind {
                    QuestionKind::MultiHop => assert!(q.answers.contains(&product.name)),
                    _ => assert!(q.question.contains(&product.name), "{}", q.question),
                }
            }
        }
    }

    #[test]
    fn generated_data_set_verifies() -> TestResult {
        for seed in [1, 42, 2025] {
            dataset(seed).verify()?;
        }
        Ok(())
    }

    /// Checks gold answers with logic independent of the templates: the first answer must be a
    /// fact of the product the question names, or of its stock row in the named city.
    #[test]
    fn gold_answers_match_catalog_and_stock_independently() {
        let data = dataset(42);
        let by_sku: BTreeMap<&str, &Product> =
            data.products.iter().map(|p| (p.sku.as_str(), p)).collect();
        for q in &data.questions {
            let first = &q.answers[0];
            if q.kind == QuestionKind::StoreInfo {
                let store = data
                    .stores
                    .iter()
                    .find(|s| q.question.contains(&format!("the {} store", s.city)))
                    .unwrap_or_else(|| panic!("no store in {}", q.question));
                let hours = store.hours.unwrap();
                let expected = if q.question.contains("open on weekdays") {
                    format!("{}:00", hours.weekdays.opens)
                } else if q.question.contains("close on Saturdays") {
                    format!("{}:00", hours.saturday.closes)
                } else if q.question.contains("open on Sundays") {
                    (if hours.sunday.is_some() { "yes" } else { "no" }).to_string()
                } else {
                    store.address.clone()
                };
                assert_eq!(first, &expected, "{}", q.question);
                assert!(q.skus.is_empty(), "{}", q.question);
                continue;
            }
            let product = by_sku[q.skus[0].as_str()];
            match q.kind {
                QuestionKind::SingleHop => {
                    let price = format!("${:.2}", product.price);
                    let width = format!("{} cm", product.width_cm);
                    let mut facts = vec![
                        &product.material,
                        &product.color,
                        &product.brand,
                        &price,
                        &width,
                    ];
                    facts.extend(product.attributes.values());
                    assert!(facts.contains(&first), "{}: {first}", q.question);
                }
                QuestionKind::MultiHop => assert_eq!(first, &product.name),
                QuestionKind::Inventory => {
                    let store = data
                        .stores
                        .iter()
                        .find(|s| q.question.contains(&format!("the {} store", s.city)))
                        .map(|s| s.id.clone());
                    let row = data
                        .stock
                        .iter()
                        .find(|r| r.sku == product.sku && Some(&r.store_id) == store.as_ref());
                    let Some(row) = row else {
                        panic!("no stock row for {}", q.question);
                    };
                    let expected = if q.question.starts_with("Is the") {
                        (if row.quantity > 0 { "yes" } else { "no" }).to_string()
                    } else if q.question.starts_with("How many") {
                        row.quantity.to_string()
                    } else {
                        row.restock_date.clone().unwrap_or_default()
                    };
                    assert_eq!(first, &expected, "{}", q.question);
                }
                QuestionKind::StoreInfo => unreachable!("store questions were checked above"),
            }
        }
    }

    #[test]
    fn multi_hop_questions_have_exactly_one_match_and_round_trip() -> TestResult {
        let data = dataset(42);
        let mut seen = 0;
        for q in data
            .questions
            .iter()
            .filter(|q| q.kind == QuestionKind::MultiHop)
        {
            let parsed = MultiHop::parse(&q.question)?;
            assert!(parsed.constraints.len() >= 2, "{}", q.question);
            assert_eq!(parsed.render(), q.question);
            let matching: Vec<&Product> =
                data.products.iter().filter(|p| parsed.matches(p)).collect();
            assert_eq!(matching.len(), 1, "{}", q.question);
            assert_eq!(matching[0].name, q.answers[0]);
            seen += 1;
        }
        assert!(seen >= 100, "{seen} multi-hop questions");
        Ok(())
    }

    #[test]
    fn catalog_and_inventory_questions_carry_their_tool_calls_as_solution() -> TestResult {
        let data = dataset(42);
        let by_sku: BTreeMap<&str, &Product> =
            data.products.iter().map(|p| (p.sku.as_str(), p)).collect();
        for q in &data.questions {
            let inputs: Vec<(&str, &str)> = q
                .solution
                .iter()
                .map(|s| (s.tool.as_str(), s.input.as_str()))
                .collect();
            match q.kind {
                QuestionKind::SingleHop => {
                    let product = by_sku[q.skus[0].as_str()];
                    assert_eq!(inputs, [(TOOL_CATALOG, product.name.as_str())]);
                }
                QuestionKind::MultiHop => {
                    assert_eq!(inputs, [(TOOL_CATALOG, q.question.as_str())]);
                }
                QuestionKind::Inventory => {
                    let product = by_sku[q.skus[0].as_str()];
                    let [(TOOL_CATALOG, name), (TOOL_INVENTORY, arguments)] = inputs.as_slice()
                    else {
                        panic!("{q:?}");
                    };
                    assert_eq!(*name, product.name);
                    let city = data
                        .stores
                        .iter()
                        .map(|s| s.city.as_str())
                        .find(|city| q.question.contains(&format!(" the {city} store")))
                        .ok_or("no city in the question")?;
                    let arguments: serde_json::Value = serde_json::from_str(arguments)?;
                    assert_eq!(
                        arguments,
                        serde_json::json!({
                            "query": "stock_in_store",
                            "product_name": product.name,
                            "city": city,
                        })
                    );
                }
                QuestionKind::StoreInfo => assert!(inputs.is_empty()),
            }
        }

        // A solution that does not follow from the question is refused like a wrong answer.
        assert!(refused_after_single_hop_edit(&data, |q| {
            q.solution[0].input = "another product".into();
        })?);
        Ok(())
    }

    /// Whether verification refuses a copy of `data` whose first single-hop question `edit`
    /// changed.
    fn refused_after_single_hop_edit(
        data: &RetailDataset,
        edit: impl FnOnce(&mut Question),
    ) -> Result<bool, Box<dyn std::error::Error>> {
        let mut changed = data.clone();
        let q = changed
            .questions
            .iter_mut()
            .find(|q| q.kind == QuestionKind::SingleHop)
            .ok_or("no single-hop question")?;
        edit(q);
        Ok(matches!(
            changed.verify(),
            Err(DemoError::InvalidQuestion { .. })
        ))
    }

    #[test]
    fn verify_rejects_wrong_answers_ambiguity_and_bad_stock() -> TestResult {
        let data = dataset(42);

        assert!(refused_after_single_hop_edit(&data, |q| {
            q.answers = vec!["definitely not it".into()];
        })?);

        // A twin of a multi-hop answer (same facts, new name) makes the question ambiguous.
        let mut ambiguous = data.clone();
        let q = data
            .questions
            .iter()
            .find(|q| q.kind == QuestionKind::MultiHop)
            .ok_or("no multi-hop question")?;
        let mut twin = data
            .products
            .iter()
            .find(|p| p.sku == q.skus[0])
            .ok_or("unknown SKU")?
            .clone();
        twin.sku = "TWIN-00001".into();
        twin.name = "Twin Test Tote".into();
        twin.stock = 0;
        for store in &data.stores {
            ambiguous.stock.push(StockRow {
                sku: twin.sku.clone(),
                store_id: store.id.clone(),
                quantity: 0,
                restock_date: Some("2025-07-01".into()),
            });
        }
        ambiguous.products.push(twin);
        let error = ambiguous
            .verify()
            .err()
            .ok_or("ambiguous question accepted")?;
        assert!(error.to_string().contains("2 products satisfy"), "{error}");

        let mut inventory = data.clone();
        let q = inventory
            .questions
            .iter_mut()
            .find(|q| q.kind == QuestionKind::Inventory && q.question.starts_with("How many"))
            .ok_or("no count question")?;
        q.answers = vec!["999".into()];
        assert!(inventory.verify().is_err());

        let mut stock = data.clone();
        stock.stock[0].quantity += 1;
        assert!(matches!(
            stock.verify(),
            Err(DemoError::InvalidDataset { .. })
        ));
        Ok(())
    }

    #[test]
    fn store_rows_sum_to_product_stock() {
        let data = dataset(42);
        assert_eq!(data.stock.len(), data.products.len() * data.stores.len());
        let mut sums: BTreeMap<&str, u32> = BTreeMap::new();
        for row in &data.stock {
            *sums.entry(row.sku.as_str()).or_default() += row.quantity;
            if row.quantity == 0 {
                assert!(row.restock_date.is_some());
            }
        }
        for p in &data.products {
            assert_eq!(sums[p.sku.as_str()], p.stock, "{}", p.sku);
        }
        assert!(data.stock.iter().any(|r| r.quantity == 0));
    }

    #[test]
    fn csv_and_jsonl_round_trip() -> TestResult {
        let data = dataset(3);
        let dir = tempfile::tempdir()?;
        let files = data.write_to(dir.path())?;
        assert_eq!(read_products_jsonl(&files.catalog_jsonl)?, data.products);
        assert_eq!(read_products_csv(&files.catalog_csv)?, data.products);
        assert_eq!(read_questions(&files.questions)?, data.questions);
        assert_eq!(read_stores_jsonl(&files.stores)?, data.stores);
        assert_eq!(read_stock_jsonl(&files.stock)?, data.stock);
        let back = RetailDataset::read_from(dir.path())?;
        assert_eq!(back, data);
        back.verify()?;
        let csv = fs::read_to_string(&files.catalog_csv)?;
        assert!(csv.starts_with("sku,name,brand,"));
        assert!(csv.contains("capacity="));
        let first = fs::read_to_string(&files.questions)?;
        assert!(first.contains("\"kind\":\"single_hop\""));
        assert!(first.contains("\"split\":\"heldout\""));
        Ok(())
    }

    #[test]
    fn unwritable_or_missing_paths_give_errors_naming_the_path() -> TestResult {
        let dir = tempfile::tempdir()?;
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, "a file where a directory should be")?;
        let target = blocker.join("out");
        let error = dataset(1)
            .write_to(&target)
            .err()
            .ok_or("writing under a file succeeded")?;
        assert!(matches!(error, DemoError::CreateDir { .. }));
        assert!(
            error.to_string().contains(&target.display().to_string()),
            "{error}"
        );

        let missing = dir.path().join("missing.jsonl");
        let error = read_questions(&missing)
            .err()
            .ok_or("read a missing file")?;
        assert!(error.to_string().contains("missing.jsonl"), "{error}");

        let bad = dir.path().join("bad.jsonl");
        fs::write(&bad, "{\"id\": 1}\n")?;
        let error = read_questions(&bad).err().ok_or("read a bad file")?;
        assert!(error.to_string().contains("bad.jsonl:1"), "{error}");
        Ok(())
    }

    #[test]
    fn small_catalogs_still_generate_verified_data() -> TestResult {
        for products in [0, 1, 40, 200] {
            let data = generate(&GeneratorConfig {
                seed: 5,
                products,
                heldout_fraction: 0.5,
                ..GeneratorConfig::default()
            });
            assert_eq!(data.products.len(), products);
            data.verify()?;
        }
        Ok(())
    }

    #[test]
    fn the_alternate_vocabulary_shares_no_name_or_city_and_verifies() {
        let standard: BTreeSet<&str> = NAME_FIRST.iter().chain(NAME_SECOND).copied().collect();
        let alternate: BTreeSet<&str> = ALT_NAME_FIRST
            .iter()
            .chain(ALT_NAME_SECOND)
            .copied()
            .collect();
        assert_eq!(
            alternate.len(),
            ALT_NAME_FIRST.len() + ALT_NAME_SECOND.len()
        );
        assert!(standard.is_disjoint(&alternate));
        let cities: BTreeSet<&str> = STORES.iter().map(|s| s.1).collect();
        assert!(ALT_STORES.iter().all(|s| !cities.contains(s.1)));
        let data = generate(&GeneratorConfig {
            seed: 7,
            products: 240,
            vocabulary: Vocabulary::Alternate,
            ..GeneratorConfig::default()
        });
        data.verify().unwrap();
        let words: BTreeSet<&str> = data
            .products
            .iter()
            .flat_map(|p| p.name.split(' '))
            .collect();
        assert!(words.iter().all(|w| !standard.contains(w)), "{words:?}");
        assert!(data.questions.len() > 50);
    }

    #[test]
    fn vocabulary_tables_parse_unambiguously() {
        let first: BTreeSet<&str> = NAME_FIRST.iter().copied().collect();
        assert_eq!(first.len(), NAME_FIRST.len());
        assert!(NAME_SECOND.iter().all(|w| !first.contains(w)));
        let nouns: Vec<&str> = CATEGORIES.iter().map(|c| c.noun).collect();
        for spec in CATEGORIES {
            for colour in spec.colours {
                assert!(!spec.materials.contains(colour), "{colour}");
                assert!(!nouns.contains(colour));
            }
            for attr in spec.attrs {
                if let Some(phrase) = attr.phrase {
                    assert!(!phrase.contains(" and "), "{phrase}");
                }
            }
            // Every colour and material pair renders and parses back.
            for colour in spec.colours {
                for material in spec.materials {
                    let category = CATEGORIES
                        .iter()
                        .position(|c| c.name == spec.name)
                        .unwrap_or_default();
                    let question = MultiHop {
                        category,
                        constraints: vec![
                            Constraint::Colour(colour),
                            Constraint::Material(material),
                        ],
                    };
                    assert_eq!(MultiHop::parse(&question.render()), Ok(question));
                }
            }
        }
    }

    #[test]
    fn answer_helpers() {
        assert_eq!(leading_number("350 ml"), Some(350));
        assert_eq!(leading_number("yes"), None);
        assert_eq!(laptop_size(31, 20), None);
        assert_eq!(laptop_size(35, 25), Some(14));
        assert_eq!(laptop_size(30, 40), Some(16));
        assert_eq!(article("olive"), "an");
        assert_eq!(price_answers(129.0), ["$129.00", "129.00", "$129", "129"]);
    }
}
