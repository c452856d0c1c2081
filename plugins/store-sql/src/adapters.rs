//! The adapter registry: every trained LoRA adapter with its lineage, training summary and eval
//! results, and the transactional promote / reject / roll back life cycle that keeps at most one
//! adapter promoted.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    backend::{col, on_read, on_write},
    codec,
    error::{DbContext, Result, StoreError},
    store::Store,
};

/// Where an adapter is in its life cycle.
///
/// ```text
/// candidate --promote--> promoted --promote another--> superseded --promote/rollback--> promoted
///     |                     |
///  reject                rollback
///     v                     v
///  rejected            rolled_back
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterStatus {
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
            AdapterStatus::Candidate => "candidate",
            AdapterStatus::Promoted => "promoted",
            AdapterStatus::Superseded => "superseded",
            AdapterStatus::Rejected => "rejected",
            AdapterStatus::RolledBack => "rolled_back",
        }
    }

    fn parse(version: i64, name: &str) -> Result<Self> {
        Ok(match name {
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

impl Store {
    /// Registers a trained adapter as a [`AdapterStatus::Candidate`] and returns it with the
    /// version the store assigned (one more than any version ever assigned).
    pub async fn register_adapter(&self, adapter: NewAdapter) -> Result<AdapterRecord> {
        if adapter.content_hash.is_empty() || adapter.path.is_empty() {
            return Err(StoreError::InvalidArgument(
                "an adapter needs a content hash and a path".into(),
            ));
        }
        let parent = adapter
            .parent_version
            .map(|v| codec::to_i64("parent version", v))
            .transpose()?;
        let created_at_ns = codec::to_nanos(
            "adapter creation time",
            adapter.created_at.unwrap_or_else(Utc::now),
        )?;
        let config = to_json("training config", &adapter.training_config)?;
        let metrics = to_json("metrics summary", &adapter.metrics_summary)?;
        on_write!(self, |pool, d| {
            let mut tx = begin_registry!(pool, d);
            if let (Some(parent), Some(v)) = (parent, adapter.parent_version) {
                let found: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM adapters WHERE version = $1")
                        .bind(parent)
                        .fetch_optional(&mut *tx)
                        .await
                        .ctx("look up the parent adapter")?;
                if found.is_none() {
                    return Err(StoreError::UnknownAdapter(v));
                }
            }
            let version: i64 = sqlx::query_scalar(
                "INSERT INTO adapters (content_hash, parent_version, path, training_config, \
                 metrics_summary, status, created_at_ns) \
                 VALUES ($1, $2, $3, $4, $5, 'candidate', $6) RETURNING version",
            )
            .bind(&adapter.content_hash)
            .bind(parent)
            .bind(&adapter.path)
            .bind(&config)
            .bind(&metrics)
            .bind(created_at_ns)
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

    /// Adapter `version`, or `None`.
    pub async fn get_adapter(&self, version: u64) -> Result<Option<AdapterRecord>> {
        let version = codec::to_i64("adapter version", version)?;
        on_read!(self, |pool, _d| {
            let mut conn = pool.acquire().await.ctx("acquire a connection")?;
            Ok(fetch_adapter!(conn, version))
        })
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
