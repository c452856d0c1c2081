//! The tantivy schema of a catalog index, its text analyzers, and how a [`Product`] becomes a
//! document.
//!
//! Free text is matched against one analyzed field holding all of a product's text (name,
//! brand, category, colour, material, description, attributes), so a query word is one posting
//! list and "every word" is a plain intersection; the name is indexed a second time on its own
//! so that name matches weigh more. Filter attributes are also indexed as normalised exact keys,
//! and so are the name and SKU, for exact matches. Numbers are fast (columnar) fields, read per
//! matching document by the price and stock filters. The whole record is stored as JSON, which is what search
//! results are rendered from.

use tantivy::schema::{
    FAST, Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer,
    StopWordFilter, TextAnalyzer,
};
use tantivy::{TantivyDocument, Term};

use crate::product::Product;

/// Name under which the catalog analyzer is registered in every index.
pub(crate) const ANALYZER: &str = "catalog_en";

/// Name of the price fast field.
pub(crate) const PRICE_FIELD: &str = "price";
/// Name of the stock fast field.
pub(crate) const STOCK_FIELD: &str = "stock";

/// Tokens longer than this many bytes are dropped; no product word is that long, and dropping
/// them keeps hostile input from bloating the term dictionary or a query.
pub(crate) const MAX_TOKEN_BYTES: usize = 40;

/// Handles of the catalog schema's fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CatalogFields {
    /// Lowercased SKU, exact: the identity used by upsert and delete, and an exact match.
    pub sku: Field,
    /// Analyzed name, scored on top of `text`.
    pub name: Field,
    /// Normalised name, exact: lets a query that contains a whole name rank it first.
    pub name_key: Field,
    /// Analyzed text of every text attribute, name included.
    pub text: Field,
    /// Normalised brand, exact, for `brand:` filters.
    pub brand_key: Field,
    /// Normalised category, exact, for `category:` filters.
    pub category_key: Field,
    /// Normalised colour, exact, for `color:` filters.
    pub color_key: Field,
    /// Normalised material, exact, for `material:` filters.
    pub material_key: Field,
    /// Price, for range filters.
    pub price: Field,
    /// Units in stock, for range filters.
    pub stock: Field,
    /// The whole product as JSON, stored only.
    pub record: Field,
}

/// BM25 boost of a name match, on top of the same word's match in the full text: questions
/// name products, so the name is the strongest evidence.
const NAME_BOOST: f32 = 3.0;

impl CatalogFields {
    /// Builds the schema and returns it with its field handles.
    pub(crate) fn schema() -> (Schema, Self) {
        let mut builder = Schema::builder();
        let analyzed = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(ANALYZER)
                .set_index_option(IndexRecordOption::WithFreqs),
        );
        // Exact keys that score (SKU, name) keep term frequencies like every scored field.
        let scored_key = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("raw")
                .set_index_option(IndexRecordOption::WithFreqs),
        );
        let fields = Self {
            sku: builder.add_text_field("sku", scored_key.clone()),
            name: builder.add_text_field("name", analyzed.clone()),
            name_key: builder.add_text_field("name_key", scored_key),
            text: builder.add_text_field("text", analyzed),
            brand_key: builder.add_text_field("brand_key", STRING),
            category_key: builder.add_text_field("category_key", STRING),
            color_key: builder.add_text_field("color_key", STRING),
            material_key: builder.add_text_field("material_key", STRING),
            price: builder.add_f64_field(PRICE_FIELD, FAST),
            stock: builder.add_u64_field(STOCK_FIELD, FAST),
            record: builder.add_text_field("record", STORED),
        };
        (builder.build(), fields)
    }

    /// The analyzed fields free text is matched against, with their BM25 boosts; the first is
    /// the one every product's every word is in.
    pub(crate) fn searchable(&self) -> [(Field, f32); 2] {
        [(self.text, 1.0), (self.name, NAME_BOOST)]
    }

    /// The term that identifies `sku`'s document.
    pub(crate) fn sku_term(&self, sku: &str) -> Term {
        Term::from_field_text(self.sku, &sku.trim().to_lowercase())
    }

    /// The document of a validated product.
    pub(crate) fn document(&self, product: &Product) -> Result<TantivyDocument, serde_json::Error> {
        let mut doc = TantivyDocument::new();
        doc.add_text(self.sku, product.sku.trim().to_lowercase());
        doc.add_text(self.name, &product.name);
        doc.add_text(self.name_key, normalize_key(&product.name));
        let facets = [
            (self.brand_key, &product.brand),
            (self.category_key, &product.category),
            (self.color_key, &product.color),
            (self.material_key, &product.material),
        ];
        for (key, value) in facets {
            if !value.trim().is_empty() {
                doc.add_text(key, normalize_key(value));
            }
        }
        let mut text = vec![
            product.name.clone(),
            product.brand.clone(),
            product.category.clone(),
            product.color.clone(),
            product.material.clone(),
            product.description.clone(),
        ];
        text.extend(
            product
                .attributes
                .iter()
                .map(|(key, value)| format!("{} {value}", key.replace('_', " "))),
        );
        doc.add_text(self.text, text.join("\n"));
        if let Some(price) = product.price {
            doc.add_f64(self.price, price);
        }
        if let Some(stock) = product.stock {
            doc.add_u64(self.stock, u64::from(stock));
        }
        doc.add_text(self.record, serde_json::to_string(product)?);
        Ok(doc)
    }
}

/// The analyzer of every analyzed field: words split on anything but letters and digits,
/// lowercased, folded to ASCII and stemmed, so "Bags" finds "bag".
pub(crate) fn index_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(MAX_TOKEN_BYTES))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .filter(Stemmer::new(Language::English))
        .build()
}

/// The analyzer of query text: the index analyzer without English stop words, which match
/// nearly every description and would only slow a search down.
pub(crate) fn query_analyzer() -> TextAnalyzer {
    let builder = TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(MAX_TOKEN_BYTES))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .dynamic();
    // The stop-word list is compiled into tantivy; without it queries only get slower.
    let builder = match StopWordFilter::new(Language::English) {
        Some(stop_words) => builder.filter_dynamic(stop_words),
        None => builder,
    };
    builder
        .filter_dynamic(Stemmer::new(Language::English))
        .build()
}

/// The words of `text`, lowercased, split on anything but letters and digits, each at most
/// [`MAX_TOKEN_BYTES`] long.
pub(crate) fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty() && word.len() <= MAX_TOKEN_BYTES)
        .map(str::to_lowercase)
}

/// The exact-match key of a value: its words joined by single spaces, so "Forest-Green",
/// "forest green" and "forest_green" agree.
pub(crate) fn normalize_key(text: &str) -> String {
    words(text).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(mut analyzer: TextAnalyzer, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        analyzer
            .token_stream(text)
            .process(&mut |token| out.push(token.text.clone()));
        out
    }

    #[test]
    fn analyzers_stem_and_the_query_one_drops_stop_words() {
        assert_eq!(tokens(index_analyzer(), "The Bags"), ["the", "bag"]);
        assert_eq!(
            tokens(query_analyzer(), "The Bags of Café"),
            ["bag", "cafe"]
        );
    }

    #[test]
    fn keys_ignore_case_and_separators() {
        assert_eq!(normalize_key("Forest-Green"), "forest green");
        assert_eq!(normalize_key("  forest_green "), "forest green");
        assert_eq!(normalize_key("((()))"), "");
    }
}
