//! Compact, one-line renderings of products for a small model's context window.
//!
//! A line leads with what identifies the product (SKU, name), then the facts questions ask
//! about (brand, category, colour, material, dimensions, price, stock), then free attributes,
//! those the query mentions first. Attributes that do not fit the line's budget are left out
//! whole rather than cut in the middle.

use searchloop_core::tool::truncate_chars;

use crate::index::SearchHit;
use crate::product::Product;
use crate::query::CatalogQuery;
use crate::schema::words;

/// The product as one line of at most `max_chars` characters (a line whose fixed part alone
/// is longer is cut and marked with " …"). Attributes sharing a word with `query_words` come
/// first.
pub fn render_hit(product: &Product, max_chars: usize, query_words: &[String]) -> String {
    let mut facts = Vec::new();
    if !product.brand.trim().is_empty() {
        facts.push(format!("brand {}", one_line(&product.brand)));
    }
    if !product.category.trim().is_empty() {
        facts.push(one_line(&product.category));
    }
    let look = one_line(&format!("{} {}", product.color, product.material));
    if !look.is_empty() {
        facts.push(look);
    }
    if let Some(dimensions) = dimensions(product) {
        facts.push(dimensions);
    }
    if let Some(price) = product.price {
        facts.push(format!("${price:.2}"));
    }
    match product.stock {
        Some(0) => facts.push("out of stock".into()),
        Some(units) => facts.push(format!("in stock ({units})")),
        None => {}
    }
    let mut line = format!("[{}] {}", one_line(&product.sku), one_line(&product.name));
    if !facts.is_empty() {
        line.push_str(" — ");
        line.push_str(&facts.join(", "));
    }
    let mut used = line.chars().count();
    if used > max_chars {
        return truncate_chars(&line, max_chars);
    }
    let mentioned = |key: &str, value: &str| {
        words(key)
            .chain(words(value))
            .any(|word| query_words.contains(&word))
    };
    let (first, rest): (Vec<_>, Vec<_>) = product
        .attributes
        .iter()
        .partition(|(key, value)| mentioned(key, value));
    for (key, value) in first.into_iter().chain(rest) {
        let attribute = format!("; {}={}", one_line(key), one_line(value));
        let length = attribute.chars().count();
        if used + length <= max_chars {
            line.push_str(&attribute);
            used += length;
        }
    }
    line
}

/// The observation for a search: one line per hit, each within `hit_chars` and all within
/// about `max_chars`; or, when nothing matched, one line saying so with a hint.
pub(crate) fn render_observation(
    hits: &[SearchHit],
    query: &CatalogQuery,
    hit_chars: usize,
    max_chars: usize,
    categories: &[String],
) -> String {
    if hits.is_empty() {
        let mut message = format!(
            "No products match {}. Try fewer or other words, or a product name",
            truncate_chars(&query.to_string(), 100)
        );
        if !categories.is_empty() {
            message.push_str(&format!(
                "; categories: {}",
                truncate_chars(&categories.join(", "), 200)
            ));
        }
        message.push('.');
        return message;
    }
    let per_hit = hit_chars.min(max_chars / hits.len());
    hits.iter()
        .map(|hit| render_hit(&hit.product, per_hit, query.words()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` on one line with single spaces, so catalog text cannot break the observation's
/// one-product-per-line layout.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The dimensions as written in the catalog, else built from the three measures.
fn dimensions(product: &Product) -> Option<String> {
    let written = one_line(&product.dimensions);
    if !written.is_empty() {
        return Some(written);
    }
    let (Some(w), Some(h), Some(d)) = (product.width_cm, product.height_cm, product.depth_cm)
    else {
        return None;
    };
    Some(format!("{} x {} x {} cm", number(w), number(h), number(d)))
}

/// A measure without a trailing ".0".
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn tote() -> Product {
        Product {
            sku: "SKU-00042".into(),
            name: "Aurora Tote".into(),
            brand: "Lumen".into(),
            category: "bags".into(),
            color: "black".into(),
            material: "leather".into(),
            width_cm: Some(38.0),
            height_cm: Some(30.0),
            depth_cm: Some(12.0),
            dimensions: String::new(),
            price: Some(129.99),
            stock: Some(14),
            description: "A tote.".into(),
            attributes: BTreeMap::from([
                ("closure".to_string(), "zip".to_string()),
                ("laptop_size".to_string(), "13-inch".to_string()),
            ]),
        }
    }

    #[test]
    fn a_hit_reads_as_one_compact_line() {
        assert_eq!(
            render_hit(&tote(), 200, &[]),
            "[SKU-00042] Aurora Tote — brand Lumen, bags, black leather, 38 x 30 x 12 cm, \
             $129.99, in stock (14); closure=zip; laptop_size=13-inch"
        );
    }

    #[test]
    fn attributes_the_query_mentions_come_first_and_the_budget_holds() {
        let words = vec!["laptop".to_string()];
        let line = render_hit(&tote(), 200, &words);
        assert!(
            line.ends_with("; laptop_size=13-inch; closure=zip"),
            "{line}"
        );
        let short = render_hit(&tote(), 105, &words);
        assert!(short.ends_with("in stock (14)"), "{short}");
        let tiny = render_hit(&tote(), 20, &words);
        assert_eq!(tiny.chars().count(), 22);
    }

    #[test]
    fn missing_facts_are_left_out() {
        let product = Product {
            sku: "X-1".into(),
            name: "Plain\nThing".into(),
            stock: Some(0),
            ..Product::default()
        };
        assert_eq!(
            render_hit(&product, 200, &[]),
            "[X-1] Plain Thing — out of stock"
        );
    }
}
