//! The catalog record and the JSONL and CSV readers that stream records out of catalog files.
//!
//! The record mirrors the retail generator's `Product` field for field, but every field besides
//! `sku` and `name` is optional and unknown fields are ignored, so catalogs written by other
//! tools index too. Readers stream: a catalog is never held in memory whole, and a bad record
//! stops the read with an error naming the file and the line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{CatalogError, Result};

/// Longest SKU accepted, in characters; a longer one is a corrupt record, not a product code.
const MAX_SKU_CHARS: usize = 128;

/// One product of the catalog.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Product {
    /// Stock-keeping unit, unique in the catalog (compared case-insensitively), e.g. `"BAG-00017"`.
    pub sku: String,
    /// Product name, e.g. `"Aurora Tote"`.
    pub name: String,
    /// Brand.
    #[serde(default, deserialize_with = "null_as_default")]
    pub brand: String,
    /// Category, e.g. `"bags"`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub category: String,
    /// Colour.
    #[serde(default, deserialize_with = "null_as_default")]
    pub color: String,
    /// Main material.
    #[serde(default, deserialize_with = "null_as_default")]
    pub material: String,
    /// Width in centimetres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width_cm: Option<f64>,
    /// Height in centimetres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height_cm: Option<f64>,
    /// Depth in centimetres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth_cm: Option<f64>,
    /// The dimensions as text, e.g. `"38 x 30 x 12 cm"`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub dimensions: String,
    /// Price in US dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    /// Units in stock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stock: Option<u32>,
    /// Free-text description.
    #[serde(default, deserialize_with = "null_as_default")]
    pub description: String,
    /// Further attributes, e.g. `laptop_size = "13-inch"`. Numbers and booleans in JSON are
    /// kept as their text.
    #[serde(default, deserialize_with = "attribute_values")]
    pub attributes: BTreeMap<String, String>,
}

impl Product {
    /// Checks that the product can be indexed: a non-empty SKU of at most 128 characters, a
    /// non-empty name, and finite, non-negative numbers.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.sku.trim().is_empty() {
            return Err("the sku is empty".into());
        }
        if self.sku.chars().count() > MAX_SKU_CHARS {
            return Err(format!("the sku is longer than {MAX_SKU_CHARS} characters"));
        }
        if self.name.trim().is_empty() {
            return Err("the name is empty".into());
        }
        let numbers = [
            ("price", self.price),
            ("width_cm", self.width_cm),
            ("height_cm", self.height_cm),
            ("depth_cm", self.depth_cm),
        ];
        for (field, value) in numbers {
            if let Some(value) = value
                && !(value.is_finite() && value >= 0.0)
            {
                return Err(format!("{field} must be a finite number >= 0, not {value}"));
            }
        }
        Ok(())
    }
}

/// Reads a missing or `null` value as the type's default.
fn null_as_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Reads an attribute map whose values may be strings, numbers or booleans; `null` values are
/// dropped and nested values are kept as compact JSON.
fn attribute_values<'de, D>(
    deserializer: D,
) -> std::result::Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    let raw = Option::<BTreeMap<String, serde_json::Value>>::deserialize(deserializer)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(key, value)| match value {
            serde_json::Value::Null => None,
            serde_json::Value::String(text) => Some((key, text)),
            other => Some((key, other.to_string())),
        })
        .collect())
}

/// A catalog file and its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSource {
    /// One JSON product per line.
    Jsonl(PathBuf),
    /// A header row, then one product per row; attributes flattened as `key=value;key=value`.
    Csv(PathBuf),
}

impl CatalogSource {
    /// The source for `path`, its format told by the extension: `.jsonl`, `.ndjson` or `.json`
    /// for JSONL, `.csv` for CSV.
    pub fn from_path(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("jsonl" | "ndjson" | "json") => Ok(Self::Jsonl(path)),
            Some("csv") => Ok(Self::Csv(path)),
            _ => Err(CatalogError::UnknownFormat { path }),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            Self::Jsonl(path) | Self::Csv(path) => path,
        }
    }

    /// Streams the file's products to `sink` with the number of bytes read so far (for a
    /// progress bar). Stops at the first bad record or the first error `sink` returns.
    pub(crate) fn read(&self, sink: impl FnMut(Product, u64) -> Result<()>) -> Result<()> {
        match self {
            Self::Jsonl(path) => read_jsonl(path, sink),
            Self::Csv(path) => read_csv(path, sink),
        }
    }

    /// The file's size in bytes.
    pub(crate) fn len(&self) -> Result<u64> {
        let path = self.path();
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|source| CatalogError::Io {
                path: path.to_path_buf(),
                source,
            })
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| CatalogError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(path: &Path, line: u64, message: impl Into<String>) -> CatalogError {
    CatalogError::InvalidRecord {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

fn read_jsonl(path: &Path, mut sink: impl FnMut(Product, u64) -> Result<()>) -> Result<()> {
    let mut reader = BufReader::new(open(path)?);
    let mut buffer = String::new();
    let mut bytes_read = 0u64;
    let mut line = 0u64;
    loop {
        buffer.clear();
        line += 1;
        let n = reader.read_line(&mut buffer).map_err(|source| {
            if source.kind() == std::io::ErrorKind::InvalidData {
                invalid(path, line, "the line is not valid UTF-8")
            } else {
                CatalogError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        if n == 0 {
            return Ok(());
        }
        bytes_read += n as u64;
        // A byte-order mark is legal at the start of a UTF-8 file but not inside JSON.
        let text = buffer.trim_start_matches('\u{feff}').trim();
        if text.is_empty() {
            continue;
        }
        let product: Product = serde_json::from_str(text).map_err(|source| CatalogError::Json {
            path: path.to_path_buf(),
            line,
            source,
        })?;
        product
            .validate()
            .map_err(|message| invalid(path, line, message))?;
        sink(product, bytes_read)?;
    }
}

/// Column positions of a catalog CSV, found by header name so column order and extra columns
/// do not matter.
struct CsvColumns {
    sku: usize,
    name: usize,
    brand: Option<usize>,
    category: Option<usize>,
    color: Option<usize>,
    material: Option<usize>,
    width_cm: Option<usize>,
    height_cm: Option<usize>,
    depth_cm: Option<usize>,
    dimensions: Option<usize>,
    price: Option<usize>,
    stock: Option<usize>,
    description: Option<usize>,
    attributes: Option<usize>,
}

impl CsvColumns {
    fn from_header(path: &Path, header: &csv::StringRecord) -> Result<Self> {
        let find = |names: &[&str]| {
            header.iter().position(|column| {
                let column = column.trim().trim_start_matches('\u{feff}');
                names.iter().any(|name| column.eq_ignore_ascii_case(name))
            })
        };
        let required = |name: &str| {
            find(&[name])
                .ok_or_else(|| invalid(path, 1, format!("the header has no {name} column")))
        };
        Ok(Self {
            sku: required("sku")?,
            name: required("name")?,
            brand: find(&["brand"]),
            category: find(&["category"]),
            color: find(&["color", "colour"]),
            material: find(&["material"]),
            width_cm: find(&["width_cm"]),
            height_cm: find(&["height_cm"]),
            depth_cm: find(&["depth_cm"]),
            dimensions: find(&["dimensions"]),
            price: find(&["price"]),
            stock: find(&["stock"]),
            description: find(&["description"]),
            attributes: find(&["attributes"]),
        })
    }
}

fn read_csv(path: &Path, mut sink: impl FnMut(Product, u64) -> Result<()>) -> Result<()> {
    let csv_error = |source: csv::Error| CatalogError::Csv {
        path: path.to_path_buf(),
        line: source.position().map_or(0, csv::Position::line),
        source,
    };
    let mut reader = csv::ReaderBuilder::new().from_reader(BufReader::new(open(path)?));
    let columns = CsvColumns::from_header(path, reader.headers().map_err(csv_error)?)?;
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(csv_error)? {
        let (line, bytes_read) = record.position().map_or((0, 0), |p| (p.line(), p.byte()));
        let text = |column: Option<usize>| {
            column
                .and_then(|i| record.get(i))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let number = |column: Option<usize>, field: &str| -> Result<Option<f64>> {
            let value = text(column).trim_start_matches('$').to_string();
            if value.is_empty() {
                return Ok(None);
            }
            value
                .parse()
                .map(Some)
                .map_err(|_| invalid(path, line, format!("{field} is not a number: {value:?}")))
        };
        let stock_text = text(columns.stock);
        let stock = if stock_text.is_empty() {
            None
        } else {
            Some(stock_text.parse().map_err(|_| {
                invalid(
                    path,
                    line,
                    format!("stock is not a whole number: {stock_text:?}"),
                )
            })?)
        };
        let mut attributes = BTreeMap::new();
        for pair in text(columns.attributes).split(';') {
            if pair.trim().is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                invalid(path, line, format!("attribute {pair:?} is not key=value"))
            })?;
            attributes.insert(key.trim().to_string(), value.trim().to_string());
        }
        let product = Product {
            sku: text(Some(columns.sku)),
            name: text(Some(columns.name)),
            brand: text(columns.brand),
            category: text(columns.category),
            color: text(columns.color),
            material: text(columns.material),
            width_cm: number(columns.width_cm, "width_cm")?,
            height_cm: number(columns.height_cm, "height_cm")?,
            depth_cm: number(columns.depth_cm, "depth_cm")?,
            dimensions: text(columns.dimensions),
            price: number(columns.price, "price")?,
            stock,
            description: text(columns.description),
            attributes,
        };
        product
            .validate()
            .map_err(|message| invalid(path, line, message))?;
        sink(product, bytes_read)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_records_tolerate_missing_null_and_unknown_fields() {
        let product: Product = serde_json::from_str(
            r#"{"sku":"X-1","name":"Thing","brand":null,"price":5,"extra":[1,2],
                "attributes":{"size":3,"waterproof":true,"gone":null,"note":"ok"}}"#,
        )
        .unwrap();
        assert_eq!(product.brand, "");
        assert_eq!(product.price, Some(5.0));
        assert_eq!(product.stock, None);
        assert_eq!(product.attributes["size"], "3");
        assert_eq!(product.attributes["waterproof"], "true");
        assert_eq!(product.attributes["note"], "ok");
        assert!(!product.attributes.contains_key("gone"));
        assert!(product.validate().is_ok());
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut product = Product {
            sku: "A".into(),
            name: "B".into(),
            ..Product::default()
        };
        product.price = Some(-1.0);
        assert!(product.validate().unwrap_err().contains("price"));
        product.price = None;
        product.sku = " ".into();
        assert!(product.validate().unwrap_err().contains("sku"));
        product.sku = "A".into();
        product.name = String::new();
        assert!(product.validate().unwrap_err().contains("name"));
    }

    #[test]
    fn sources_are_told_by_extension() {
        assert!(matches!(
            CatalogSource::from_path("a/catalog.JSONL"),
            Ok(CatalogSource::Jsonl(_))
        ));
        assert!(matches!(
            CatalogSource::from_path("catalog.csv"),
            Ok(CatalogSource::Csv(_))
        ));
        let err = CatalogSource::from_path("catalog.xml").unwrap_err();
        assert!(err.to_string().contains("catalog.xml"), "{err}");
    }
}
