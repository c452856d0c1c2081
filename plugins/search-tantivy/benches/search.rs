//! Catalog search benchmark: builds a 100,000-product catalog index, then 16 concurrent callers
//! issue realistic queries through the `DynTool` interface, as the agent loop does.
//!
//! Run with `"$(scripts/built-target.sh bench search)" --bench`. It prints the index build
//! time, the index size on disk, and per-call latency (p50, p99, mean, max), queries per second
//! and CPU per query twice over the same workload: searches inline (the default) and on tokio's
//! blocking pool, with their ratio. It asserts nothing about timings. `SEARCH_BENCH_PRODUCTS` and `SEARCH_BENCH_QUERIES` (per
//! caller) override the sizes.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use searchloop_core::DynTool;
use searchloop_search_tantivy::{
    CatalogIndex, CatalogSearchTool, CatalogToolConfig, Product, Progress,
};
use serde_json::json;

const DEFAULT_PRODUCTS: usize = 100_000;
const CALLERS: usize = 16;
const DEFAULT_QUERIES_PER_CALLER: usize = 2_000;
const WARMUP_QUERIES: usize = 1_000;
const SINGLE_CALLER_QUERIES: usize = 300;

/// A category of the synthetic catalog, shaped like the retail generator's.
struct Category {
    name: &'static str,
    noun: &'static str,
    prefix: &'static str,
    types: &'static [&'static str],
    colours: &'static [&'static str],
    materials: &'static [&'static str],
    brands: &'static [&'static str],
    price: (u32, u32),
    attributes: &'static [(&'static str, &'static [&'static str])],
}

const CATEGORIES: &[Category] = &[
    Category {
        name: "bags",
        noun: "bag",
        prefix: "BAG",
        types: &[
            "Tote",
            "Satchel",
            "Duffel",
            "Crossbody",
            "Clutch",
            "Messenger",
        ],
        colours: &[
            "black", "tan", "navy", "olive", "burgundy", "cream", "grey", "cognac",
        ],
        materials: &["leather", "canvas", "nylon", "suede", "waxed cotton"],
        brands: &[
            "Northvale",
            "Corvell",
            "Brightwater",
            "Hollis",
            "Marlowe",
            "Fenwick",
        ],
        price: (25, 420),
        attributes: &[
            (
                "laptop_size",
                &["11-inch", "13-inch", "14-inch", "15-inch", "16-inch"],
            ),
            (
                "closure",
                &["zip", "magnetic snap", "drawstring", "buckle", "flap"],
            ),
            ("water_resistant", &["yes", "no"]),
        ],
    },
    Category {
        name: "backpacks",
        noun: "backpack",
        prefix: "BPK",
        types: &["Backpack", "Daypack", "Rucksack", "Pack"],
        colours: &[
            "black",
            "charcoal",
            "navy",
            "olive",
            "forest green",
            "mustard",
            "sand",
        ],
        materials: &["nylon", "canvas", "recycled nylon", "polyester", "ripstop"],
        brands: &["Northvale", "Trailcraft", "Summitry", "Wayfarer", "Basalt"],
        price: (35, 320),
        attributes: &[
            ("capacity", &["12 L", "18 L", "22 L", "28 L", "35 L"]),
            ("hip_belt", &["yes", "no"]),
            ("water_resistant", &["yes", "no"]),
        ],
    },
    Category {
        name: "shoes",
        noun: "shoe",
        prefix: "SHO",
        types: &["Sneaker", "Boot", "Loafer", "Runner", "Trainer", "Derby"],
        colours: &["black", "white", "tan", "navy", "grey", "brown", "burgundy"],
        materials: &["leather", "suede", "mesh", "canvas", "knit", "nubuck"],
        brands: &[
            "Strideon", "Corvell", "Pacewell", "Hollis", "Treadway", "Ardent",
        ],
        price: (40, 280),
        attributes: &[
            ("sole", &["rubber", "cork", "foam", "leather"]),
            ("fit", &["narrow", "regular", "wide"]),
            ("waterproof", &["yes", "no"]),
        ],
    },
    Category {
        name: "lamps",
        noun: "lamp",
        prefix: "LMP",
        types: &["Lamp", "Lantern", "Sconce", "Pendant", "Uplight"],
        colours: &[
            "black",
            "white",
            "matte grey",
            "sage",
            "terracotta",
            "brass",
        ],
        materials: &["brass", "ceramic", "glass", "steel", "linen", "paper"],
        brands: &[
            "Lumeno",
            "Halden",
            "Brightwater",
            "Ostra",
            "Vellum",
            "Candela",
        ],
        price: (20, 380),
        attributes: &[
            ("bulb", &["E27", "E14", "GU10", "integrated LED"]),
            ("dimmable", &["yes", "no"]),
            ("wattage", &["5 W", "9 W", "12 W", "40 W"]),
        ],
    },
    Category {
        name: "mugs",
        noun: "mug",
        prefix: "MUG",
        types: &["Mug", "Tumbler", "Cup", "Beaker"],
        colours: &[
            "white",
            "cobalt",
            "speckled grey",
            "forest green",
            "black",
            "sand",
        ],
        materials: &["stoneware", "porcelain", "enamel", "bamboo", "glass"],
        brands: &[
            "Kilnworks",
            "Ostra",
            "Brightwater",
            "Morrow",
            "Claypath",
            "Halden",
        ],
        price: (8, 60),
        attributes: &[
            ("volume", &["250 ml", "300 ml", "350 ml", "450 ml"]),
            ("dishwasher_safe", &["yes", "no"]),
        ],
    },
    Category {
        name: "headphones",
        noun: "headphone",
        prefix: "HPH",
        types: &["Headphones", "Earbuds", "Headset", "Buds"],
        colours: &["black", "white", "silver", "navy", "graphite", "rose"],
        materials: &["plastic", "aluminium", "magnesium", "steel", "silicone"],
        brands: &[
            "Auralis",
            "Tonecraft",
            "Hushline",
            "Basalt",
            "Resona",
            "Quillon",
        ],
        price: (30, 450),
        attributes: &[
            ("connectivity", &["wired", "bluetooth"]),
            ("noise_cancelling", &["yes", "no"]),
            ("battery_life", &["20 h", "30 h", "40 h"]),
        ],
    },
];

const NAME_FIRST: &[&str] = &[
    "Aurora", "Maple", "Opal", "Rowan", "Beacon", "Cedar", "Drift", "Ember", "Fable", "Grove",
    "Harbor", "Indigo", "Juniper", "Kestrel", "Lumen", "Meadow", "Nimbus", "Onyx", "Pebble",
    "Quarry", "Ridge", "Sable", "Tundra", "Umber", "Vale", "Willow", "Yarrow", "Zephyr",
];
const NAME_SECOND: &[&str] = &[
    "Tide", "Stone", "Field", "Crest", "Hollow", "Brook", "Pine", "Dune", "Frost", "Glen", "Heath",
    "Isle", "Knoll", "Marsh", "North", "Peak", "Reef", "Shore", "Thorn", "Vista",
];

/// A small deterministic generator (SplitMix64), so every run benchmarks the same catalog.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// `count` products; names end in their index, since the word lists alone give too few
/// distinct names for a catalog this large.
fn synthetic_catalog(count: usize) -> Vec<Product> {
    let mut rng = Rng(42);
    (0..count)
        .map(|i| {
            let category = &CATEGORIES[i % CATEGORIES.len()];
            let name = format!(
                "{} {} {} {}",
                rng.pick(NAME_FIRST),
                rng.pick(NAME_SECOND),
                rng.pick(category.types),
                i + 1
            );
            let brand = rng.pick(category.brands);
            let color = rng.pick(category.colours);
            let material = rng.pick(category.materials);
            let (w, h, d) = (10 + rng.below(40), 5 + rng.below(40), 3 + rng.below(25));
            let dimensions = format!("{w} x {h} x {d} cm");
            let dollars = category.price.0 as usize + rng.below((category.price.1 - category.price.0) as usize);
            let price = dollars as f64 + [0.99, 0.49, 0.0, 0.95][rng.below(4)];
            let stock = if rng.below(10) == 0 { 0 } else { rng.below(150) as u32 };
            let attributes: BTreeMap<String, String> = category
                .attributes
                .iter()
                .map(|(key, values)| (key.to_string(), rng.pick(values).to_string()))
                .collect();
            let features: Vec<String> = attributes
                .iter()
                .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
                .collect();
            let description = format!(
                "The {name} by {brand} is a {color} {material} {} measuring {dimensions}. Features: {}.",
                category.noun,
                features.join(", ")
            );
            Product {
                sku: format!("{}-{:06}", category.prefix, i + 1),
                name,
                brand: brand.into(),
                category: category.name.into(),
                color: color.into(),
                material: material.into(),
                width_cm: Some(w as f64),
                height_cm: Some(h as f64),
                depth_cm: Some(d as f64),
                dimensions,
                price: Some(price),
                stock: Some(stock),
                description,
                attributes,
            }
        })
        .collect()
}

/// Kinds of query in the mix, with their share in tenths.
const QUERY_KINDS: [(&str, usize); 6] = [
    ("name", 4),
    ("question", 2),
    ("name + category", 1),
    ("name + in_stock", 1),
    ("words + price", 1),
    ("words + category + stock", 1),
];

/// A query a model might write: its kind, its text, and the SKU it should find first when it
/// names one product.
#[derive(Clone)]
struct BenchQuery {
    text: String,
    expected: Option<String>,
}

fn query_of_kind(kind: &str, rng: &mut Rng, products: &[Product]) -> BenchQuery {
    let p = &products[rng.below(products.len())];
    let named = Some(p.sku.clone());
    let (text, expected) = match kind {
        "name" => (p.name.clone(), named),
        "question" if rng.below(2) == 0 => (format!("What material is the {}?", p.name), named),
        "question" => (format!("How much does the {} cost?", p.name), named),
        "name + category" => (format!("{} category:{}", p.name, p.category), named),
        "name + in_stock" => {
            // A sold-out product is rightly not found.
            let in_stock = p.stock.is_some_and(|units| units > 0);
            (
                format!("{} in_stock:yes", p.name),
                named.filter(|_| in_stock),
            )
        }
        "words + price" => {
            let noun = p.name.split(' ').nth(2).unwrap_or_default();
            (format!("{} {} {noun} price<200", p.color, p.material), None)
        }
        _ => (
            format!("{} {} category:{} stock>0", p.color, p.brand, p.category),
            None,
        ),
    };
    BenchQuery { text, expected }
}

fn realistic_query(rng: &mut Rng, products: &[Product]) -> BenchQuery {
    let mut draw = rng.below(10);
    for (kind, share) in QUERY_KINDS {
        if draw < share {
            return query_of_kind(kind, rng, products);
        }
        draw -= share;
    }
    query_of_kind(QUERY_KINDS[0].0, rng, products)
}

fn write_jsonl(path: &Path, products: &[Product]) -> Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for product in products {
        serde_json::to_writer(&mut out, product)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        total += if meta.is_dir() { 0 } else { meta.len() };
    }
    Ok(total)
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("{name}={text:?} is not a count")),
        Err(_) => Ok(default),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// CPU time this process has used so far (user and system, all threads), from
/// `/proc/self/stat` on Linux; `None` elsewhere. Per-query CPU time is what a busy or
/// shared machine cannot distort, unlike wall-clock latency.
fn process_cpu_time() -> Option<Duration> {
    // Linux reports these in USER_HZ ticks, 100 per second on every mainstream configuration.
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis(
        (user + system) * 1_000 / TICKS_PER_SECOND,
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let products_count = env_usize("SEARCH_BENCH_PRODUCTS", DEFAULT_PRODUCTS)?;
    let per_caller = env_usize("SEARCH_BENCH_QUERIES", DEFAULT_QUERIES_PER_CALLER)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "catalog search benchmark: {products_count} products, {CALLERS} callers x {per_caller} queries, {cores} cores"
    );

    let dir = tempfile::tempdir()?;
    let products = synthetic_catalog(products_count);
    let catalog = dir.path().join("catalog.jsonl");
    write_jsonl(&catalog, &products)?;
    let index_dir = dir.path().join("index");
    let index = CatalogIndex::create_or_open(&index_dir)?.with_progress(Progress::Auto);
    let report = index.index_jsonl(&catalog)?;
    println!(
        "index build: {:.2} s for {} products ({:.0} products/s); index size on disk: {:.1} MiB (catalog file {:.1} MiB)",
        report.elapsed.as_secs_f64(),
        report.products,
        report.products as f64 / report.elapsed.as_secs_f64(),
        dir_size(&index_dir)? as f64 / (1 << 20) as f64,
        std::fs::metadata(&catalog)?.len() as f64 / (1 << 20) as f64,
    );

    let index = Arc::new(index);
    let tool: Arc<dyn DynTool> = Arc::new(CatalogSearchTool::new(Arc::clone(&index)));
    let pooled_tool: Arc<dyn DynTool> = Arc::new(CatalogSearchTool::with_config(
        index,
        CatalogToolConfig {
            blocking_pool: true,
            ..CatalogToolConfig::default()
        },
    ));
    let mut rng = Rng(7);
    let warmup: Vec<_> = (0..WARMUP_QUERIES)
        .map(|_| realistic_query(&mut rng, &products))
        .collect();
    let workloads: Vec<Vec<_>> = (0..CALLERS)
        .map(|_| {
            (0..per_caller)
                .map(|_| realistic_query(&mut rng, &products))
                .collect()
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for query in &warmup {
            tool.call_json(json!({ "query": query.text })).await?;
        }
        // One caller alone: the service time of each kind of query, without queueing.
        for (kind, _) in QUERY_KINDS {
            let mut latencies = Vec::new();
            for _ in 0..SINGLE_CALLER_QUERIES {
                let query = query_of_kind(kind, &mut rng, &products);
                let call = Instant::now();
                tool.call_json(json!({ "query": query.text })).await?;
                latencies.push(call.elapsed());
            }
            latencies.sort();
            let mean = latencies.iter().sum::<Duration>() / latencies.len().max(1) as u32;
            println!(
                "one caller, {kind:<25} p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms",
                ms(percentile(&latencies, 0.50)),
                ms(percentile(&latencies, 0.99)),
                ms(mean),
            );
        }
        // The same workload with searches inline (the default) and on tokio's blocking pool.
        let inline = concurrent_run(Arc::clone(&tool), workloads.clone()).await?;
        inline.print("searches inline (default)");
        let pooled = concurrent_run(Arc::clone(&pooled_tool), workloads).await?;
        pooled.print("searches on the blocking pool");
        println!(
            "inline / blocking pool: p99 {:.2}x, CPU per query {:.2}x",
            inline.p99_ms / pooled.p99_ms,
            inline.cpu_ms_per_query / pooled.cpu_ms_per_query,
        );
        anyhow::Ok(())
    })?;
    Ok(())
}

/// What one concurrent run measured.
struct Figures {
    queries: usize,
    wall_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    max_ms: f64,
    cpu_ms_per_query: f64,
    named: usize,
    first: usize,
    mean_chars: f64,
}

impl Figures {
    fn print(&self, label: &str) {
        println!(
            "{label}, {CALLERS} concurrent callers: {} queries in {:.2} s = {:.0} queries/s",
            self.queries,
            self.wall_s,
            self.queries as f64 / self.wall_s
        );
        println!(
            "  latency per call: p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, max {:.3} ms",
            self.p50_ms, self.p99_ms, self.mean_ms, self.max_ms
        );
        println!(
            "  CPU time per query (all threads): {:.3} ms; {:.0} queries/s per fully used core",
            self.cpu_ms_per_query,
            1e3 / self.cpu_ms_per_query
        );
        println!(
            "  named-product queries answered with that product first: {}/{}; mean observation {:.0} chars",
            self.first, self.named, self.mean_chars
        );
    }
}

/// Runs every workload as one concurrent caller of `tool`.
async fn concurrent_run(
    tool: Arc<dyn DynTool>,
    workloads: Vec<Vec<BenchQuery>>,
) -> Result<Figures> {
    let started = Instant::now();
    let cpu_before = process_cpu_time();
    let mut callers = Vec::new();
    for workload in workloads {
        let tool = Arc::clone(&tool);
        callers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(workload.len());
            let (mut named, mut first) = (0usize, 0usize);
            let mut chars = 0usize;
            for BenchQuery { text, expected } in workload {
                let call = Instant::now();
                let observation = tool.call_json(json!({ "query": text })).await;
                latencies.push(call.elapsed());
                let observation = observation?;
                chars += observation.chars().count();
                if let Some(sku) = expected {
                    named += 1;
                    first += usize::from(observation.starts_with(&format!("[{sku}]")));
                }
            }
            anyhow::Ok((latencies, named, first, chars))
        }));
    }
    let mut latencies = Vec::new();
    let (mut named, mut first, mut chars) = (0, 0, 0);
    for caller in callers {
        let (l, n, f, c) = caller.await??;
        latencies.extend(l);
        named += n;
        first += f;
        chars += c;
    }
    let wall = started.elapsed();
    let cpu = cpu_before
        .zip(process_cpu_time())
        .map(|(before, after)| after - before);
    latencies.sort();
    let total = latencies.len();
    let mean = latencies.iter().sum::<Duration>() / total.max(1) as u32;
    Ok(Figures {
        queries: total,
        wall_s: wall.as_secs_f64(),
        p50_ms: ms(percentile(&latencies, 0.50)),
        p99_ms: ms(percentile(&latencies, 0.99)),
        mean_ms: ms(mean),
        max_ms: ms(latencies.last().copied().unwrap_or_default()),
        // Without a process CPU clock the figure reads as not measured.
        cpu_ms_per_query: cpu.map_or(f64::NAN, |cpu| ms(cpu) / total.max(1) as f64),
        named,
        first,
        mean_chars: chars as f64 / total.max(1) as f64,
    })
}
