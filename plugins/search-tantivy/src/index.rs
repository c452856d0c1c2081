//! The persistent catalog index: building it from catalog files, updating it product by
//! product, and searching it.
//!
//! Writes are serialised by a mutex and each is one tantivy commit: a file that fails half-way
//! leaves the index as it was. Reads never wait for writes: every search takes the reader's
//! current searcher, which stays valid while a commit lands, and searches run in parallel from
//! any number of threads.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tantivy::collector::{Count, TopDocs};
use tantivy::directory::MmapDirectory;
use tantivy::query::TermQuery;
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{
    Index, IndexReader, IndexSettings, IndexWriter, ReloadPolicy, TantivyDocument, TantivyError,
};

use crate::error::{CatalogError, Result};
use crate::product::{CatalogSource, Product};
use crate::query::CatalogQuery;
use crate::schema::{ANALYZER, CatalogFields, index_analyzer, query_analyzer};

/// Size of the stored-record blocks compressed together.
const DOCSTORE_BLOCK_BYTES: usize = 4_096;
/// Memory the indexing thread may buffer before it writes a segment.
const WRITER_BUDGET_BYTES: usize = 128 << 20;

/// Whether indexing shows a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A bar on standard error when it is a terminal; nothing otherwise.
    #[default]
    Auto,
    /// Never a bar (tests, services).
    Hidden,
}

/// What an indexing call did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexReport {
    /// Records read and indexed (a record whose SKU was already indexed replaced it).
    pub records: u64,
    /// Products in the index afterwards.
    pub products: u64,
    /// Wall time, including the commit.
    pub elapsed: Duration,
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    /// Relevance within the hit's tier; zero for a query made only of filters.
    pub score: f32,
    /// The product as it was indexed.
    pub product: Product,
}

/// A persistent, searchable product catalog in one directory.
pub struct CatalogIndex {
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: CatalogFields,
    analyzer: TextAnalyzer,
    writer_lock: Mutex<()>,
    progress: Progress,
}

impl std::fmt::Debug for CatalogIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogIndex")
            .field("dir", &self.dir)
            .field("products", &self.num_products())
            .finish()
    }
}

impl CatalogIndex {
    /// Opens the catalog index in `dir`, creating the directory and an empty index when there
    /// is none. Fails when `dir` holds an index of another schema.
    pub fn create_or_open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| CatalogError::Io {
            path: dir.clone(),
            source,
        })?;
        let open_error = |source: TantivyError| CatalogError::Open {
            path: dir.clone(),
            source,
        };
        let directory = MmapDirectory::open(&dir).map_err(|e| open_error(e.into()))?;
        let (schema, fields) = CatalogFields::schema();
        let index = Index::builder()
            .schema(schema)
            .settings(IndexSettings {
                // A search reads a few stored products; smaller blocks mean less to decompress
                // per product, for an index a few percent larger.
                docstore_blocksize: DOCSTORE_BLOCK_BYTES,
                ..IndexSettings::default()
            })
            .open_or_create(directory)
            .map_err(open_error)?;
        index.tokenizers().register(ANALYZER, index_analyzer());
        let reader = index
            .reader_builder()
            // Picks up commits made by other processes (a CLI rebuilding the catalog under a
            // running server); this process's own commits reload the reader at once.
            .reload_policy(ReloadPolicy::OnCommitWithDelay)
            .try_into()
            .map_err(open_error)?;
        Ok(Self {
            dir,
            index,
            reader,
            fields,
            analyzer: query_analyzer(),
            writer_lock: Mutex::new(()),
            progress: Progress::Auto,
        })
    }

    /// Sets whether indexing shows a progress bar.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// The index directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Products in the index.
    pub fn num_products(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Adds or replaces (by SKU) every product of a JSONL file, in one commit.
    pub fn index_jsonl(&self, path: impl AsRef<Path>) -> Result<IndexReport> {
        self.index_sources(&[CatalogSource::Jsonl(path.as_ref().to_path_buf())], false)
    }

    /// Adds or replaces (by SKU) every product of a CSV file, in one commit.
    pub fn index_csv(&self, path: impl AsRef<Path>) -> Result<IndexReport> {
        self.index_sources(&[CatalogSource::Csv(path.as_ref().to_path_buf())], false)
    }

    /// Replaces the whole index with the products of `sources`, in one commit: on any error
    /// the previous contents stay.
    pub fn rebuild(&self, sources: &[CatalogSource]) -> Result<IndexReport> {
        self.index_sources(sources, true)
    }

    /// Adds or replaces (by SKU, case-insensitively) `products`, in one commit. Nothing is
    /// written when one of them is invalid.
    pub fn upsert(&self, products: &[Product]) -> Result<IndexReport> {
        for product in products {
            product
                .validate()
                .map_err(|message| CatalogError::InvalidProduct {
                    sku: product.sku.clone(),
                    message,
                })?;
        }
        let started = Instant::now();
        self.write(false, |writer| {
            for product in products {
                self.add(writer, product)?;
            }
            Ok(())
        })?;
        Ok(self.report(products.len() as u64, started))
    }

    /// Removes the products with these SKUs (case-insensitively), in one commit, and returns
    /// how many were in the index.
    pub fn delete<S: AsRef<str>>(&self, skus: &[S]) -> Result<u64> {
        let searcher = self.reader.searcher();
        self.write(false, |writer| {
            let mut present = 0;
            for sku in skus {
                let term = self.fields.sku_term(sku.as_ref());
                let query = TermQuery::new(term.clone(), IndexRecordOption::Basic);
                present += searcher
                    .search(&query, &Count)
                    .map_err(|source| self.index_error("count products by sku", source))?
                    as u64;
                writer.delete_term(term);
            }
            Ok(present)
        })
    }

    /// The best `limit` products for a query (`limit` is at least 1), all meeting its filters.
    ///
    /// Matching goes in tiers, each ranked by BM25 score (the name weighing most), until
    /// `limit` products are found:
    ///
    /// 1. When the query contains a product's exact name or SKU: those products, then other
    ///    products containing every query word; nothing else, so a question around a name
    ///    ("What colour is the Aurora Tote?") answers with that product alone when its other
    ///    words are not in the catalog.
    /// 2. Otherwise: products containing every query word that the catalog has (words it lacks
    ///    are ignored), then products containing any of them.
    /// 3. A query of filters alone: matching products in catalog order, score 0.
    ///
    /// Tiers 1 and 2 are intersections led by their rarest word, so the common searches touch
    /// few postings; only the last "any word" tier can visit much of the catalog.
    pub fn search(&self, query: &CatalogQuery, limit: usize) -> Result<Vec<SearchHit>> {
        let searcher = self.reader.searcher();
        let limit = limit.clamp(1, searcher.num_docs().max(1) as usize);
        let mut analyzer = self.analyzer.clone();
        let tantivy_query = query
            .to_tantivy(&self.fields, &searcher, &mut analyzer)
            .map_err(|source| self.index_error("build a query", source))?;
        let mut seen = HashSet::new();
        let mut top = Vec::new();
        for tier in tantivy_query.tiers() {
            if top.len() == limit {
                break;
            }
            // A tier's best `limit` hold at least as many new products as are missing, since
            // at most `top.len()` of them were already found.
            let collector = TopDocs::with_limit(limit);
            let hits = if tantivy_query.numeric.is_empty() {
                searcher.search(&*tier, &collector)
            } else {
                searcher.search(&*tier, &tantivy_query.numeric.wrap(collector))
            }
            .map_err(|source| self.index_error("search", source))?;
            for (score, address) in hits {
                if top.len() < limit && seen.insert(address) {
                    top.push((score, address));
                }
            }
        }
        top.into_iter()
            .map(|(score, address)| {
                let doc: TantivyDocument = searcher
                    .doc(address)
                    .map_err(|source| self.index_error("read a stored product", source))?;
                let record = doc
                    .get_first(self.fields.record)
                    .and_then(|value| value.as_str())
                    .unwrap_or_default();
                let product = serde_json::from_str(record).map_err(|e| CatalogError::Corrupt {
                    path: self.dir.clone(),
                    message: e.to_string(),
                })?;
                Ok(SearchHit { score, product })
            })
            .collect()
    }

    /// The categories in the index, sorted, for hints when a search finds nothing.
    pub fn categories(&self) -> Result<Vec<String>> {
        let searcher = self.reader.searcher();
        let mut categories = std::collections::BTreeSet::new();
        for segment in searcher.segment_readers() {
            let inverted = segment
                .inverted_index(self.fields.category_key)
                .map_err(|source| self.index_error("list categories", source))?;
            let mut stream = inverted
                .terms()
                .stream()
                .map_err(|source| self.index_error("list categories", source.into()))?;
            while stream.advance() {
                categories.insert(String::from_utf8_lossy(stream.key()).into_owned());
            }
        }
        Ok(categories.into_iter().collect())
    }

    fn index_sources(&self, sources: &[CatalogSource], replace_all: bool) -> Result<IndexReport> {
        let started = Instant::now();
        let records = self.write(true, |writer| {
            if replace_all {
                writer
                    .delete_all_documents()
                    .map_err(|source| self.index_error("clear the index", source))?;
            }
            let mut records = 0u64;
            for source in sources {
                let bar = self.progress_bar(source)?;
                source.read(|product, bytes_read| {
                    self.add(writer, &product)?;
                    records += 1;
                    bar.set_position(bytes_read);
                    Ok(())
                })?;
                bar.finish_and_clear();
            }
            Ok(records)
        })?;
        Ok(self.report(records, started))
    }

    fn progress_bar(&self, source: &CatalogSource) -> Result<ProgressBar> {
        if self.progress == Progress::Hidden || !std::io::stderr().is_terminal() {
            return Ok(ProgressBar::hidden());
        }
        let style = ProgressStyle::with_template(
            "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::new(source.len()?).with_style(style);
        bar.set_message(format!("indexing {}", source.path().display()));
        Ok(bar)
    }

    /// Queues `product` to replace any product with its SKU.
    fn add(&self, writer: &IndexWriter, product: &Product) -> Result<()> {
        let doc = self
            .fields
            .document(product)
            .map_err(|e| CatalogError::InvalidProduct {
                sku: product.sku.clone(),
                message: e.to_string(),
            })?;
        // The delete is stamped before the add, so it removes older versions but not this one.
        writer.delete_term(self.fields.sku_term(&product.sku));
        writer
            .add_document(doc)
            .map_err(|source| self.index_error("add a product", source))?;
        Ok(())
    }

    /// Runs `f` with a fresh writer and commits if it succeeds; on error nothing is committed.
    /// The writer (and tantivy's directory lock) lives only for the call, so other processes
    /// may write the index in between.
    ///
    /// `compact` merges the whole index into one segment after the commit: worth it after a
    /// bulk load, since every search pays per segment, but not after a small update.
    fn write<T>(&self, compact: bool, f: impl FnOnce(&mut IndexWriter) -> Result<T>) -> Result<T> {
        // A panic while holding the lock leaves no shared state behind (the writer is dropped
        // uncommitted), so a poisoned lock is safe to take.
        let _guard = self
            .writer_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // One indexing thread keeps documents in input order, so equal scores (and queries made
        // only of filters) rank the same way every time the same catalog is indexed: searches,
        // and the trajectories recorded from them, are reproducible.
        let mut writer: IndexWriter = self
            .index
            .writer_with_num_threads(1, WRITER_BUDGET_BYTES)
            .map_err(|source| self.index_error("open a writer", source))?;
        let value = f(&mut writer)?;
        writer
            .commit()
            .map_err(|source| self.index_error("commit", source))?;
        let segments = self
            .index
            .searchable_segment_ids()
            .map_err(|source| self.index_error("list segments", source))?;
        if compact && segments.len() > 1 {
            writer
                .merge(&segments)
                .wait()
                .map_err(|source| self.index_error("merge segments", source))?;
        }
        // Finishing merges now keeps the segment count, and so search latency, low.
        writer
            .wait_merging_threads()
            .map_err(|source| self.index_error("merge segments", source))?;
        self.reader
            .reload()
            .map_err(|source| self.index_error("reload the reader", source))?;
        Ok(value)
    }

    fn report(&self, records: u64, started: Instant) -> IndexReport {
        IndexReport {
            records,
            products: self.num_products(),
            elapsed: started.elapsed(),
        }
    }

    fn index_error(&self, action: &'static str, source: TantivyError) -> CatalogError {
        CatalogError::Index {
            path: self.dir.clone(),
            action,
            source,
        }
    }
}
