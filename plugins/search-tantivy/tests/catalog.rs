//! Integration tests of the catalog index and the catalog tool: indexing JSONL and CSV files,
//! ranking on the generated retail catalog, filters checked against a scan of the catalog,
//! updates, persistence, malformed files, hostile queries, concurrency, and core's tool
//! conformance suite.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use searchloop_core::conformance::{ConformanceConfig, check_tool};
use searchloop_core::{DynTool, ToolError, ToolRegistry};
use searchloop_demo::retail::{self, GeneratorConfig, QuestionKind, RetailDataset};
use searchloop_search_tantivy::{
    CatalogError, CatalogIndex, CatalogQuery, CatalogSearchTool, CatalogSource, CatalogToolConfig,
    Product, Progress,
};
use serde_json::json;
use tempfile::TempDir;

fn product(sku: &str, name: &str, category: &str, price: f64, stock: u32) -> Product {
    Product {
        sku: sku.into(),
        name: name.into(),
        category: category.into(),
        price: Some(price),
        stock: Some(stock),
        ..Product::default()
    }
}

/// A small hand-written catalog with two near-identical names.
fn fixture() -> Vec<Product> {
    let attributes = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    vec![
        Product {
            brand: "Lumen".into(),
            color: "black".into(),
            material: "leather".into(),
            width_cm: Some(38.0),
            height_cm: Some(30.0),
            depth_cm: Some(12.0),
            dimensions: "38 x 30 x 12 cm".into(),
            description: "The Aurora Tote by Lumen is a black leather bag.".into(),
            attributes: attributes(&[("laptop_size", "13-inch"), ("closure", "zip")]),
            ..product("SKU-00042", "Aurora Tote", "bags", 129.99, 14)
        },
        Product {
            brand: "Lumen".into(),
            color: "navy".into(),
            material: "canvas".into(),
            description: "A roomy navy canvas tote.".into(),
            attributes: attributes(&[("closure", "magnetic snap")]),
            ..product("SKU-00043", "Aurora Canvas Tote", "bags", 89.5, 0)
        },
        Product {
            brand: "Trailcraft".into(),
            color: "forest green".into(),
            material: "ripstop".into(),
            description: "A light daypack for day hikes.".into(),
            attributes: attributes(&[("capacity", "20 L"), ("hip_belt", "yes")]),
            ..product("SKU-00100", "Summit Daypack", "backpacks", 149.0, 3)
        },
        Product {
            brand: "Kilnworks".into(),
            color: "white".into(),
            material: "stoneware".into(),
            description: "A glazed mug.".into(),
            attributes: attributes(&[("volume", "350 ml")]),
            ..product("SKU-00200", "Harbor Mug", "mugs", 18.0, 120)
        },
    ]
}

fn write_jsonl(path: &Path, products: &[Product]) -> Result<PathBuf> {
    let mut text = String::new();
    for p in products {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    fs::write(path, text)?;
    Ok(path.to_path_buf())
}

fn open(dir: &Path) -> Result<CatalogIndex> {
    Ok(CatalogIndex::create_or_open(dir)?.with_progress(Progress::Hidden))
}

/// SKUs of the top `limit` hits of `text`.
fn skus(index: &CatalogIndex, text: &str, limit: usize) -> Result<Vec<String>> {
    let query = CatalogQuery::parse(text)?;
    Ok(index
        .search(&query, limit)?
        .into_iter()
        .map(|hit| hit.product.sku)
        .collect())
}

/// An index of the fixture in a fresh temporary directory.
fn fixture_index() -> Result<(TempDir, CatalogIndex)> {
    let dir = tempfile::tempdir()?;
    let file = write_jsonl(&dir.path().join("catalog.jsonl"), &fixture())?;
    let index = open(&dir.path().join("index"))?;
    index.index_jsonl(&file)?;
    Ok((dir, index))
}

/// The default generated retail data set (2,400 products), generated once per test binary.
fn dataset() -> &'static RetailDataset {
    static DATASET: OnceLock<RetailDataset> = OnceLock::new();
    DATASET.get_or_init(|| retail::generate(&GeneratorConfig::default()))
}

/// The generated catalog written to disk and indexed from its JSONL file.
fn generated_index() -> Result<(TempDir, CatalogIndex)> {
    let dir = tempfile::tempdir()?;
    let files = dataset().write_to(&dir.path().join("data"))?;
    let index = open(&dir.path().join("index"))?;
    let report = index.index_jsonl(&files.catalog_jsonl)?;
    ensure!(
        report.records == 2_400 && report.products == 2_400,
        "{report:?}"
    );
    Ok((dir, index))
}

#[test]
fn a_jsonl_catalog_is_indexed_and_products_found_by_name() -> Result<()> {
    let (_dir, index) = fixture_index()?;
    assert_eq!(index.num_products(), 4);
    assert_eq!(skus(&index, "Aurora Tote", 2)?, ["SKU-00042", "SKU-00043"]);
    assert_eq!(skus(&index, "aurora canvas tote", 1)?, ["SKU-00043"]);
    assert_eq!(
        skus(&index, "What colour is the Harbor Mug?", 1)?,
        ["SKU-00200"]
    );
    // Stemming and ASCII folding: "daypacks" finds "Daypack"; a SKU finds its product.
    assert_eq!(skus(&index, "daypacks", 1)?, ["SKU-00100"]);
    assert_eq!(skus(&index, "sku-00200", 1)?, ["SKU-00200"]);
    // Attribute keys and values are searchable.
    assert_eq!(skus(&index, "hip belt", 1)?, ["SKU-00100"]);
    Ok(())
}

#[test]
fn a_csv_catalog_with_other_column_order_and_extra_columns_is_indexed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("catalog.csv");
    fs::write(
        &csv,
        "name,sku,warehouse,price,stock,attributes,colour,category\n\
         Aurora Tote,SKU-00042,north,129.99,14,laptop_size=13-inch;closure=zip,black,bags\n\
         \"Harbor Mug, large\",SKU-00200,south,$18,,volume=350 ml,white,mugs\n",
    )?;
    let index = open(&dir.path().join("index"))?;
    let report = index.index_csv(&csv)?;
    assert_eq!((report.records, report.products), (2, 2));
    let hits = index.search(&CatalogQuery::parse("aurora tote")?, 1)?;
    let tote = &hits[0].product;
    assert_eq!(tote.sku, "SKU-00042");
    assert_eq!(tote.color, "black");
    assert_eq!(tote.attributes["laptop_size"], "13-inch");
    assert_eq!(tote.attributes["closure"], "zip");
    let mug = &index.search(&CatalogQuery::parse("harbor mug large")?, 1)?[0].product;
    assert_eq!((mug.price, mug.stock), (Some(18.0), None));
    assert_eq!(skus(&index, "laptop 13 inch", 1)?, ["SKU-00042"]);
    Ok(())
}

#[test]
fn jsonl_records_may_omit_optional_fields_and_carry_unknown_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("catalog.jsonl");
    fs::write(
        &file,
        "\u{feff}{\"sku\":\"A-1\",\"name\":\"Bare Lamp\"}\n\n\
         {\"sku\":\"A-2\",\"name\":\"Odd Chair\",\"price\":null,\"brand\":null,\"seller\":{\"id\":7},\
          \"attributes\":{\"legs\":4,\"foldable\":true}}\n",
    )?;
    let index = open(&dir.path().join("index"))?;
    assert_eq!(index.index_jsonl(&file)?.records, 2);
    let chair = &index.search(&CatalogQuery::parse("odd chair")?, 1)?[0].product;
    assert_eq!(chair.attributes["legs"], "4");
    assert_eq!(chair.price, None);
    assert_eq!(skus(&index, "bare lamp", 1)?, ["A-1"]);
    Ok(())
}

#[test]
fn a_malformed_jsonl_line_is_reported_with_file_and_line_and_changes_nothing() -> Result<()> {
    let (dir, index) = fixture_index()?;
    let cases = [
        (
            "{\"sku\":\"B-1\",\"name\":\"Fine\"}\n{\"sku\":\"B-2\",\"name\":",
            2,
            "invalid product record",
        ),
        (
            "{\"sku\":\"B-1\",\"name\":\"Fine\"}\n\n{\"sku\":\"\",\"name\":\"No Sku\"}\n",
            3,
            "sku is empty",
        ),
        (
            "{\"sku\":\"B-1\",\"name\":\"Fine\",\"price\":-3}\n",
            1,
            "price",
        ),
        (
            "{\"sku\":\"B-1\",\"name\":\"Fine\",\"stock\":\"many\"}\n",
            1,
            "invalid product record",
        ),
        ("[1,2,3]\n", 1, "invalid product record"),
    ];
    for (text, line, message) in cases {
        let file = dir.path().join("bad.jsonl");
        fs::write(&file, text)?;
        let err = index.index_jsonl(&file).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(&format!("bad.jsonl:{line}:")), "{shown}");
        assert!(shown.contains(message), "{shown}");
        // The good record before the bad one was not committed.
        assert_eq!(index.num_products(), 4, "{shown}");
        assert!(skus(&index, "fine", 5)?.is_empty());
    }
    let invalid_utf8 = dir.path().join("latin1.jsonl");
    fs::write(&invalid_utf8, b"{\"sku\":\"C-1\",\"name\":\"Caf\xe9\"}\n")?;
    let err = index.index_jsonl(&invalid_utf8).unwrap_err();
    assert!(
        err.to_string()
            .contains("latin1.jsonl:1: the line is not valid UTF-8"),
        "{err}"
    );
    let missing = dir.path().join("missing.jsonl");
    let err = index.index_jsonl(&missing).unwrap_err();
    assert!(matches!(err, CatalogError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
    Ok(())
}

#[test]
fn a_malformed_csv_is_reported_with_file_and_line() -> Result<()> {
    let (dir, index) = fixture_index()?;
    let cases = [
        (
            "sku,name,price\nB-1,Fine,12\nB-2,Bad,twelve\n",
            "bad.csv:3: price is not a number",
        ),
        (
            "sku,name,attributes\nB-1,Fine,size=L;oops\n",
            "bad.csv:2: attribute \"oops\" is not key=value",
        ),
        (
            "sku,name,stock\nB-1,Fine,-4\n",
            "bad.csv:2: stock is not a whole number",
        ),
        (
            "name,price\nFine,12\n",
            "bad.csv:1: the header has no sku column",
        ),
        (
            "sku,name\nB-1,Fine\nB-2,Bad,extra\n",
            "bad.csv:3: invalid CSV",
        ),
        (
            "sku,name,price\nB-1,Fine,inf\n",
            "bad.csv:2: price must be a finite number",
        ),
    ];
    for (text, expected) in cases {
        let file = dir.path().join("bad.csv");
        fs::write(&file, text)?;
        let err = index.index_csv(&file).unwrap_err();
        assert!(err.to_string().contains(expected), "{err} / {expected}");
        assert_eq!(index.num_products(), 4);
    }
    Ok(())
}

#[test]
fn exact_names_and_questions_rank_their_product_first_on_the_generated_catalog() -> Result<()> {
    let (_dir, index) = generated_index()?;
    let products = &dataset().products;
    let (mut at1, mut at3) = (0usize, 0usize);
    for product in products {
        let top = skus(&index, &product.name, 3)?;
        at1 += usize::from(top.first() == Some(&product.sku));
        at3 += usize::from(top.contains(&product.sku));
    }
    let n = products.len() as f64;
    let (name_at1, name_at3) = (at1 as f64 / n, at3 as f64 / n);

    // Questions that name one product, as a model might paste them into a search.
    let questions: Vec<_> = dataset()
        .questions
        .iter()
        .filter(|q| q.kind != QuestionKind::MultiHop && q.skus.len() == 1)
        .collect();
    let (mut q1, mut q3) = (0usize, 0usize);
    for question in &questions {
        let top = skus(&index, &question.question, 3)?;
        q1 += usize::from(top.first() == Some(&question.skus[0]));
        q3 += usize::from(top.contains(&question.skus[0]));
    }
    let m = questions.len() as f64;
    let (question_at1, question_at3) = (q1 as f64 / m, q3 as f64 / m);
    println!(
        "names: recall@1 {name_at1:.4} recall@3 {name_at3:.4} over {}; \
         questions: recall@1 {question_at1:.4} recall@3 {question_at3:.4} over {}",
        products.len(),
        questions.len()
    );
    assert!(products.len() >= 50 && questions.len() >= 50);
    assert!(
        name_at1 >= 0.99 && name_at3 >= 0.995,
        "{name_at1} {name_at3}"
    );
    assert!(
        question_at1 >= 0.95 && question_at3 >= 0.98,
        "{question_at1} {question_at3}"
    );
    Ok(())
}

#[test]
fn filters_select_exactly_what_a_scan_of_the_catalog_selects() -> Result<()> {
    let (_dir, index) = generated_index()?;
    // The generated catalog has everything in stock; sell a few products out.
    let mut products = dataset().products.clone();
    let mut sold_out = Vec::new();
    for i in [3, 11, 500, 2_399] {
        products[i].stock = 0;
        let p = &products[i];
        sold_out.push(Product {
            sku: p.sku.clone(),
            name: p.name.clone(),
            category: p.category.clone(),
            color: p.color.clone(),
            brand: p.brand.clone(),
            material: p.material.clone(),
            ..product(&p.sku, &p.name, &p.category, p.price, 0)
        });
    }
    index.upsert(&sold_out)?;
    let sample = &products[7];
    let price = sample.price;
    type Predicate = Box<dyn Fn(&retail::Product) -> bool>;
    let cases: Vec<(String, Predicate)> = vec![
        ("category:bags".into(), Box::new(|p| p.category == "bags")),
        ("category:Bag".into(), Box::new(|p| p.category == "bags")),
        ("color:black".into(), Box::new(|p| p.color == "black")),
        (
            "colour:forest-green".into(),
            Box::new(|p| p.color == "forest green"),
        ),
        (
            "brand:northvale".into(),
            Box::new(|p| p.brand == "Northvale"),
        ),
        (
            "material:\"waxed cotton\"".into(),
            Box::new(|p| p.material == "waxed cotton"),
        ),
        (
            "color:black color:navy".into(),
            Box::new(|p| p.color == "black" || p.color == "navy"),
        ),
        (format!("price<{price}"), Box::new(move |p| p.price < price)),
        (
            format!("price<={price}"),
            Box::new(move |p| p.price <= price),
        ),
        (format!("price>{price}"), Box::new(move |p| p.price > price)),
        (
            format!("price>=${price}"),
            Box::new(move |p| p.price >= price),
        ),
        (
            format!("price={price}"),
            Box::new(move |p| p.price == price),
        ),
        (
            "price>50 price<=80".into(),
            Box::new(|p| p.price > 50.0 && p.price <= 80.0),
        ),
        ("stock>0".into(), Box::new(|p| p.stock > 0)),
        ("stock<=20".into(), Box::new(|p| p.stock <= 20)),
        ("stock=0".into(), Box::new(|p| p.stock == 0)),
        ("in_stock:yes".into(), Box::new(|p| p.stock > 0)),
        ("in_stock:no".into(), Box::new(|p| p.stock == 0)),
        (
            "category:bags color:black price<200 in_stock:yes".into(),
            Box::new(|p| {
                p.category == "bags" && p.color == "black" && p.price < 200.0 && p.stock > 0
            }),
        ),
    ];
    for (text, predicate) in cases {
        let expected: BTreeSet<String> = products
            .iter()
            .filter(|p| predicate(p))
            .map(|p| p.sku.clone())
            .collect();
        let found: BTreeSet<String> = skus(&index, &text, 10_000)?.into_iter().collect();
        assert!(
            !expected.is_empty(),
            "{text} selects nothing in the catalog"
        );
        assert_eq!(found, expected, "{text}");
    }

    // Filters combine with free text: every hit passes the filter and matches the text.
    let query = CatalogQuery::parse("tote leather category:bags price<150")?;
    let hits = index.search(&query, 50)?;
    assert!(hits.len() >= 10, "{}", hits.len());
    for hit in &hits {
        let p = &hit.product;
        assert!(
            p.category == "bags" && p.price.is_some_and(|x| x < 150.0),
            "{p:?}"
        );
        let text = format!("{} {}", p.name, p.description).to_lowercase();
        assert!(text.contains("tote") || text.contains("leather"), "{p:?}");
        assert!(hit.score > 0.0);
    }
    // Products that match both words rank above those matching one.
    let first = &hits[0].product;
    assert!(
        first.name.contains("Tote") && first.material == "leather",
        "{first:?}"
    );
    Ok(())
}

#[test]
fn upsert_replaces_by_sku_and_delete_removes() -> Result<()> {
    let (dir, index) = fixture_index()?;
    let mut changed = fixture()[0].clone();
    changed.sku = "sku-00042".into(); // SKUs compare case-insensitively.
    changed.name = "Aurora Weekender".into();
    changed.price = Some(99.0);
    let report = index.upsert(&[changed])?;
    assert_eq!((report.records, report.products), (1, 4));
    let hits = index.search(&CatalogQuery::parse("aurora weekender")?, 4)?;
    assert_eq!(hits[0].product.price, Some(99.0));
    assert_eq!(
        hits.iter()
            .filter(|h| h.product.sku.eq_ignore_ascii_case("SKU-00042"))
            .count(),
        1
    );
    assert!(
        !skus(&index, "price>120", 10)?
            .iter()
            .any(|s| s.eq_ignore_ascii_case("SKU-00042"))
    );

    // Re-indexing the same file is idempotent; it restores the file's version.
    let file = write_jsonl(&dir.path().join("again.jsonl"), &fixture())?;
    assert_eq!(index.index_jsonl(&file)?.products, 4);
    assert_eq!(skus(&index, "price>120 category:bags", 10)?, ["SKU-00042"]);

    // An invalid product writes nothing, not even the valid ones before it.
    let err = index
        .upsert(&[
            product("NEW-1", "New Thing", "mugs", 1.0, 1),
            product("", "X", "mugs", 1.0, 1),
        ])
        .unwrap_err();
    assert!(matches!(err, CatalogError::InvalidProduct { .. }), "{err}");
    assert_eq!(index.num_products(), 4);

    assert_eq!(index.delete(&["SKU-00042", "SKU-99999"])?, 1);
    assert_eq!(index.num_products(), 3);
    assert_eq!(skus(&index, "aurora tote", 3)?, ["SKU-00043"]);
    assert_eq!(index.delete(&["sku-00043"])?, 1);
    assert_eq!(index.delete(&["SKU-00043"])?, 0);
    assert_eq!(index.num_products(), 2);
    Ok(())
}

#[test]
fn the_index_persists_across_reopen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write_jsonl(&dir.path().join("catalog.jsonl"), &fixture())?;
    let queries = [
        "aurora tote",
        "category:bags",
        "mug price<20",
        "green daypack",
    ];
    let before = {
        let index = open(&dir.path().join("index"))?;
        index.index_jsonl(&file)?;
        index.upsert(&[product("NEW-1", "Quartz Lantern", "lamps", 45.0, 2)])?;
        index.delete(&["SKU-00200"])?;
        let mut results = Vec::new();
        for q in queries {
            results.push(index.search(&CatalogQuery::parse(q)?, 5)?);
        }
        results
    };
    let index = open(&dir.path().join("index"))?;
    assert_eq!(index.num_products(), 4);
    for (q, expected) in queries.iter().zip(&before) {
        assert_eq!(&index.search(&CatalogQuery::parse(q)?, 5)?, expected, "{q}");
    }
    assert_eq!(skus(&index, "quartz lantern", 1)?, ["NEW-1"]);
    assert!(skus(&index, "harbor mug", 5)?.is_empty());
    Ok(())
}

#[test]
fn rebuild_replaces_everything_and_keeps_the_old_index_on_error() -> Result<()> {
    let (dir, index) = fixture_index()?;
    let jsonl = write_jsonl(
        &dir.path().join("new.jsonl"),
        &[product("N-1", "Cobalt Sconce", "lamps", 60.0, 5)],
    )?;
    let csv = dir.path().join("new.csv");
    fs::write(
        &csv,
        "sku,name,category,price,stock\nN-2,Birch Stool,chairs,75,1\n",
    )?;
    let sources = [
        CatalogSource::from_path(&jsonl)?,
        CatalogSource::from_path(&csv)?,
    ];
    let report = index.rebuild(&sources)?;
    assert_eq!((report.records, report.products), (2, 2));
    assert!(skus(&index, "aurora tote", 5)?.is_empty());
    assert_eq!(skus(&index, "birch stool", 1)?, ["N-2"]);

    let bad = dir.path().join("bad.jsonl");
    fs::write(&bad, "{\"sku\":\"Z-1\",\"name\":\"Zed\"}\nnot json\n")?;
    let err = index
        .rebuild(&[CatalogSource::from_path(&jsonl)?, CatalogSource::Jsonl(bad)])
        .unwrap_err();
    assert!(err.to_string().contains("bad.jsonl:2:"), "{err}");
    assert_eq!(index.num_products(), 2);
    assert_eq!(skus(&index, "birch stool", 1)?, ["N-2"]);
    Ok(())
}

#[test]
fn csv_and_jsonl_of_the_generated_catalog_index_alike() -> Result<()> {
    let (dir, from_jsonl) = generated_index()?;
    let from_csv = open(&dir.path().join("csv-index"))?;
    from_csv.index_csv(dir.path().join("data").join("catalog.csv"))?;
    assert_eq!(from_csv.num_products(), 2_400);
    for text in [
        "black leather tote",
        "category:lamps price<60",
        "Maple Clutch",
        "13-inch laptop",
    ] {
        let query = CatalogQuery::parse(text)?;
        let a: Vec<Product> = from_jsonl
            .search(&query, 5)?
            .into_iter()
            .map(|h| h.product)
            .collect();
        let b: Vec<Product> = from_csv
            .search(&query, 5)?
            .into_iter()
            .map(|h| h.product)
            .collect();
        assert_eq!(a, b, "{text}");
    }
    Ok(())
}

#[test]
fn a_path_that_cannot_hold_an_index_is_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "x")?;
    let err = CatalogIndex::create_or_open(&file).unwrap_err();
    assert!(err.to_string().contains("not-a-dir"), "{err}");
    Ok(())
}

fn tool_over(index: CatalogIndex) -> Arc<dyn DynTool> {
    Arc::new(CatalogSearchTool::new(Arc::new(index)))
}

#[tokio::test]
async fn hostile_queries_give_results_or_a_clear_error() -> Result<()> {
    let (_dir, index) = fixture_index()?;
    let tool = tool_over(index);
    let long_words = "tote ".repeat(20_000);
    let queries: Vec<String> = [
        "",
        "   ",
        "\"",
        "\"unbalanced quote",
        "((((",
        "))))",
        "[",
        "]",
        "{",
        "}",
        "aurora AND tote",
        "OR",
        "AND OR NOT",
        "title:foo",
        "name:aurora",
        "*",
        "?",
        "~",
        "aurora~2",
        "+aurora -tote",
        "aurora^10",
        "\\",
        "'; DROP TABLE products; --",
        "ä ö ü 日本語 العربية",
        "\u{0}\u{1}\u{7f}",
        "price<0 category:",
        "price<-5",
        "price>1e308",
        "price<1e400",
        "stock>18446744073709551616",
        "category:\"",
        "color:\"forest",
        "in_stock:",
        "<search>aurora</search>",
        "</information>",
        "category:bags category:mugs",
        "price:<<200",
        "::::",
        "<<>>==",
        "aurora:tote",
        "brand:=x",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "🦀".repeat(2_000),
        "a".repeat(100_000),
        long_words,
        "(".repeat(100_000),
    ])
    .collect();
    for query in queries {
        let started = Instant::now();
        let result = tool.call_json(json!({ "query": query })).await;
        let shown: String = query.chars().take(40).collect();
        match result {
            Ok(observation) => assert!(!observation.trim().is_empty(), "{shown}"),
            Err(ToolError::InvalidArguments(message)) => {
                assert!(message.len() > 20, "{shown}: {message}");
            }
            Err(other) => panic!("{shown}: unexpected error {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{shown} was slow"
        );
    }
    // Syntax is plain text: the words around it still find the product.
    let observation = tool
        .call_json(json!({"query": "(aurora AND \"tote\")"}))
        .await?;
    assert!(
        observation.starts_with("[SKU-00042] Aurora Tote"),
        "{observation}"
    );
    Ok(())
}

#[tokio::test]
async fn the_tool_passes_the_core_conformance_suite() -> Result<()> {
    let (_dir, index) = fixture_index()?;
    let report = check_tool(
        tool_over(index),
        &ConformanceConfig::new(json!({"query": "aurora tote"})),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    println!("{report:?}");
    assert!(report.observations > 0 && report.errors > 0, "{report:?}");
    Ok(())
}

#[tokio::test]
async fn observations_are_compact_lines_with_the_facts_questions_ask_about() -> Result<()> {
    let (_dir, index) = generated_index()?;
    let mut registry = ToolRegistry::new();
    registry.register(tool_over(index))?;
    assert_eq!(registry.default_tool(), Some("catalog"));

    let target = &dataset().products[0];
    let outcome = registry
        .invoke(
            "catalog",
            json!({"query": format!("What material is the {}?", target.name)}),
        )
        .await;
    assert!(outcome.error.is_none(), "{outcome:?}");
    // The question names one product exactly and its other words are not in the catalog, so
    // that product is the whole answer.
    assert_eq!(
        outcome.observation.lines().count(),
        1,
        "{}",
        outcome.observation
    );
    let line = outcome.observation.as_str();
    let expected_head = format!(
        "[{}] {} — brand {}, {}, {} {}, {}, ${:.2}, in stock ({})",
        target.sku,
        target.name,
        target.brand,
        target.category,
        target.color,
        target.material,
        target.dimensions,
        target.price,
        target.stock
    );
    assert!(line.starts_with(&expected_head), "{line}\n{expected_head}");
    for (key, value) in &target.attributes {
        assert!(line.contains(&format!("; {key}={value}")), "{line}");
    }

    // Three results by default, about 600 characters in all.
    let outcome = registry
        .invoke("catalog", json!({"query": "black leather tote"}))
        .await;
    let lines: Vec<&str> = outcome.observation.lines().collect();
    assert_eq!(lines.len(), 3, "{}", outcome.observation);
    assert!(
        outcome.observation.chars().count() <= 620,
        "{}",
        outcome.observation
    );
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with('[') && l.contains(" — brand "))
    );

    for (limit, lines) in [
        (json!(10), 10),
        (json!(0), 1),
        (json!(99), 10),
        (json!(1), 1),
    ] {
        let observation = registry
            .invoke("catalog", json!({"query": "tote", "limit": limit}))
            .await
            .observation;
        assert_eq!(observation.lines().count(), lines, "{limit}: {observation}");
        assert!(observation.chars().count() <= 1_300, "{observation}");
    }

    for query in ["zzzqqq xyzzy", "category:spaceships", "tote price<1"] {
        let outcome = registry.invoke("catalog", json!({ "query": query })).await;
        assert!(outcome.error.is_none());
        assert_eq!(outcome.observation.lines().count(), 1);
        assert!(
            outcome.observation.starts_with("No products match"),
            "{}",
            outcome.observation
        );
        assert!(
            outcome.observation.contains("categories: backpacks, bags"),
            "{}",
            outcome.observation
        );
    }
    let outcome = registry
        .invoke("catalog", json!({"query": "price<cheap"}))
        .await;
    assert!(
        matches!(outcome.error, Some(ToolError::InvalidArguments(_))),
        "{outcome:?}"
    );
    assert!(
        outcome.observation.contains("price<200"),
        "{}",
        outcome.observation
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_return_what_sequential_calls_return() -> Result<()> {
    let (_dir, index) = generated_index()?;
    let index = Arc::new(index);
    let tool: Arc<dyn DynTool> = Arc::new(CatalogSearchTool::new(Arc::clone(&index)));
    // The same index searched on tokio's blocking pool must answer exactly as inline searches.
    let pooled: Arc<dyn DynTool> = Arc::new(CatalogSearchTool::with_config(
        index,
        CatalogToolConfig {
            blocking_pool: true,
            ..CatalogToolConfig::default()
        },
    ));
    let names: Vec<String> = dataset()
        .products
        .iter()
        .step_by(7)
        .map(|p| p.name.clone())
        .collect();
    let mut sequential = Vec::new();
    for name in &names {
        sequential.push(tool.call_json(json!({ "query": name, "limit": 1 })).await?);
    }
    let mut tasks = Vec::new();
    for caller in 0..16 {
        let tool = Arc::clone(if caller % 2 == 0 { &tool } else { &pooled });
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (i, name) in names.iter().enumerate().skip(caller % 4) {
                out.push((
                    i,
                    tool.call_json(json!({ "query": name, "limit": 1 })).await,
                ));
            }
            out
        }));
    }
    for task in tasks {
        for (i, result) in task.await.context("a caller panicked")? {
            assert_eq!(result?, sequential[i]);
        }
    }
    for (name, observation) in names.iter().zip(&sequential) {
        assert!(
            observation.contains(&format!("] {name} —")),
            "{name}: {observation}"
        );
    }
    Ok(())
}

/// A multi-hop question describes its product instead of naming it. Its worked solution is the
/// question itself as the search, which ranks the product first for most questions and within
/// the catalog tool's three results for more: what a learned copy of the question can reach.
#[test]
fn multi_hop_solutions_list_their_product_among_the_first_results() -> Result<()> {
    let (_dir, index) = generated_index()?;
    let questions: Vec<_> = dataset()
        .questions
        .iter()
        .filter(|q| q.kind == QuestionKind::MultiHop)
        .collect();
    let (mut at1, mut at3) = (0usize, 0usize);
    for question in &questions {
        ensure!(question.solution.len() == 1, "{question:?}");
        let top = skus(&index, &question.solution[0].input, 3)?;
        at1 += usize::from(top.first() == Some(&question.skus[0]));
        at3 += usize::from(top.contains(&question.skus[0]));
    }
    let n = questions.len();
    println!("{n} multi-hop solutions: the product first for {at1}, within three for {at3}");
    ensure!(n >= 100, "{n}");
    ensure!(at1 * 2 >= n, "{at1} of {n}");
    ensure!(at3 * 10 >= n * 6, "{at3} of {n}");
    Ok(())
}
