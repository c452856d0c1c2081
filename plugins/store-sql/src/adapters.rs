//! The adapter registry: every trained LoRA adapter with its lineage, training summary and eval
//! results, and the transactional promote / reject / roll back life cycle that keeps at most one
//! adapter promoted.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    backend::{col, on_read, on_write},
    codec,
    error::{DbContext, Result, StoreError},
    query::Cursor,
    store::Store,
};

/// Where an adapter is in its life cycle.
///
/// ```text
/// staging --publish--> candidate --promote--> promoted --promote another--> superseded --promote/rollback--> promoted
///     |                     |
///  reject                rollback
///     v                     v
///  rejected            rolled_back
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterStatus {
    /// Its version is reserved while a round writes it; not yet published (see
    /// [`Store::stage_adapter`]).
    Staging,
    /// Registered, not yet judged.
    Candidate,
    /// Serving. At most one adapter is promoted at a time.
    Promoted,
    /// Was promoted, then replaced by a newer promotion; a rollback can return to it.
    Superseded,
    /// Judged not good enough; never promoted.
    Rejected,
    /// Was promoted, then rolled back.
    RolledBack,
}

impl AdapterStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterStatus::Staging => "staging",
            AdapterStatus::Candidate => "candidate",
            AdapterStatus::Promoted => "promoted",
            AdapterStatus::Superseded => "superseded",
            AdapterStatus::Rejected => "rejected",
            AdapterStatus::RolledBack => "rolled_back",
        }
    }

    fn parse(version: i64, name: &str) -> Result<Self> {
        Ok(match name {
            "staging" => AdapterStatus::Staging,
            "candidate" => AdapterStatus::Candidate,
            "promoted" => AdapterStatus::Promoted,
            "superseded" => AdapterStatus::Superseded,
            "rejected" => AdapterStatus::Rejected,
            "rolled_back" => AdapterStatus::RolledBack,
            other => {
                return Err(StoreError::CorruptRecord {
                    id: format!("adapter {version}"),
                    detail: format!("unknown status '{other}'"),
                });
            }
        })
    }
}

impl fmt::Display for AdapterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An adapter to register; the store assigns its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAdapter {
    /// Hash of the adapter's weights (e.g. sha256 hex).
    pub content_hash: String,
    /// The version it was trained from (`None`: from the base model).
    pub parent_version: Option<u64>,
    /// Where the weights are.
    pub path: String,
    /// The training configuration.
    pub training_config: serde_json::Value,
    /// A summary of the training metrics.
    pub metrics_summary: serde_json::Value,
    /// When it was made; `None` means now.
    pub created_at: Option<DateTime<Utc>>,
}

/// The PEFT files of a published adapter, kept in the registry so that a serving replica on
/// another machine fetches the adapter from the store rather than from a shared disk.
#[derive(Clone, PartialEq, Eq)]
pub struct AdapterFiles {
    /// The text of `adapter_config.json`.
    pub peft_config: String,
    /// The bytes of `adapter_model.safetensors`; their sha256 is the adapter's content hash.
    pub weights: Vec<u8>,
}

impl fmt::Debug for AdapterFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdapterFiles")
            .field("peft_config", &self.peft_config)
            .field("weights_bytes", &self.weights.len())
            .finish()
    }
}

impl AdapterFiles {
    /// The content hash of the weights: sha256, in lowercase hex.
    pub fn content_hash(&self) -> String {
        format!("{:x}", Sha256::digest(&self.weights))
    }
}

/// What a round leaves in the registry for the rounds trained from its adapter: where its
/// reading of host feedback stopped, and the running mean feedback reward per task kind.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LearningState {
    /// The next round from this adapter reads feedback changed after this point.
    pub feedback_cursor: Cursor,
    /// The running mean feedback reward by task kind.
    pub baselines: BTreeMap<String, RunningMean>,
}

/// A mean over a stream of rewards: a plain mean for the first [`RunningMean::WINDOW`], then
/// an exponential moving average with weight `1 / WINDOW`, so it follows a policy that
/// improves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMean {
    /// The mean reward.
    pub mean: f64,
    /// Rewards seen (the mean weighs at most the last [`RunningMean::WINDOW`] evenly).
    pub count: u64,
}

impl RunningMean {
    /// Rewards over which the mean is plain; after that each new one replaces `1 / WINDOW` of it.
    pub const WINDOW: u64 = 256;

    /// Adds one reward.
    pub fn add(&mut self, reward: f64) {
        self.count = self.count.saturating_add(1);
        let weight = 1.0 / self.count.min(Self::WINDOW) as f64;
        self.mean += (reward - self.mean) * weight;
    }
}

/// A [`LearningState`] checked and encoded for its rows.
struct EncodedState {
    cursor: i64,
    baselines: Vec<(String, f64, i64)>,
}

impl EncodedState {
    fn new(state: &LearningState) -> Result<Self> {
        let mut baselines = Vec::with_capacity(state.baselines.len());
        for (kind, b) in &state.baselines {
            if !b.mean.is_finite() {
                return Err(StoreError::InvalidArgument(format!(
                    "the feedback baseline of kind '{kind}' is {}",
                    b.mean
                )));
            }
            baselines.push((
                kind.clone(),
                b.mean,
                codec::to_i64("baseline count", b.count)?,
            ));
        }
        Ok(Self {
            cursor: state.feedback_cursor.to_stored(),
            baselines,
        })
    }
}

/// A registered adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    /// Its version, assigned by the store: 1, 2, 3, ... never reused.
    pub version: u64,
    /// Hash of the weights.
    pub content_hash: String,
    /// The version it was trained from.
    pub parent_version: Option<u64>,
    /// Where the weights are.
    pub path: String,
    /// The training configuration.
    pub training_config: serde_json::Value,
    /// A summary of the training metrics.
    pub metrics_summary: serde_json::Value,
    /// Evaluation results, once set.
    pub eval_results: Option<serde_json::Value>,
    /// Where it is in its life cycle.
    pub status: AdapterStatus,
    /// Why it was rejected or rolled back.
    pub status_reason: Option<String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// What a promotion history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromotionAction {
    /// [`Store::promote`].
    Promote,
    /// [`Store::rollback`].
    Rollback,
}

/// One entry of the promotion history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromotionEvent {
    /// The version serving afterwards (`None`: the base model).
    pub version: Option<u64>,
    /// What happened.
    pub action: PromotionAction,
    /// Why, when given.
    pub reason: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

const ADAPTER_COLUMNS: &str = "version, content_hash, parent_version, path, training_config, \
     metrics_summary, eval_results, status, status_reason, created_at_ns";

/// An adapter row as stored.
struct RawAdapter {
    version: i64,
    content_hash: String,
    parent_version: Option<i64>,
    path: String,
    training_config: String,
    metrics_summary: String,
    eval_results: Option<String>,
    status: String,
    status_reason: Option<String>,
    created_at_ns: i64,
}

/// Reads a [`RawAdapter`] from a row selected with [`ADAPTER_COLUMNS`].
macro_rules! raw_adapter {
    ($row:expr) => {{
        let row = $row;
        RawAdapter {
            version: col!(row, "version"),
            content_hash: col!(row, "content_hash"),
            parent_version: col!(row, "parent_version"),
            path: col!(row, "path"),
            training_config: col!(row, "training_config"),
            metrics_summary: col!(row, "metrics_summary"),
            eval_results: col!(row, "eval_results"),
            status: col!(row, "status"),
            status_reason: col!(row, "status_reason"),
            created_at_ns: col!(row, "created_at_ns"),
        }
    }};
}

/// Reads adapter `$version` inside `$tx`, or `None`.
macro_rules! fetch_adapter {
    ($tx:expr, $version:expr) => {{
        let sql = format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE version = $1");
        let row = sqlx::query(&sql)
            .bind($version)
            .fetch_optional(&mut *$tx)
            .await
            .ctx("read an adapter")?;
        match row {
            Some(row) => Some(raw_adapter!(&row).decode()?),
            None => None,
        }
    }};
}

/// Starts a registry transaction in `$pool`: the write lock, plus PostgreSQL's registry lock so
/// concurrent promotions run one after the other instead of failing on the unique index.
macro_rules! begin_registry {
    ($pool:expr, $d:expr) => {{
        let mut tx = $pool
            .begin_with($d.begin_write)
            .await
            .ctx("begin an adapter registry change")?;
        if let Some(lock) = $d.lock_registry {
            sqlx::query(lock)
                .execute(&mut *tx)
                .await
                .ctx("lock the adapter registry")?;
        }
        tx
    }};
}

/// Queues the registry-change notification in `$tx`, delivered when it commits.
macro_rules! notify_registry {
    ($tx:expr, $d:expr) => {
        if let Some(notify) = $d.notify_registry {
            sqlx::query(notify)
                .execute(&mut *$tx)
                .await
                .ctx("notify the adapter registry's listeners")?;
        }
    };
}

impl RawAdapter {
    fn decode(self) -> Result<AdapterRecord> {
        let id = format!("adapter {}", self.version);
        let json = |column: &str, text: &str| {
            serde_json::from_str(text).map_err(|e| StoreError::CorruptRecord {
                id: id.clone(),
                detail: format!("{column} is not JSON: {e}"),
            })
        };
        Ok(AdapterRecord {
            version: codec::to_u64(&id, "version", self.version)?,
            content_hash: self.content_hash,
            parent_version: self
                .parent_version
                .map(|v| codec::to_u64(&id, "parent_version", v))
                .transpose()?,
            path: self.path,
            training_config: json("training_config", &self.training_config)?,
            metrics_summary: json("metrics_summary", &self.metrics_summary)?,
            eval_results: self
                .eval_results
                .as_deref()
                .map(|e| json("eval_results", e))
                .transpose()?,
            status: AdapterStatus::parse(self.version, &self.status)?,
            status_reason: self.status_reason,
            created_at: codec::from_nanos(self.created_at_ns),
        })
    }
}

fn to_json(what: &str, value: &serde_json::Value) -> Result<String> {
    serde_json::to_string(value).map_err(|source| StoreError::Json {
        context: format!("encode the {what}"),
        source,
    })
}

fn now_nanos() -> Result<i64> {
    codec::to_nanos("current time", Utc::now())
}

/// A [`NewAdapter`] checked and encoded for its row.
struct EncodedAdapter {
    parent: Option<i64>,
    created_at_ns: i64,
    config: String,
    metrics: String,
}

impl EncodedAdapter {
    fn new(adapter: &NewAdapter) -> Result<Self> {
        if adapter.content_hash.is_empty() || adapter.path.is_empty() {
            return Err(StoreError::InvalidArgument(
                "an adapter needs a content hash and a path".into(),
            ));
        }
        Ok(Self {
            parent: adapter
                .parent_version
                .map(|v| codec::to_i64("parent version", v))
                .transpose()?,
            created_at_ns: codec::to_nanos(
                "adapter creation time",
                adapter.created_at.unwrap_or_else(Utc::now),
            )?,
            config: to_json("training config", &adapter.training_config)?,
            metrics: to_json("metrics summary", &adapter.metrics_summary)?,
        })
    }
}

/// Fails with [`StoreError::UnknownAdapter`] unless parent version `$parent` (as stored;
/// `$version` as given) is registered, inside `$tx`; `None` (the base model) always passes.
macro_rules! check_parent {
    ($tx:expr, $parent:expr, $version:expr) => {{
        if let (Some(parent), Some(v)) = ($parent, $version) {
            let found: Option<i64> =
                sqlx::query_scalar("SELECT version FROM adapters WHERE version = $1")
                    .bind(parent)
                    .fetch_optional(&mut *$tx)
                    .await
                    .ctx("look up the parent adapter")?;
            if found.is_none() {
                return Err(StoreError::UnknownAdapter(v));
            }
        }
    }};
}

impl Store {
    /// Registers a trained adapter as a [`AdapterStatus::Candidate`] and returns it with the
    /// version the store assigned (one more than any version ever assigned). A round that
    /// writes its files under the version's name reserves the version first instead
    /// ([`Store::stage_adapter`], then [`Store::publish_adapter`]).
    pub async fn register_adapter(&self, adapter: NewAdapter) -> Result<AdapterRecord> {
        let new = EncodedAdapter::new(&adapter)?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            check_parent!(tx, new.parent, adapter.parent_version);
            let version: i64 = sqlx::query_scalar(
                "INSERT INTO adapters (content_hash, parent_version, path, training_config, \
                 metrics_summary, status, created_at_ns) \
                 VALUES ($1, $2, $3, $4, $5, 'candidate', $6) RETURNING version",
            )
            .bind(&adapter.content_hash)
            .bind(new.parent)
            .bind(&adapter.path)
            .bind(&new.config)
            .bind(&new.metrics)
            .bind(new.created_at_ns)
            .fetch_one(&mut *tx)
            .await
            .ctx("register an adapter")?;
            let record = fetch_adapter!(tx, version).ok_or_else(|| StoreError::CorruptRecord {
                id: format!("adapter {version}"),
                detail: "not readable right after its registration".into(),
            })?;
            tx.commit().await.ctx("commit an adapter registration")?;
            Ok(record)
        })
    }

    /// Reserves the next version for an adapter a round is about to write, as a
    /// [`AdapterStatus::Staging`] row: the round names its files after the version and
    /// publishes them with [`Store::publish_adapter`], or gives the version up with
    /// [`Store::discard_staged`]. A reserved version is never assigned again, so a discarded
    /// round leaves a gap in the numbering.
    pub async fn stage_adapter(&self, parent_version: Option<u64>) -> Result<u64> {
        let parent = parent_version
            .map(|v| codec::to_i64("parent version", v))
            .transpose()?;
        let at_ns = now_nanos()?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            check_parent!(tx, parent, parent_version);
            // The placeholder texts are replaced when the adapter is published.
            let version: i64 = sqlx::query_scalar(
                "INSERT INTO adapters (content_hash, parent_version, path, training_config, \
                 metrics_summary, status, created_at_ns) \
                 VALUES ('', $1, '', '{}', '{}', 'staging', $2) RETURNING version",
            )
            .bind(parent)
            .bind(at_ns)
            .fetch_one(&mut *tx)
            .await
            .ctx("reserve an adapter version")?;
            tx.commit().await.ctx("commit an adapter reservation")?;
            codec::to_u64("adapter reservation", "version", version)
        })
    }

    /// Publishes staged adapter `version` as a [`AdapterStatus::Candidate`] with its files
    /// (kept in the registry; their hash must be `adapter.content_hash`) and, when given, the
    /// learning state its round leaves for the rounds trained from it, in one transaction.
    /// `adapter.parent_version` must be the one it was staged with.
    pub async fn publish_adapter(
        &self,
        version: u64,
        adapter: NewAdapter,
        files: &AdapterFiles,
        state: Option<&LearningState>,
    ) -> Result<AdapterRecord> {
        let v = codec::to_i64("adapter version", version)?;
        let new = EncodedAdapter::new(&adapter)?;
        let hash = files.content_hash();
        if hash != adapter.content_hash {
            return Err(StoreError::InvalidArgument(format!(
                "adapter v{version}'s weights hash to {hash}, not to its content hash {}",
                adapter.content_hash
            )));
        }
        if files.peft_config.contains('\0') {
            return Err(StoreError::InvalidArgument(format!(
                "adapter v{version}'s PEFT config contains a NUL character"
            )));
        }
        let state = state.map(EncodedState::new).transpose()?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            let staged = fetch_adapter!(tx, v).ok_or(StoreError::UnknownAdapter(version))?;
            if staged.status != AdapterStatus::Staging {
                return Err(StoreError::InvalidTransition {
                    version,
                    from: staged.status,
                    action: "published (only a staged adapter can be)",
                });
            }
            if staged.parent_version != adapter.parent_version {
                return Err(StoreError::InvalidArgument(format!(
                    "adapter v{version} was staged with parent {:?}, not {:?}",
                    staged.parent_version, adapter.parent_version
                )));
            }
            sqlx::query(
                "UPDATE adapters SET content_hash = $1, path = $2, training_config = $3, \
                 metrics_summary = $4, status = 'candidate', created_at_ns = $5 \
                 WHERE version = $6",
            )
            .bind(&adapter.content_hash)
            .bind(&adapter.path)
            .bind(&new.config)
            .bind(&new.metrics)
            .bind(new.created_at_ns)
            .bind(v)
            .execute(&mut *tx)
            .await
            .ctx("publish a staged adapter")?;
            sqlx::query(
                "INSERT INTO adapter_files (version, peft_config, weights) VALUES ($1, $2, $3)",
            )
            .bind(v)
            .bind(&files.peft_config)
            .bind(files.weights.as_slice())
            .execute(&mut *tx)
            .await
            .ctx("store an adapter's files")?;
            if let Some(state) = &state {
                sqlx::query(
                    "INSERT INTO adapter_feedback_state (version, feedback_cursor) VALUES ($1, $2)",
                )
                .bind(v)
                .bind(state.cursor)
                .execute(&mut *tx)
                .await
                .ctx("record an adapter's feedback cursor")?;
                for (kind, mean, count) in &state.baselines {
                    sqlx::query(
                        "INSERT INTO adapter_feedback_baselines (version, kind, mean, count) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(v)
                    .bind(kind)
                    .bind(mean)
                    .bind(count)
                    .execute(&mut *tx)
                    .await
                    .ctx("record an adapter's feedback baseline")?;
                }
            }
            let record = fetch_adapter!(tx, v).ok_or(StoreError::UnknownAdapter(version))?;
            tx.commit().await.ctx("commit an adapter publication")?;
            Ok(record)
        })
    }

    /// Gives up staged adapter `version` (its round failed or was cancelled): the row is
    /// deleted, and its version is never assigned again. A version that is not staged is
    /// refused.
    pub async fn discard_staged(&self, version: u64) -> Result<()> {
        let v = codec::to_i64("adapter version", version)?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            let staged = fetch_adapter!(tx, v).ok_or(StoreError::UnknownAdapter(version))?;
            if staged.status != AdapterStatus::Staging {
                return Err(StoreError::InvalidTransition {
                    version,
                    from: staged.status,
                    action: "discarded (only a staged adapter can be)",
                });
            }
            sqlx::query("DELETE FROM adapters WHERE version = $1 AND status = 'staging'")
                .bind(v)
                .execute(&mut *tx)
                .await
                .ctx("discard a staged adapter")?;
            tx.commit().await.ctx("commit a discarded reservation")?;
            Ok(())
        })
    }

    /// The versions still staged, oldest first: rounds in progress, or rounds whose process
    /// died before publishing or discarding them.
    pub async fn staged_adapters(&self) -> Result<Vec<u64>> {
        on_read!(self, |pool, _d| {
            let versions: Vec<i64> = sqlx::query_scalar(
                "SELECT version FROM adapters WHERE status = 'staging' ORDER BY version",
            )
            .fetch_all(pool)
            .await
            .ctx("list staged adapters")?;
            versions
                .into_iter()
                .map(|v| codec::to_u64("staged adapter", "version", v))
                .collect()
        })
    }

    /// The learning state the round that produced adapter `version` left for the rounds
    /// trained from it, or `None` when it left none (an adapter registered by hand). An
    /// unregistered version is [`StoreError::UnknownAdapter`].
    pub async fn learning_state(&self, version: u64) -> Result<Option<LearningState>> {
        let v = codec::to_i64("adapter version", version)?;
        on_read!(self, |pool, _d| {
            let mut conn = pool.acquire().await.ctx("acquire a connection")?;
            let registered: Option<i64> =
                sqlx::query_scalar("SELECT version FROM adapters WHERE version = $1")
                    .bind(v)
                    .fetch_optional(&mut *conn)
                    .await
                    .ctx("look up an adapter")?;
            if registered.is_none() {
                return Err(StoreError::UnknownAdapter(version));
            }
            let cursor: Option<i64> = sqlx::query_scalar(
                "SELECT feedback_cursor FROM adapter_feedback_state WHERE version = $1",
            )
            .bind(v)
            .fetch_optional(&mut *conn)
            .await
            .ctx("read an adapter's feedback cursor")?;
            let Some(cursor) = cursor else {
                return Ok(None);
            };
            let id = format!("adapter {version}");
            let rows = sqlx::query(
                "SELECT kind, mean, count FROM adapter_feedback_baselines WHERE version = $1 \
                 ORDER BY kind",
            )
            .bind(v)
            .fetch_all(&mut *conn)
            .await
            .ctx("read an adapter's feedback baselines")?;
            let mut baselines = BTreeMap::new();
            for row in &rows {
                let kind: String = col!(row, "kind");
                let mean: f64 = col!(row, "mean");
                let count: i64 = col!(row, "count");
                if !mean.is_finite() {
                    return Err(StoreError::CorruptRecord {
                        id,
                        detail: format!("the feedback baseline of kind '{kind}' is {mean}"),
                    });
                }
                let count = codec::to_u64(&id, "feedback baseline count", count)?;
                baselines.insert(kind, RunningMean { mean, count });
            }
            Ok(Some(LearningState {
                feedback_cursor: Cursor::from_stored(&id, cursor)?,
                baselines,
            }))
        })
    }

    /// Adapter `version`, or `None`.
    pub async fn get_adapter(&self, version: u64) -> Result<Option<AdapterRecord>> {
        let version = codec::to_i64("adapter version", version)?;
        on_read!(self, |pool, _d| {
            let mut conn = pool.acquire().await.ctx("acquire a connection")?;
            Ok(fetch_adapter!(conn, version))
        })
    }

    /// The files adapter `version` was published with, checked against its content hash;
    /// `None` when it has none in the registry (registered by path, or before the registry kept
    /// files). Bytes that do not hash to the adapter's content hash are an error, never
    /// returned.
    pub async fn adapter_files(&self, version: u64) -> Result<Option<AdapterFiles>> {
        let v = codec::to_i64("adapter version", version)?;
        let found = on_read!(self, |pool, _d| {
            let row = sqlx::query(
                "SELECT a.content_hash, f.peft_config, f.weights FROM adapter_files f \
                 JOIN adapters a ON a.version = f.version WHERE f.version = $1",
            )
            .bind(v)
            .fetch_optional(pool)
            .await
            .ctx("read an adapter's files")?;
            match row {
                Some(row) => {
                    let hash: String = col!(&row, "content_hash");
                    let files = AdapterFiles {
                        peft_config: col!(&row, "peft_config"),
                        weights: col!(&row, "weights"),
                    };
                    Some((hash, files))
                }
                None => None,
            }
        });
        let Some((hash, files)) = found else {
            return Ok(None);
        };
        let actual = files.content_hash();
        if actual != hash {
            return Err(StoreError::CorruptRecord {
                id: format!("adapter {version}"),
                detail: format!(
                    "its stored weights hash to {actual}, not to its content hash {hash}"
                ),
            });
        }
        Ok(Some(files))
    }

    /// Every adapter, oldest first.
    pub async fn list_adapters(&self) -> Result<Vec<AdapterRecord>> {
        on_read!(self, |pool, _d| {
            let rows = sqlx::query(&format!(
                "SELECT {ADAPTER_COLUMNS} FROM adapters ORDER BY version"
            ))
            .fetch_all(pool)
            .await
            .ctx("list adapters")?;
            let mut adapters = Vec::with_capacity(rows.len());
            for row in &rows {
                adapters.push(raw_adapter!(row).decode()?);
            }
            Ok(adapters)
        })
    }

    /// The promoted adapter, or `None` when the base model serves.
    pub async fn promoted(&self) -> Result<Option<AdapterRecord>> {
        on_read!(self, |pool, _d| {
            let row = sqlx::query(&format!(
                "SELECT {ADAPTER_COLUMNS} FROM adapters WHERE status = 'promoted'"
            ))
            .fetch_optional(pool)
            .await
            .ctx("read the promoted adapter")?;
            match row {
                Some(row) => Ok(Some(raw_adapter!(&row).decode()?)),
                None => Ok(None),
            }
        })
    }

    /// Records the evaluation of adapter `version` and the trajectories it was measured on
    /// (replacing earlier ones). While the adapter is promoted, or superseded and so a rollback
    /// target, retention keeps those trajectories.
    pub async fn set_eval(
        &self,
        version: u64,
        results: &serde_json::Value,
        eval_trajectory_ids: &[String],
    ) -> Result<()> {
        let v = codec::to_i64("adapter version", version)?;
        let results = to_json("eval results", results)?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            let updated = sqlx::query("UPDATE adapters SET eval_results = $1 WHERE version = $2")
                .bind(&results)
                .bind(v)
                .execute(&mut *tx)
                .await
                .ctx("store eval results")?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::UnknownAdapter(version));
            }
            sqlx::query("DELETE FROM eval_refs WHERE adapter_version = $1")
                .bind(v)
                .execute(&mut *tx)
                .await
                .ctx("clear eval references")?;
            for id in eval_trajectory_ids {
                let seq: Option<i64> =
                    sqlx::query_scalar("SELECT seq FROM trajectories WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await
                        .ctx("look up an eval trajectory")?;
                let seq = seq.ok_or_else(|| StoreError::UnknownTrajectory(id.clone()))?;
                sqlx::query(
                    "INSERT INTO eval_refs (adapter_version, trajectory_seq) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(v)
                .bind(seq)
                .execute(&mut *tx)
                .await
                .ctx("record an eval reference")?;
            }
            tx.commit().await.ctx("commit eval results")?;
            Ok(())
        })
    }

    /// Promotes adapter `version` (a candidate, or a superseded adapter) in one transaction:
    /// the adapter promoted so far becomes superseded, and the history records the change.
    /// Promoting the promoted adapter changes nothing.
    pub async fn promote(&self, version: u64) -> Result<AdapterRecord> {
        let v = codec::to_i64("adapter version", version)?;
        let at_ns = now_nanos()?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            let adapter = fetch_adapter!(tx, v).ok_or(StoreError::UnknownAdapter(version))?;
            match adapter.status {
                AdapterStatus::Promoted => return Ok(adapter),
                AdapterStatus::Candidate | AdapterStatus::Superseded => {}
                from => {
                    return Err(StoreError::InvalidTransition {
                        version,
                        from,
                        action: "promoted",
                    });
                }
            }
            sqlx::query("UPDATE adapters SET status = 'superseded' WHERE status = 'promoted'")
                .execute(&mut *tx)
                .await
                .ctx("supersede the promoted adapter")?;
            sqlx::query(
                "UPDATE adapters SET status = 'promoted', status_reason = NULL WHERE version = $1",
            )
            .bind(v)
            .execute(&mut *tx)
            .await
            .ctx("promote an adapter")?;
            sqlx::query(
                "INSERT INTO promotions (version, action, reason, at_ns) \
                 VALUES ($1, 'promote', NULL, $2)",
            )
            .bind(v)
            .bind(at_ns)
            .execute(&mut *tx)
            .await
            .ctx("record a promotion")?;
            let promoted = fetch_adapter!(tx, v);
            notify_registry!(tx, d);
            tx.commit().await.ctx("commit a promotion")?;
            promoted.ok_or(StoreError::UnknownAdapter(version))
        })
    }

    /// Rejects candidate `version`, recording why.
    pub async fn reject(&self, version: u64, reason: &str) -> Result<AdapterRecord> {
        let v = codec::to_i64("adapter version", version)?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            let adapter = fetch_adapter!(tx, v).ok_or(StoreError::UnknownAdapter(version))?;
            if adapter.status != AdapterStatus::Candidate {
                return Err(StoreError::InvalidTransition {
                    version,
                    from: adapter.status,
                    action: "rejected",
                });
            }
            sqlx::query(
                "UPDATE adapters SET status = 'rejected', status_reason = $1 WHERE version = $2",
            )
            .bind(reason)
            .bind(v)
            .execute(&mut *tx)
            .await
            .ctx("reject an adapter")?;
            let rejected = fetch_adapter!(tx, v);
            tx.commit().await.ctx("commit a rejection")?;
            rejected.ok_or(StoreError::UnknownAdapter(version))
        })
    }

    /// Rolls the promoted adapter back, in one transaction: it becomes rolled back (with
    /// `reason`), and `to` (a superseded adapter) or, by default, the most recently promoted
    /// adapter that is still superseded, is promoted again. With no such adapter the base model
    /// serves. Returns the adapter now promoted.
    pub async fn rollback(&self, to: Option<u64>, reason: &str) -> Result<Option<AdapterRecord>> {
        let to_v = to
            .map(|v| codec::to_i64("adapter version", v))
            .transpose()?;
        let at_ns = now_nanos()?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            let current: Option<i64> =
                sqlx::query_scalar("SELECT version FROM adapters WHERE status = 'promoted'")
                    .fetch_optional(&mut *tx)
                    .await
                    .ctx("read the promoted adapter")?;
            let current = current.ok_or(StoreError::NothingPromoted)?;
            let target = match (to, to_v) {
                (Some(version), Some(v)) => {
                    let adapter =
                        fetch_adapter!(tx, v).ok_or(StoreError::UnknownAdapter(version))?;
                    if adapter.status != AdapterStatus::Superseded {
                        return Err(StoreError::InvalidTransition {
                            version,
                            from: adapter.status,
                            action: "rolled back to (only a formerly promoted, superseded adapter can be)",
                        });
                    }
                    Some(v)
                }
                _ => sqlx::query_scalar(
                    "SELECT p.version FROM promotions p JOIN adapters a ON a.version = p.version \
                     WHERE a.status = 'superseded' ORDER BY p.seq DESC LIMIT 1",
                )
                .fetch_optional(&mut *tx)
                .await
                .ctx("find the previously promoted adapter")?,
            };
            sqlx::query(
                "UPDATE adapters SET status = 'rolled_back', status_reason = $1 WHERE version = $2",
            )
            .bind(reason)
            .bind(current)
            .execute(&mut *tx)
            .await
            .ctx("roll back the promoted adapter")?;
            if let Some(target) = target {
                sqlx::query(
                    "UPDATE adapters SET status = 'promoted', status_reason = NULL \
                     WHERE version = $1",
                )
                .bind(target)
                .execute(&mut *tx)
                .await
                .ctx("promote the rollback target")?;
            }
            sqlx::query(
                "INSERT INTO promotions (version, action, reason, at_ns) \
                 VALUES ($1, 'rollback', $2, $3)",
            )
            .bind(target)
            .bind(reason)
            .bind(at_ns)
            .execute(&mut *tx)
            .await
            .ctx("record a rollback")?;
            let promoted = match target {
                Some(v) => fetch_adapter!(tx, v),
                None => None,
            };
            notify_registry!(tx, d);
            tx.commit().await.ctx("commit a rollback")?;
            Ok(promoted)
        })
    }

    /// Every promotion and rollback, oldest first.
    pub async fn promotion_history(&self) -> Result<Vec<PromotionEvent>> {
        on_read!(self, |pool, _d| {
            let rows =
                sqlx::query("SELECT version, action, reason, at_ns FROM promotions ORDER BY seq")
                    .fetch_all(pool)
                    .await
                    .ctx("read the promotion history")?;
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let version: Option<i64> = col!(row, "version");
                let action: String = col!(row, "action");
                events.push(PromotionEvent {
                    version: version
                        .map(|v| codec::to_u64("promotion", "version", v))
                        .transpose()?,
                    action: match action.as_str() {
                        "promote" => PromotionAction::Promote,
                        "rollback" => PromotionAction::Rollback,
                        other => {
                            return Err(StoreError::CorruptRecord {
                                id: "promotion history".into(),
                                detail: format!("unknown action '{other}'"),
                            });
                        }
                    },
                    reason: col!(row, "reason"),
                    at: codec::from_nanos(col!(row, "at_ns")),
                });
            }
            Ok(events)
        })
    }
}
