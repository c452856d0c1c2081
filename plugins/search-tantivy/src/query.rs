//! The catalog query language and its translation into tantivy queries.
//!
//! A query is free text plus optional filters, in any order:
//!
//! ```text
//! black leather tote category:bags brand:Lumen material:"waxed cotton" price<200 stock>0 in_stock:yes
//! ```
//!
//! Query text comes from a language model, so it is never handed to tantivy's query parser:
//! [`CatalogQuery::parse`] reads it with a small hand-written lexer that accepts any string,
//! and the tantivy query is built term by term. Quotes, parentheses, `AND`/`OR` and other
//! syntax are ordinary characters here; words are whatever is left between them.
//!
//! Free text is scored with BM25 over the analyzed fields (the name boosted), plus a large
//! bonus when a run of the query's words is exactly a product name or a SKU. Matching goes in
//! tiers (see [`TantivyQuery::tiers`]): products named exactly first, then products containing
//! every word, then (only when nothing is named exactly) products containing any word. So
//! "What colour is the Aurora Tote?" answers with the Aurora Tote alone, "aurora tote" with the
//! Aurora Tote and then the Aurora Canvas Tote, and the common case never scans the catalog.
//! Filters restrict without scoring. Outside an exact match, a word that matches nothing in
//! the catalog is ignored instead of emptying the result, because a model pads its queries with
//! words the catalog never uses.

use std::fmt;
use std::ops::Bound;

use tantivy::query::{
    AllQuery, BooleanQuery, BoostQuery, ConstScoreQuery, Occur, Query, TermQuery,
};
use tantivy::schema::{Field, IndexRecordOption};
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{Searcher, Term};

use crate::error::{CatalogError, Result};
use crate::numeric::NumericFilters;
use crate::schema::{CatalogFields, normalize_key, words};

/// Free-text words beyond this many are ignored: a question never needs more, and each word
/// costs term lookups.
pub const MAX_QUERY_WORDS: usize = 32;
/// A query with more filters than this is refused.
pub const MAX_FILTERS: usize = 16;
/// Longest run of query words tried as an exact product name.
const MAX_NAME_WORDS: usize = 6;
/// Score bonus of a run of words that is exactly a product name or SKU; far above what BM25
/// gives any single field, so an exactly named product always ranks first.
const EXACT_MATCH_BOOST: f32 = 8.0;
/// Catalogs at least this large drop free-text clauses whose term occurs in more than half
/// the products: such a term says nothing about which product is meant, and would make a
/// filtered search visit most of the catalog.
const COMMON_TERM_MIN_DOCS: u64 = 1_000;

/// A comparison in a numeric filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `>`
    Greater,
    /// `>=`
    GreaterOrEqual,
    /// `=` (also written `:`)
    Equal,
}

impl Comparison {
    fn symbol(self) -> &'static str {
        match self {
            Self::Less => "<",
            Self::LessOrEqual => "<=",
            Self::Greater => ">",
            Self::GreaterOrEqual => ">=",
            Self::Equal => "=",
        }
    }

    /// The bounds of `field OP value`.
    pub(crate) fn bounds<T: Copy>(self, value: T) -> (Bound<T>, Bound<T>) {
        match self {
            Self::Less => (Bound::Unbounded, Bound::Excluded(value)),
            Self::LessOrEqual => (Bound::Unbounded, Bound::Included(value)),
            Self::Greater => (Bound::Excluded(value), Bound::Unbounded),
            Self::GreaterOrEqual => (Bound::Included(value), Bound::Unbounded),
            Self::Equal => (Bound::Included(value), Bound::Included(value)),
        }
    }
}

/// One filter of a query. Filters on the same text attribute are alternatives (`color:black
/// color:navy` finds both); everything else must hold together.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Filter {
    /// `category:VALUE`; a singular or plural spelling both match ("bag" finds "bags").
    Category(String),
    /// `color:VALUE` (or `colour:`).
    Color(String),
    /// `brand:VALUE`.
    Brand(String),
    /// `material:VALUE`.
    Material(String),
    /// `price<200`, `price>=50`, `price=129.99`, ...
    Price(Comparison, f64),
    /// `stock>0`, `stock<5`, ...
    Stock(Comparison, u64),
    /// `in_stock:yes` (stock above zero) or `in_stock:no` (stock zero).
    InStock(bool),
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |f: &mut fmt::Formatter<'_>, key: &str, value: &str| {
            if value.contains(' ') {
                write!(f, "{key}:\"{value}\"")
            } else {
                write!(f, "{key}:{value}")
            }
        };
        match self {
            Self::Category(value) => text(f, "category", value),
            Self::Color(value) => text(f, "color", value),
            Self::Brand(value) => text(f, "brand", value),
            Self::Material(value) => text(f, "material", value),
            Self::Price(op, value) => write!(f, "price{}{value}", op.symbol()),
            Self::Stock(op, value) => write!(f, "stock{}{value}", op.symbol()),
            Self::InStock(yes) => write!(f, "in_stock:{}", if *yes { "yes" } else { "no" }),
        }
    }
}

/// A parsed catalog query: free-text words and filters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CatalogQuery {
    words: Vec<String>,
    skus: Vec<String>,
    filters: Vec<Filter>,
}

/// A [`CatalogQuery`] in tantivy's terms, run as a sequence of tiers (see
/// [`TantivyQuery::tiers`]).
pub(crate) struct TantivyQuery {
    /// Exact name and SKU keys of the query that some product has.
    exact: Vec<Term>,
    /// Per analyzed query word found in the catalog, its clauses: (term, boost, documents).
    words: Vec<Vec<(Term, f32, u64)>>,
    /// Whether every analyzed query word occurs somewhere in the catalog.
    all_words_found: bool,
    /// The text filters, all required; `None` without any.
    filter: Option<Box<dyn Query>>,
    /// The price and stock filters, checked on each matching document.
    pub numeric: NumericFilters,
    /// Products in the index, for the common-term rule.
    num_docs: u64,
}

impl TantivyQuery {
    /// The queries to run, in order: each tier's hits rank after the previous tiers' hits,
    /// and a search stops once it has enough. Each tier is cheap when it is the one that
    /// answers, because it is an intersection led by its rarest part:
    ///
    /// 1. When the query contains a product's exact name or SKU: those products, then products
    ///    containing every query word (none when some word is not in the catalog at all, so a
    ///    question around a name returns just that product).
    /// 2. Otherwise: products containing every query word found in the catalog, then products
    ///    containing any of them (the full BM25 disjunction, the one tier that can visit much
    ///    of the catalog).
    /// 3. Without words: the filters alone, unscored, in catalog order.
    ///
    /// Every tier is restricted by the text filters; the numeric ones apply when collecting.
    pub fn tiers(&self) -> Vec<Box<dyn Query>> {
        let mut tiers = Vec::new();
        if !self.exact.is_empty() {
            // Exact matches rank among themselves by their exact keys alone: there is rarely
            // more than one, and scoring every word too would cost a scorer per word.
            let exact = self
                .exact
                .iter()
                .map(|term| should(term.clone(), EXACT_MATCH_BOOST))
                .collect();
            tiers.push(self.filtered(boolean(exact)));
            if self.all_words_found && !self.words.is_empty() {
                tiers.push(self.filtered(self.all_words()));
            }
        } else if !self.words.is_empty() {
            tiers.push(self.filtered(self.all_words()));
            if self.words.len() > 1 {
                tiers.push(self.filtered(boolean(self.clauses(true))));
            }
        } else if let Some(filter) = &self.filter {
            tiers.push(Box::new(ConstScoreQuery::new(filter.box_clone(), 0.0)));
        } else if !self.numeric.is_empty() {
            // Only numeric filters: every product is a candidate for them.
            tiers.push(Box::new(ConstScoreQuery::new(Box::new(AllQuery), 0.0)));
        }
        tiers
    }

    /// Every word required in the full-text field, which holds every word of a product, and
    /// scored there alone: a plain intersection of posting lists. The name is part of the full
    /// text, so name words still count.
    fn all_words(&self) -> Box<dyn Query> {
        boolean(
            self.words
                .iter()
                .filter_map(|clauses| clauses.first())
                .map(|(term, boost, _)| {
                    let (_, query) = should(term.clone(), *boost);
                    (Occur::Must, query)
                })
                .collect(),
        )
    }

    /// The scored clause of every word in every field. `drop_common` leaves out clauses whose
    /// term is in more than half of a large catalog, as long as some other clause remains.
    fn clauses(&self, drop_common: bool) -> Vec<(Occur, Box<dyn Query>)> {
        let all = self.words.iter().flatten();
        let is_common = |frequency: u64| {
            drop_common && self.num_docs >= COMMON_TERM_MIN_DOCS && frequency * 2 > self.num_docs
        };
        let keep_common = all.clone().all(|&(_, _, f)| is_common(f));
        all.filter(|&&(_, _, frequency)| keep_common || !is_common(frequency))
            .map(|(term, boost, _)| should(term.clone(), *boost))
            .collect()
    }

    /// `query` restricted by the filters, which add nothing to the score.
    fn filtered(&self, query: Box<dyn Query>) -> Box<dyn Query> {
        match &self.filter {
            None => query,
            Some(filter) => boolean(vec![
                (Occur::Must, query),
                (
                    Occur::Must,
                    Box::new(ConstScoreQuery::new(filter.box_clone(), 0.0)),
                ),
            ]),
        }
    }
}

fn boolean(clauses: Vec<(Occur, Box<dyn Query>)>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(clauses))
}

/// What a query key names.
enum FilterKey {
    Text(fn(String) -> Filter),
    Price,
    Stock,
    InStock,
}

fn filter_key(key: &str) -> Option<FilterKey> {
    Some(match key.to_ascii_lowercase().as_str() {
        "category" => FilterKey::Text(Filter::Category),
        "color" | "colour" => FilterKey::Text(Filter::Color),
        "brand" => FilterKey::Text(Filter::Brand),
        "material" => FilterKey::Text(Filter::Material),
        "price" => FilterKey::Price,
        "stock" => FilterKey::Stock,
        "in_stock" | "instock" => FilterKey::InStock,
        _ => return None,
    })
}

/// Splits a query into whitespace-separated tokens; a double-quoted run is one token, quotes
/// included, so `material:"waxed cotton"` stays together. An unbalanced quote runs to the end.
fn lex(text: &str) -> Vec<&str> {
    let mut tokens = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        if c == '"' {
            quoted = !quoted;
        }
        if c.is_whitespace() && !quoted {
            if let Some(s) = start.take() {
                tokens.push(&text[s..i]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        tokens.push(&text[s..]);
    }
    tokens
}

/// Splits `token` at its first `:`, `<`, `>` or `=` into key, operator and value.
fn split_filter(token: &str) -> Option<(&str, &str, &str)> {
    let at = token.find([':', '<', '>', '='])?;
    let (key, rest) = token.split_at(at);
    let op_len = rest
        .char_indices()
        .take_while(|&(i, c)| {
            // ":" may be followed by a comparison (`price:<200`); "<" and ">" by "=".
            matches!(c, ':' | '<' | '>' | '=') && (i == 0 || c != ':')
        })
        .count();
    let (op, value) = rest.split_at(op_len);
    Some((key, op, value))
}

fn comparison(op: &str) -> Option<Comparison> {
    Some(match op.trim_start_matches(':') {
        "" | "=" | "==" => Comparison::Equal,
        "<" => Comparison::Less,
        "<=" | "=<" => Comparison::LessOrEqual,
        ">" => Comparison::Greater,
        ">=" | "=>" => Comparison::GreaterOrEqual,
        _ => return None,
    })
}

impl CatalogQuery {
    /// Parses query text. Any text parses; the error cases are a query with nothing to search
    /// for, a filter with a missing or unusable value (`price<abc`), and too many filters. Each
    /// error message says how to write the query instead.
    pub fn parse(text: &str) -> Result<Self> {
        let tokens = lex(text);
        let mut query = Self::default();
        let mut free_text = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            let token = tokens[i];
            i += 1;
            let Some((key, op, value)) = split_filter(token) else {
                free_text.push(token);
                continue;
            };
            let Some(kind) = filter_key(key) else {
                free_text.push(token);
                continue;
            };
            // Models often write `category: bags`; the value is then the next token.
            let value = if value.is_empty() && i < tokens.len() {
                i += 1;
                tokens[i - 1]
            } else {
                value
            };
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            if query.filters.len() == MAX_FILTERS {
                return Err(CatalogError::InvalidQuery(format!(
                    "too many filters (at most {MAX_FILTERS})"
                )));
            }
            query.filters.push(parse_filter(key, kind, op, value)?);
        }
        for token in &free_text {
            let sku = token.trim_matches(|c: char| !c.is_alphanumeric());
            let fits = !sku.is_empty() && sku.len() <= crate::schema::MAX_TOKEN_BYTES;
            if fits && query.skus.len() < MAX_QUERY_WORDS {
                query.skus.push(sku.to_lowercase());
            }
            let room = MAX_QUERY_WORDS - query.words.len();
            query.words.extend(words(token).take(room));
        }
        if query.words.is_empty() && query.filters.is_empty() {
            return Err(CatalogError::InvalidQuery(
                "the query has no words to search for: write a product name or product words, \
                 optionally with filters, e.g. aurora tote or category:bags price<100"
                    .into(),
            ));
        }
        Ok(query)
    }

    /// The free-text words, lowercased, at most [`MAX_QUERY_WORDS`].
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// The filters.
    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }

    /// The tantivy form of the query, with each word and exact key looked up in the catalog.
    pub(crate) fn to_tantivy(
        &self,
        fields: &CatalogFields,
        searcher: &Searcher,
        analyzer: &mut TextAnalyzer,
    ) -> tantivy::Result<TantivyQuery> {
        let mut analyzed: Vec<String> = Vec::new();
        analyzer
            .token_stream(&self.words.join(" "))
            .process(&mut |token| {
                if !analyzed.contains(&token.text) {
                    analyzed.push(token.text.clone());
                }
            });
        let mut words = Vec::new();
        for text in &analyzed {
            let mut clauses = Vec::new();
            for (field, boost) in fields.searchable() {
                let term = Term::from_field_text(field, text);
                let frequency = searcher.doc_freq(&term)?;
                if frequency > 0 {
                    clauses.push((term, boost, frequency));
                }
            }
            if !clauses.is_empty() {
                words.push(clauses);
            }
        }

        let name_keys = (0..self.words.len()).flat_map(|start| {
            (start + 1..=(start + MAX_NAME_WORDS).min(self.words.len()))
                .map(move |end| (fields.name_key, self.words[start..end].join(" ")))
        });
        let skus = self.skus.iter().map(|sku| (fields.sku, sku.clone()));
        let mut exact = Vec::new();
        for (field, key) in name_keys.chain(skus) {
            let term = Term::from_field_text(field, &key);
            if searcher.doc_freq(&term)? > 0 {
                exact.push(term);
            }
        }

        let filters: Vec<(Occur, Box<dyn Query>)> = self
            .filter_queries(fields, searcher)?
            .into_iter()
            .map(|filter| (Occur::Must, filter))
            .collect();
        Ok(TantivyQuery {
            exact,
            all_words_found: words.len() == analyzed.len(),
            words,
            filter: (!filters.is_empty()).then(|| boolean(filters)),
            numeric: self.numeric_filters(),
            num_docs: searcher.num_docs(),
        })
    }

    /// The price and stock filters.
    fn numeric_filters(&self) -> NumericFilters {
        let mut numeric = NumericFilters::default();
        for filter in &self.filters {
            match filter {
                Filter::Price(op, value) => numeric.price(*op, *value),
                Filter::Stock(op, value) => numeric.stock(*op, *value),
                Filter::InStock(true) => numeric.stock(Comparison::Greater, 0),
                Filter::InStock(false) => numeric.stock(Comparison::Equal, 0),
                _ => {}
            }
        }
        numeric
    }

    /// One tantivy query per text filter group: values of one attribute are alternatives;
    /// groups are all required. Alternatives no product has are left out, so the common
    /// single-valued filter is a plain term query.
    fn filter_queries(
        &self,
        fields: &CatalogFields,
        searcher: &Searcher,
    ) -> tantivy::Result<Vec<Box<dyn Query>>> {
        let mut groups: Vec<(Field, Vec<String>)> = Vec::new();
        let mut queries: Vec<Box<dyn Query>> = Vec::new();
        for filter in &self.filters {
            let (field, keys) = match filter {
                Filter::Category(value) => (fields.category_key, plural_variants(value)),
                Filter::Color(value) => (fields.color_key, vec![normalize_key(value)]),
                Filter::Brand(value) => (fields.brand_key, vec![normalize_key(value)]),
                Filter::Material(value) => (fields.material_key, vec![normalize_key(value)]),
                // Numbers are checked per matching document, see `NumericFilters`.
                Filter::Price(..) | Filter::Stock(..) | Filter::InStock(_) => continue,
            };
            match groups.iter_mut().find(|(f, _)| *f == field) {
                Some((_, existing)) => existing.extend(keys),
                None => groups.push((field, keys)),
            }
        }
        for (field, keys) in groups {
            let mut terms = Vec::new();
            for key in &keys {
                let term = Term::from_field_text(field, key);
                if searcher.doc_freq(&term)? > 0 {
                    terms.push(term);
                }
            }
            if terms.is_empty() {
                // Nothing has any of the values; the first one stands for the empty filter.
                terms.extend(keys.first().map(|key| Term::from_field_text(field, key)));
            }
            let alternatives: Vec<(Occur, Box<dyn Query>)> = terms
                .into_iter()
                .map(|term| {
                    let query: Box<dyn Query> =
                        Box::new(TermQuery::new(term, IndexRecordOption::Basic));
                    (Occur::Should, query)
                })
                .collect();
            queries.push(boolean(alternatives));
        }
        Ok(queries)
    }
}

impl fmt::Display for CatalogQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if !self.words.is_empty() {
            parts.push(format!("\"{}\"", self.words.join(" ")));
        }
        parts.extend(self.filters.iter().map(Filter::to_string));
        f.write_str(&parts.join(" "))
    }
}

/// A boosted optional term clause.
fn should(term: Term, boost: f32) -> (Occur, Box<dyn Query>) {
    let query = Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs));
    (Occur::Should, Box::new(BoostQuery::new(query, boost)))
}

/// The category key as written and its other number: "bag" and "bags", "bags" and "bag".
fn plural_variants(value: &str) -> Vec<String> {
    let key = normalize_key(value);
    let mut variants = vec![key.clone(), format!("{key}s"), format!("{key}es")];
    if let Some(singular) = key.strip_suffix('s') {
        variants.push(singular.to_string());
    }
    variants
}

fn parse_filter(key: &str, kind: FilterKey, op: &str, value: &str) -> Result<Filter> {
    let refuse = |hint: &str| {
        let shown: String = value.chars().take(40).collect();
        Err(CatalogError::InvalidQuery(format!(
            "cannot read the filter {key}{op}{shown:?}: {hint}"
        )))
    };
    match kind {
        FilterKey::Text(make) => {
            let normalized = normalize_key(value);
            if !matches!(op, ":" | "=") {
                refuse("write it as key:value, e.g. category:bags")
            } else if normalized.is_empty() {
                refuse("it needs a value, e.g. category:bags or color:black")
            } else {
                Ok(make(normalized))
            }
        }
        FilterKey::Price => {
            let number = value.trim_start_matches('$').parse::<f64>();
            match (comparison(op), number) {
                (Some(op), Ok(number)) if number.is_finite() => Ok(Filter::Price(op, number)),
                _ => refuse("write a comparison and a number, e.g. price<200 or price>=50"),
            }
        }
        FilterKey::Stock => match (comparison(op), value.parse::<u64>()) {
            (Some(op), Ok(number)) => Ok(Filter::Stock(op, number)),
            _ => refuse("write a comparison and a whole number, e.g. stock>0"),
        },
        FilterKey::InStock => {
            let answer = match value.to_ascii_lowercase().as_str() {
                "yes" | "true" | "1" | "y" => Some(true),
                "no" | "false" | "0" | "n" => Some(false),
                _ => None,
            };
            match (matches!(op, ":" | "="), answer) {
                (true, Some(answer)) => Ok(Filter::InStock(answer)),
                _ => refuse("write it as in_stock:yes or in_stock:no, e.g. tote in_stock:yes"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> CatalogQuery {
        CatalogQuery::parse(text).unwrap()
    }

    #[test]
    fn filters_and_free_text_mix_in_any_order() {
        let query = parse(
            "black tote category:Bags price<200 price>=50.5 stock>0 in_stock:yes \
             material:\"waxed cotton\" colour:forest-green",
        );
        assert_eq!(query.words(), ["black", "tote"]);
        assert_eq!(
            query.filters(),
            [
                Filter::Category("bags".into()),
                Filter::Price(Comparison::Less, 200.0),
                Filter::Price(Comparison::GreaterOrEqual, 50.5),
                Filter::Stock(Comparison::Greater, 0),
                Filter::InStock(true),
                Filter::Material("waxed cotton".into()),
                Filter::Color("forest green".into()),
            ]
        );
    }

    #[test]
    fn spaced_and_prefixed_forms_are_read() {
        let query = parse("category: bags price:<=$99.99 brand=Lumen");
        assert_eq!(
            query.filters(),
            [
                Filter::Category("bags".into()),
                Filter::Price(Comparison::LessOrEqual, 99.99),
                Filter::Brand("lumen".into()),
            ]
        );
        assert!(query.words().is_empty());
    }

    #[test]
    fn syntax_characters_are_plain_text() {
        let query = parse("(aurora AND tote) OR \"leather\" -x +y [z title:foo");
        assert_eq!(
            query.words(),
            [
                "aurora", "and", "tote", "or", "leather", "x", "y", "z", "title", "foo"
            ]
        );
        assert!(query.filters().is_empty());
    }

    #[test]
    fn unreadable_filters_and_empty_queries_are_refused_with_a_hint() {
        for bad in [
            "price<abc",
            "price<",
            "price<NaN",
            "stock>-1",
            "category:",
            "in_stock:maybe",
            "color<black",
            "",
            "   ",
            "((()))",
            "🦀🦀🦀",
        ] {
            let err = CatalogQuery::parse(bad).unwrap_err();
            assert!(matches!(err, CatalogError::InvalidQuery(_)), "{bad}: {err}");
            assert!(err.to_string().contains("e.g."), "{bad}: {err}");
        }
        let many = "color:black ".repeat(MAX_FILTERS + 1);
        assert!(CatalogQuery::parse(&many).is_err());
    }

    #[test]
    fn long_input_is_capped() {
        let query = parse(&"word ".repeat(20_000));
        assert_eq!(query.words().len(), MAX_QUERY_WORDS);
        let query = parse(&format!("{} tote", "a".repeat(100_000)));
        assert_eq!(query.words(), ["tote"]);
    }

    #[test]
    fn display_shows_words_and_filters() {
        let query = parse("Aurora tote color:forest_green price<=20");
        assert_eq!(
            query.to_string(),
            "\"aurora tote\" color:\"forest green\" price<=20"
        );
    }

    #[test]
    fn lexer_keeps_quoted_runs_and_survives_unbalanced_quotes() {
        assert_eq!(lex(" a  \"b c\" d"), ["a", "\"b c\"", "d"]);
        assert_eq!(lex("x \"y z"), ["x", "\"y z"]);
        assert!(lex("").is_empty());
    }
}
