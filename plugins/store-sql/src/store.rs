//! The [`Store`]: opening a SQLite file or a PostgreSQL schema, writing trajectories and
//! feedback durably, and reading trajectories back exactly as they were written.

use std::{
    collections::{BTreeSet, HashMap},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use searchloop_core::{
    RewardEntry, RewardPolicy, SamplingParams, TaskInfo, Timing, ToolCallRecord, Trajectory,
    TrajectorySink,
};
use serde::{Deserialize, Serialize};
use sqlx::{
    Connection, SqliteConnection, SqlitePool,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteSynchronous},
};

use crate::{
    backend::{Backend, col, on_read, on_write},
    codec,
    error::{DbContext, Result, StoreError},
    open_files::OpenFile,
    schema,
};

/// How SQLite makes a commit durable before [`Store::insert_trajectory`] or
/// [`Store::add_feedback`] returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqliteSync {
    /// `synchronous=FULL` (the default): every commit is fsynced to the WAL file before it is
    /// acknowledged, so acknowledged writes survive a process kill and a power loss alike, as
    /// the [`TrajectorySink`] contract asks.
    #[default]
    Full,
    /// `synchronous=NORMAL`: a commit is written to the WAL file (the operating system's page
    /// cache) but fsynced only at checkpoints. Acknowledged writes survive a process kill
    /// (SIGKILL cannot discard the kernel's page cache) but the last ones may be lost on power
    /// loss or a kernel crash. Faster; choose it only where that trade is acceptable.
    Normal,
}

/// How a store is opened and how it judges feedback.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Allowed feedback values (inclusive). The default, `[-1, 1]`, admits the runtime's own
    /// `[0, 1]` episode rewards and negative host signals such as a thumbs-down.
    pub feedback_range: RangeInclusive<f64>,
    /// How a reward ledger becomes the training reward in groups, listings and exports.
    pub reward_policy: RewardPolicy,
    /// Most connections per pool (PostgreSQL, and SQLite's readers).
    pub max_connections: u32,
    /// SQLite durability; PostgreSQL always commits with its server's `synchronous_commit`
    /// (on by default: the WAL is flushed before the commit returns).
    pub sqlite_sync: SqliteSync,
    /// How long a SQLite writer waits for another process's write lock.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            feedback_range: -1.0..=1.0,
            reward_policy: RewardPolicy::default(),
            max_connections: 8,
            sqlite_sync: SqliteSync::Full,
            busy_timeout: Duration::from_secs(60),
        }
    }
}

impl StoreOptions {
    fn validate(&self) -> Result<()> {
        let (lo, hi) = (*self.feedback_range.start(), *self.feedback_range.end());
        if !lo.is_finite() || !hi.is_finite() || lo > hi {
            return Err(StoreError::InvalidArgument(format!(
                "feedback range [{lo}, {hi}] must have finite bounds, lowest first"
            )));
        }
        if self.max_connections == 0 {
            return Err(StoreError::InvalidArgument(
                "max_connections must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Which database a store lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL schema.
    Postgres,
}

/// The durable trajectory store: trajectories, their reward ledgers, training groups, and the
/// adapter registry, in SQLite or PostgreSQL. Cheap to clone; clones share the pools.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) backend: Arc<Backend>,
    pub(crate) options: Arc<StoreOptions>,
}

/// What [`Store::insert_trajectory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The trajectory was stored.
    Inserted,
    /// The very same trajectory was already stored (a retried write); nothing changed.
    AlreadyStored,
}

/// Feedback from a host about one trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackInput {
    /// The feedback kind (`purchase`, `resolved`, `thumbs`, ...): 1-64 characters of letters,
    /// digits, `_`, `-` or `.`.
    pub source: String,
    /// The value, finite and inside [`StoreOptions::feedback_range`].
    pub value: f64,
    /// Its weight in the training reward (finite).
    pub weight: f64,
    /// Deliveries with the same key for the same trajectory are one feedback.
    pub idempotency_key: Option<String>,
    /// When it happened; `None` means now.
    pub at: Option<DateTime<Utc>>,
}

impl FeedbackInput {
    /// Feedback of weight 1, recorded now, without an idempotency key.
    pub fn new(source: impl Into<String>, value: f64) -> Self {
        Self {
            source: source.into(),
            value,
            weight: 1.0,
            idempotency_key: None,
            at: None,
        }
    }

    /// The same feedback with an idempotency key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// What [`Store::add_feedback`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackOutcome {
    /// A new ledger entry was written.
    Recorded,
    /// The same feedback (same idempotency key) was already recorded; nothing changed.
    Duplicate,
}

/// Longest trajectory id, group id, idempotency key or task id the store accepts.
const MAX_KEY_LEN: usize = 256;

/// Columns of a full trajectory, in the order [`raw_trajectory`] reads them (by name).
pub(crate) const TRAJECTORY_COLUMNS: &str = "t.seq, t.id, t.created_at_ns, t.question, \
     t.prompt_text, t.response_text, t.task_id, t.task_kind, t.task_split, t.gold_answers, \
     t.task_tools, t.tokens, t.segments, t.logprobs, t.tool_calls, t.answer, t.episode_end, t.turns, \
     t.model_id, t.adapter_version, t.sampling, t.group_id, t.started_at_ns, t.model_ms, \
     t.tool_ms, t.total_ms, t.replica_id";

/// Columns of a reward ledger entry, read by [`raw_reward`].
pub(crate) const REWARD_COLUMNS: &str =
    "r.trajectory_seq, r.source, r.value, r.weight, r.at_ns, r.idempotency_key";

/// A trajectory row as stored, before decoding.
#[derive(Debug)]
pub(crate) struct RawTrajectory {
    pub(crate) seq: i64,
    pub(crate) id: String,
    pub(crate) created_at_ns: i64,
    pub(crate) question: String,
    pub(crate) prompt_text: String,
    pub(crate) response_text: String,
    pub(crate) task_id: Option<String>,
    pub(crate) task_kind: Option<String>,
    pub(crate) task_split: Option<String>,
    pub(crate) gold_answers: Option<String>,
    pub(crate) task_tools: Option<String>,
    pub(crate) tokens: Vec<u8>,
    pub(crate) segments: Vec<u8>,
    pub(crate) logprobs: Vec<u8>,
    pub(crate) tool_calls: String,
    pub(crate) answer: Option<String>,
    pub(crate) episode_end: String,
    pub(crate) turns: i64,
    pub(crate) model_id: String,
    pub(crate) adapter_version: Option<i64>,
    pub(crate) sampling: String,
    pub(crate) group_id: Option<String>,
    pub(crate) started_at_ns: Option<i64>,
    pub(crate) model_ms: f64,
    pub(crate) tool_ms: f64,
    pub(crate) total_ms: f64,
    pub(crate) replica_id: Option<String>,
}

/// Reads a [`RawTrajectory`] from a row selected with [`TRAJECTORY_COLUMNS`].
macro_rules! raw_trajectory {
    ($row:expr) => {{
        let row = $row;
        $crate::store::RawTrajectory {
            seq: col!(row, "seq"),
            id: col!(row, "id"),
            created_at_ns: col!(row, "created_at_ns"),
            question: col!(row, "question"),
            prompt_text: col!(row, "prompt_text"),
            response_text: col!(row, "response_text"),
            task_id: col!(row, "task_id"),
            task_kind: col!(row, "task_kind"),
            task_split: col!(row, "task_split"),
            gold_answers: col!(row, "gold_answers"),
            task_tools: col!(row, "task_tools"),
            tokens: col!(row, "tokens"),
            segments: col!(row, "segments"),
            logprobs: col!(row, "logprobs"),
            tool_calls: col!(row, "tool_calls"),
            answer: col!(row, "answer"),
            episode_end: col!(row, "episode_end"),
            turns: col!(row, "turns"),
            model_id: col!(row, "model_id"),
            adapter_version: col!(row, "adapter_version"),
            sampling: col!(row, "sampling"),
            group_id: col!(row, "group_id"),
            started_at_ns: col!(row, "started_at_ns"),
            model_ms: col!(row, "model_ms"),
            tool_ms: col!(row, "tool_ms"),
            total_ms: col!(row, "total_ms"),
            replica_id: col!(row, "replica_id"),
        }
    }};
}

/// A reward ledger row as stored.
#[derive(Debug)]
pub(crate) struct RawReward {
    pub(crate) trajectory_seq: i64,
    pub(crate) source: String,
    pub(crate) value: f64,
    pub(crate) weight: f64,
    pub(crate) at_ns: i64,
    pub(crate) idempotency_key: Option<String>,
}

/// Reads a [`RawReward`] from a row selected with [`REWARD_COLUMNS`].
macro_rules! raw_reward {
    ($row:expr) => {{
        let row = $row;
        $crate::store::RawReward {
            trajectory_seq: col!(row, "trajectory_seq"),
            source: col!(row, "source"),
            value: col!(row, "value"),
            weight: col!(row, "weight"),
            at_ns: col!(row, "at_ns"),
            idempotency_key: col!(row, "idempotency_key"),
        }
    }};
}

pub(crate) use {raw_reward, raw_trajectory};

impl RawReward {
    fn into_entry(self) -> RewardEntry {
        RewardEntry {
            source: self.source,
            value: self.value,
            weight: self.weight,
            at: codec::from_nanos(self.at_ns),
            idempotency_key: self.idempotency_key,
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(id: &str, column: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::CorruptRecord {
        id: id.to_string(),
        detail: format!("column {column} is not valid JSON for its type: {e}"),
    })
}

impl RawTrajectory {
    /// Decodes the row and checks the trajectory's invariants: stored bytes are untrusted.
    pub(crate) fn decode(self, rewards: Vec<RewardEntry>) -> Result<Trajectory> {
        let id = self.id;
        let task = match (self.task_id, self.task_kind, self.task_split) {
            (None, None, None) => None,
            (Some(task_id), Some(kind), Some(split)) => Some(TaskInfo {
                task_id,
                gold_answers: parse_json(
                    &id,
                    "gold_answers",
                    self.gold_answers.as_deref().unwrap_or("[]"),
                )?,
                split: codec::parse_split(&id, &split)?,
                kind,
                tools: match self.task_tools.as_deref() {
                    Some(tools) => parse_json(&id, "task_tools", tools)?,
                    None => Vec::new(),
                },
            }),
            _ => {
                return Err(StoreError::CorruptRecord {
                    id,
                    detail: "task columns are only partly set".into(),
                });
            }
        };
        let turns = codec::to_u32(&id, "turns", self.turns)?;
        let adapter_version = self
            .adapter_version
            .map(|v| codec::to_u64(&id, "adapter_version", v))
            .transpose()?;
        let trajectory = Trajectory {
            created_at: codec::from_nanos(self.created_at_ns),
            question: self.question,
            prompt_text: self.prompt_text,
            response_text: self.response_text,
            task,
            tokens: codec::decode_tokens(&id, &self.tokens)?,
            segments: codec::decode_segments(&id, &self.segments)?,
            logprobs: codec::decode_logprobs(&id, &self.logprobs)?,
            tool_calls: parse_json::<Vec<ToolCallRecord>>(&id, "tool_calls", &self.tool_calls)?,
            answer: self.answer,
            end: codec::parse_end(&id, &self.episode_end)?,
            turns,
            model_id: self.model_id,
            adapter_version,
            replica_id: self.replica_id,
            sampling: parse_json::<SamplingParams>(&id, "sampling", &self.sampling)?,
            group_id: self.group_id,
            timing: Timing {
                started_at: self.started_at_ns.map(codec::from_nanos),
                model_ms: self.model_ms,
                tool_ms: self.tool_ms,
                total_ms: self.total_ms,
            },
            rewards,
            id,
        };
        trajectory
            .validate()
            .map_err(|e| StoreError::CorruptRecord {
                id: trajectory.id.clone(),
                detail: e.to_string(),
            })?;
        Ok(trajectory)
    }
}

/// Ledger entries by trajectory sequence number, each ledger in the order of `rewards`.
pub(crate) fn ledgers(rewards: Vec<RawReward>) -> HashMap<i64, Vec<RewardEntry>> {
    let mut ledgers: HashMap<i64, Vec<RewardEntry>> = HashMap::new();
    for r in rewards {
        ledgers
            .entry(r.trajectory_seq)
            .or_default()
            .push(r.into_entry());
    }
    ledgers
}

/// Decodes a page of rows, giving each its ledger (rewards ordered by sequence number).
/// Returns `(seq, trajectory)` pairs in the rows' order.
pub(crate) fn assemble(
    rows: Vec<RawTrajectory>,
    rewards: Vec<RawReward>,
) -> Result<Vec<(i64, Trajectory)>> {
    let mut ledgers = ledgers(rewards);
    rows.into_iter()
        .map(|row| {
            let seq = row.seq;
            let ledger = ledgers.remove(&seq).unwrap_or_default();
            Ok((seq, row.decode(ledger)?))
        })
        .collect()
}

/// The key grouping trajectories for GRPO: the group id, or the trajectory alone. The prefixes
/// keep a group id from colliding with another trajectory's id.
pub(crate) fn group_key(t: &Trajectory) -> String {
    match &t.group_id {
        Some(g) => format!("g:{g}"),
        None => format!("t:{}", t.id),
    }
}

/// One ledger entry, ready to bind.
struct RewardRow<'a> {
    entry: &'a RewardEntry,
    at_ns: i64,
}

/// A validated trajectory, encoded for its row.
struct TrajectoryRow<'a> {
    t: &'a Trajectory,
    created_at_ns: i64,
    task_split: Option<&'static str>,
    gold_answers: Option<String>,
    task_tools: Option<String>,
    tokens: Vec<u8>,
    segments: Vec<u8>,
    logprobs: Vec<u8>,
    tool_calls: String,
    sampling: String,
    turns: i64,
    adapter_version: Option<i64>,
    started_at_ns: Option<i64>,
    group_key: String,
    rewards: Vec<RewardRow<'a>>,
}

fn check_key(what: &str, key: &str) -> std::result::Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.contains('\0') {
        Err(format!(
            "{what} {key:?} must be 1 to {MAX_KEY_LEN} bytes long, without NUL characters"
        ))
    } else {
        Ok(())
    }
}

fn check_finite(what: &str, value: f64) -> std::result::Result<(), String> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(format!("{what} must be finite, got {value}"))
    }
}

impl<'a> TrajectoryRow<'a> {
    /// Validates everything the store relies on and encodes the columns.
    fn encode(t: &'a Trajectory) -> Result<Self> {
        let refuse = |msg: String| StoreError::InvalidTrajectory(format!("{}: {msg}", t.id));
        check_key("trajectory id", &t.id).map_err(StoreError::InvalidTrajectory)?;
        t.validate()
            .map_err(|e| StoreError::InvalidTrajectory(e.to_string()))?;
        t.sampling.validate().map_err(|e| refuse(e.to_string()))?;
        if let Some(g) = &t.group_id {
            check_key("group id", g).map_err(&refuse)?;
        }
        if let Some(task) = &t.task {
            check_key("task id", &task.task_id).map_err(&refuse)?;
        }
        if let Some(replica) = &t.replica_id {
            check_key("replica id", replica).map_err(&refuse)?;
        }
        // PostgreSQL text cannot hold NUL characters; refusing them on both backends keeps the
        // two stores interchangeable.
        let texts = [
            ("id", Some(t.id.as_str())),
            ("question", Some(t.question.as_str())),
            ("prompt_text", Some(t.prompt_text.as_str())),
            ("response_text", Some(t.response_text.as_str())),
            ("answer", t.answer.as_deref()),
            ("model_id", Some(t.model_id.as_str())),
            ("group_id", t.group_id.as_deref()),
            ("task.task_id", t.task.as_ref().map(|k| k.task_id.as_str())),
            ("task.kind", t.task.as_ref().map(|k| k.kind.as_str())),
        ];
        for (field, text) in texts {
            if text.is_some_and(|text| text.contains('\0')) {
                return Err(refuse(format!("{field} contains a NUL character")));
            }
        }
        // Non-finite floats would not survive the round trip (SQLite stores NaN as NULL, JSON
        // has no NaN), so they are refused here rather than lost later.
        check_finite("timing.model_ms", t.timing.model_ms).map_err(&refuse)?;
        check_finite("timing.tool_ms", t.timing.tool_ms).map_err(&refuse)?;
        check_finite("timing.total_ms", t.timing.total_ms).map_err(&refuse)?;
        for (i, call) in t.tool_calls.iter().enumerate() {
            check_finite(&format!("tool call {i} latency_ms"), call.latency_ms).map_err(&refuse)?;
        }
        let mut keys = std::collections::HashSet::new();
        let mut rewards = Vec::with_capacity(t.rewards.len());
        for entry in &t.rewards {
            if let Some(key) = &entry.idempotency_key {
                check_key("idempotency key", key).map_err(&refuse)?;
                if !keys.insert(key.as_str()) {
                    return Err(refuse(format!(
                        "two reward entries share the idempotency key '{key}'"
                    )));
                }
            }
            rewards.push(RewardRow {
                entry,
                at_ns: codec::to_nanos("reward time", entry.at)?,
            });
        }
        let json = |what: &str, v: serde_json::Result<String>| {
            v.map_err(|source| StoreError::Json {
                context: format!("encode the {what} of trajectory {}", t.id),
                source,
            })
        };
        Ok(Self {
            t,
            created_at_ns: codec::to_nanos("created_at", t.created_at)?,
            task_split: t.task.as_ref().map(|task| codec::split_name(task.split)),
            gold_answers: t
                .task
                .as_ref()
                .map(|task| json("gold answers", serde_json::to_string(&task.gold_answers)))
                .transpose()?,
            // NULL when the task names no tools, as every task did before the column existed.
            task_tools: t
                .task
                .as_ref()
                .filter(|task| !task.tools.is_empty())
                .map(|task| json("task tools", serde_json::to_string(&task.tools)))
                .transpose()?,
            tokens: codec::encode_tokens(&t.tokens),
            segments: codec::encode_segments(&t.segments),
            logprobs: codec::encode_logprobs(&t.logprobs),
            tool_calls: json("tool calls", serde_json::to_string(&t.tool_calls))?,
            sampling: json("sampling parameters", serde_json::to_string(&t.sampling))?,
            turns: i64::from(t.turns),
            adapter_version: t
                .adapter_version
                .map(|v| codec::to_i64("adapter version", v))
                .transpose()?,
            started_at_ns: t
                .timing
                .started_at
                .map(|at| codec::to_nanos("timing.started_at", at))
                .transpose()?,
            group_key: group_key(t),
            rewards,
        })
    }
}

const INSERT_TRAJECTORY: &str = "INSERT INTO trajectories (id, created_at_ns, question, \
     prompt_text, response_text, task_id, task_kind, task_split, gold_answers, tokens, segments, \
     logprobs, tool_calls, answer, episode_end, turns, model_id, adapter_version, sampling, \
     group_id, group_key, started_at_ns, model_ms, tool_ms, total_ms, task_tools, replica_id) VALUES \
     ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, \
     $21, $22, $23, $24, $25, $26, $27) ON CONFLICT (id) DO NOTHING RETURNING seq";

/// Inserts a ledger entry; a repeated idempotency key inserts nothing and returns no row.
const INSERT_REWARD: &str = "INSERT INTO rewards (trajectory_seq, source, value, weight, at_ns, \
     idempotency_key, origin) VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (trajectory_seq, idempotency_key) DO NOTHING RETURNING seq";

/// Marks a training group as changed ("dirty"): the next sequencing round gives it a new
/// position in the group change stream.
const TOUCH_GROUP: &str = "INSERT INTO trajectory_groups (group_key, change_seq) VALUES ($1, NULL) \
     ON CONFLICT (group_key) DO UPDATE SET change_seq = NULL";

/// Loads one full trajectory by id inside transaction `$tx`, or `None`.
macro_rules! load_trajectory {
    ($tx:expr, $id:expr) => {{
        let sql = format!(
            "SELECT {} FROM trajectories t WHERE t.id = $1",
            TRAJECTORY_COLUMNS
        );
        let row = sqlx::query(&sql)
            .bind($id)
            .fetch_optional(&mut *$tx)
            .await
            .ctx("read a trajectory")?;
        match row {
            None => None,
            Some(row) => {
                let raw = raw_trajectory!(&row);
                let sql = format!(
                    "SELECT {} FROM rewards r WHERE r.trajectory_seq = $1 ORDER BY r.seq",
                    REWARD_COLUMNS
                );
                let mut rewards = Vec::new();
                for row in sqlx::query(&sql)
                    .bind(raw.seq)
                    .fetch_all(&mut *$tx)
                    .await
                    .ctx("read a reward ledger")?
                {
                    rewards.push(raw_reward!(&row));
                }
                assemble(vec![raw], rewards)?.pop().map(|(_, t)| t)
            }
        }
    }};
}

impl Store {
    /// Opens the store at `location` with default options: a file path or `sqlite://path` (the
    /// file is created when missing), or a `postgres://` / `postgresql://` URL. Use the URL's
    /// `options[search_path]=<schema>` parameter to keep the store in its own schema.
    ///
    /// A file that is not a SQLite database, a damaged one, another program's database, or a
    /// store of a newer schema version is refused with a clear error and never written to.
    pub async fn open(location: &str) -> Result<Self> {
        Self::open_with(location, StoreOptions::default()).await
    }

    /// Opens the store at `location` with `options`. See [`Store::open`].
    pub async fn open_with(location: &str, options: StoreOptions) -> Result<Self> {
        options.validate()?;
        let backend =
            if location.starts_with("postgres://") || location.starts_with("postgresql://") {
                open_postgres(location, &options).await?
            } else {
                let path = location
                    .strip_prefix("sqlite://")
                    .or_else(|| location.strip_prefix("sqlite:"))
                    .unwrap_or(location);
                if path.is_empty() || path.starts_with(":memory:") {
                    return Err(StoreError::InvalidLocation {
                        location: location.to_string(),
                        reason: "a store needs a file path (an in-memory database is not durable)"
                            .into(),
                    });
                }
                open_sqlite(Path::new(path), &options).await?
            };
        Ok(Self {
            backend: Arc::new(backend),
            options: Arc::new(options),
        })
    }

    /// The same store (sharing its pools) with other options, e.g. another reward policy.
    /// Connection settings (pool size, SQLite sync, busy timeout) stay those of the open.
    pub fn with_options(&self, options: StoreOptions) -> Result<Self> {
        options.validate()?;
        Ok(Self {
            backend: Arc::clone(&self.backend),
            options: Arc::new(options),
        })
    }

    /// The options in force.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Which database the store lives in.
    pub fn backend_kind(&self) -> BackendKind {
        match &*self.backend {
            Backend::Sqlite { .. } => BackendKind::Sqlite,
            Backend::Postgres { .. } => BackendKind::Postgres,
        }
    }

    /// Where the store lives, for people: the SQLite file, or the PostgreSQL schema.
    pub fn location(&self) -> String {
        match &*self.backend {
            Backend::Sqlite { path, .. } => path.display().to_string(),
            Backend::Postgres { schema, .. } => format!("PostgreSQL schema '{schema}'"),
        }
    }

    /// Closes every connection. A SQLite store first checkpoints its WAL into the main file, so
    /// a closed store is one self-contained file.
    pub async fn close(&self) {
        match &*self.backend {
            Backend::Sqlite { read, write, .. } => {
                // A failed checkpoint loses nothing: the WAL keeps the commits, and the next
                // open recovers them.
                let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(write)
                    .await;
                close_sqlite_pool(read).await;
                close_sqlite_pool(write).await;
            }
            Backend::Postgres { pool, .. } => pool.close().await,
        }
    }

    /// Runs the database's own consistency check (SQLite `PRAGMA integrity_check`; on
    /// PostgreSQL, whose server guards its own files, a round trip to the server).
    pub async fn check_integrity(&self) -> Result<()> {
        match &*self.backend {
            Backend::Sqlite { read, path, .. } => {
                let report: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
                    .fetch_all(read)
                    .await
                    .ctx("run the integrity check")?;
                if report.len() == 1 && report[0] == "ok" {
                    Ok(())
                } else {
                    Err(StoreError::CorruptFile {
                        path: path.clone(),
                        detail: report.join("; "),
                    })
                }
            }
            Backend::Postgres { pool, .. } => {
                sqlx::query("SELECT 1")
                    .execute(pool)
                    .await
                    .ctx("reach the PostgreSQL server")?;
                Ok(())
            }
        }
    }

    /// Stores one trajectory with its reward ledger. Returns once the commit is durable (see
    /// [`SqliteSync`]). Writing the very same trajectory again is a no-op
    /// ([`InsertOutcome::AlreadyStored`]), so a retry after an ambiguous failure is safe; the
    /// same id with different content is refused ([`StoreError::TrajectoryConflict`]).
    pub async fn insert_trajectory(&self, trajectory: &Trajectory) -> Result<InsertOutcome> {
        let mut outcomes = self
            .insert_trajectories(std::slice::from_ref(trajectory))
            .await?;
        outcomes
            .pop()
            .ok_or_else(|| StoreError::InvalidArgument("no trajectory was inserted".into()))
    }

    /// Stores several trajectories (typically one sampled group) in one transaction: all of
    /// them or none. One outcome per trajectory, in order.
    pub async fn insert_trajectories(
        &self,
        trajectories: &[Trajectory],
    ) -> Result<Vec<InsertOutcome>> {
        let rows = trajectories
            .iter()
            .map(TrajectoryRow::encode)
            .collect::<Result<Vec<_>>>()?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        on_write!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_write)
                .await
                .ctx("begin a trajectory insert")?;
            let mut outcomes = Vec::with_capacity(rows.len());
            // Groups are moved in key order, so concurrent PostgreSQL writers lock them in one
            // order and cannot deadlock.
            let mut touched: BTreeSet<&str> = BTreeSet::new();
            for row in &rows {
                let t = row.t;
                let task = t.task.as_ref();
                let seq: Option<i64> = sqlx::query_scalar(INSERT_TRAJECTORY)
                    .bind(&t.id)
                    .bind(row.created_at_ns)
                    .bind(&t.question)
                    .bind(&t.prompt_text)
                    .bind(&t.response_text)
                    .bind(task.map(|k| k.task_id.as_str()))
                    .bind(task.map(|k| k.kind.as_str()))
                    .bind(row.task_split)
                    .bind(row.gold_answers.as_deref())
                    .bind(row.tokens.as_slice())
                    .bind(row.segments.as_slice())
                    .bind(row.logprobs.as_slice())
                    .bind(&row.tool_calls)
                    .bind(t.answer.as_deref())
                    .bind(codec::end_name(t.end))
                    .bind(row.turns)
                    .bind(&t.model_id)
                    .bind(row.adapter_version)
                    .bind(&row.sampling)
                    .bind(t.group_id.as_deref())
                    .bind(&row.group_key)
                    .bind(row.started_at_ns)
                    .bind(t.timing.model_ms)
                    .bind(t.timing.tool_ms)
                    .bind(t.timing.total_ms)
                    .bind(row.task_tools.as_deref())
                    .bind(t.replica_id.as_deref())
                    .fetch_optional(&mut *tx)
                    .await
                    .ctx(&format!("insert trajectory {}", t.id))?;
                let Some(seq) = seq else {
                    let stored: Option<Trajectory> = load_trajectory!(tx, &t.id);
                    if !stored.is_some_and(|s| same_episode(&s, t)) {
                        return Err(StoreError::TrajectoryConflict(t.id.clone()));
                    }
                    outcomes.push(InsertOutcome::AlreadyStored);
                    continue;
                };
                for r in &row.rewards {
                    let reward_seq: Option<i64> = sqlx::query_scalar(INSERT_REWARD)
                        .bind(seq)
                        .bind(&r.entry.source)
                        .bind(r.entry.value)
                        .bind(r.entry.weight)
                        .bind(r.at_ns)
                        .bind(r.entry.idempotency_key.as_deref())
                        .bind("episode")
                        .fetch_optional(&mut *tx)
                        .await
                        .ctx(&format!("insert a reward of trajectory {}", t.id))?;
                    if reward_seq.is_some() {
                        touched.insert(row.group_key.as_str());
                    }
                }
                outcomes.push(InsertOutcome::Inserted);
            }
            for key in touched {
                sqlx::query(TOUCH_GROUP)
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .ctx("update a training group")?;
            }
            tx.commit().await.ctx("commit trajectories")?;
            Ok(outcomes)
        })
    }

    /// The trajectory with `id`, with its whole reward ledger (episode rewards, then feedback,
    /// in the order recorded), or `None`. The stored bytes are decoded and validated.
    pub async fn get_trajectory(&self, id: &str) -> Result<Option<Trajectory>> {
        on_read!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_snapshot)
                .await
                .ctx("begin a read")?;
            let found = load_trajectory!(tx, id);
            tx.commit().await.ctx("end a read")?;
            Ok(found)
        })
    }

    /// Adds host feedback to a trajectory's reward ledger, durably. The value must be finite and
    /// inside [`StoreOptions::feedback_range`]; an unknown id is
    /// [`StoreError::UnknownTrajectory`]. A repeated delivery (same idempotency key, same
    /// source, value and weight) is [`FeedbackOutcome::Duplicate`] and changes nothing; the same
    /// key with different feedback is [`StoreError::IdempotencyConflict`].
    pub async fn add_feedback(
        &self,
        trajectory_id: &str,
        input: FeedbackInput,
    ) -> Result<FeedbackOutcome> {
        let entry = self.validate_feedback(trajectory_id, input)?;
        let at_ns = codec::to_nanos("feedback time", entry.at)?;
        on_write!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_write)
                .await
                .ctx("begin a feedback write")?;
            let found = sqlx::query("SELECT seq, group_key FROM trajectories WHERE id = $1")
                .bind(trajectory_id)
                .fetch_optional(&mut *tx)
                .await
                .ctx("look up the trajectory of feedback")?;
            let Some(found) = found else {
                return Err(StoreError::UnknownTrajectory(trajectory_id.to_string()));
            };
            let seq: i64 = col!(&found, "seq");
            let key: String = col!(&found, "group_key");
            let reward_seq: Option<i64> = sqlx::query_scalar(INSERT_REWARD)
                .bind(seq)
                .bind(&entry.source)
                .bind(entry.value)
                .bind(entry.weight)
                .bind(at_ns)
                .bind(entry.idempotency_key.as_deref())
                .bind("feedback")
                .fetch_optional(&mut *tx)
                .await
                .ctx(&format!("record feedback for trajectory {trajectory_id}"))?;
            if reward_seq.is_none() {
                let existing = sqlx::query(
                    "SELECT source, value, weight FROM rewards \
                     WHERE trajectory_seq = $1 AND idempotency_key = $2",
                )
                .bind(seq)
                .bind(entry.idempotency_key.as_deref())
                .fetch_one(&mut *tx)
                .await
                .ctx("read the feedback recorded under an idempotency key")?;
                let (source, value, weight): (String, f64, f64) = (
                    col!(&existing, "source"),
                    col!(&existing, "value"),
                    col!(&existing, "weight"),
                );
                if source == entry.source
                    && value.to_bits() == entry.value.to_bits()
                    && weight.to_bits() == entry.weight.to_bits()
                {
                    return Ok(FeedbackOutcome::Duplicate);
                }
                return Err(StoreError::IdempotencyConflict {
                    trajectory_id: trajectory_id.to_string(),
                    key: entry.idempotency_key.unwrap_or_default(),
                    existing: format!("{source} = {value} with weight {weight}"),
                });
            }
            sqlx::query(TOUCH_GROUP)
                .bind(&key)
                .execute(&mut *tx)
                .await
                .ctx("update a training group")?;
            tx.commit().await.ctx("commit feedback")?;
            Ok(FeedbackOutcome::Recorded)
        })
    }

    /// Turns feedback into a ledger entry, or says why it is refused.
    fn validate_feedback(&self, trajectory_id: &str, input: FeedbackInput) -> Result<RewardEntry> {
        let refuse = |reason: String| StoreError::InvalidFeedback {
            trajectory_id: trajectory_id.to_string(),
            reason,
        };
        let entry = RewardEntry {
            source: input.source,
            value: input.value,
            weight: input.weight,
            at: input.at.unwrap_or_else(Utc::now),
            idempotency_key: input.idempotency_key,
        };
        entry.validate().map_err(|e| refuse(e.to_string()))?;
        let range = &self.options.feedback_range;
        if !range.contains(&entry.value) {
            return Err(refuse(format!(
                "value {} is outside the allowed range [{}, {}]",
                entry.value,
                range.start(),
                range.end()
            )));
        }
        if let Some(key) = &entry.idempotency_key {
            check_key("idempotency key", key).map_err(refuse)?;
        }
        Ok(entry)
    }
}

/// Whether `stored` is the episode `new` (its ledger may since have grown by feedback, so the
/// new ledger must be a prefix of the stored one).
fn same_episode(stored: &Trajectory, new: &Trajectory) -> bool {
    stored.rewards.len() >= new.rewards.len()
        && stored.rewards[..new.rewards.len()] == new.rewards[..]
        && Trajectory {
            rewards: Vec::new(),
            ..stored.clone()
        } == Trajectory {
            rewards: Vec::new(),
            ..new.clone()
        }
}

#[async_trait]
impl TrajectorySink for Store {
    async fn record(&self, trajectory: &Trajectory) -> searchloop_core::Result<()> {
        self.insert_trajectory(trajectory).await?;
        Ok(())
    }
}

/// Closes `pool` and waits until its connections are gone. `Pool::close` can return while a
/// connection handed back during its final wait still sits idle; closing again closes it, so
/// that the file's SQLite handles are really released when [`Store::close`] returns.
async fn close_sqlite_pool(pool: &SqlitePool) {
    for _ in 0..100 {
        pool.close().await;
        if pool.size() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Hides the password of a connection URL, for error messages.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            )
        }
        _ => url.to_string(),
    }
}

async fn open_sqlite(path: &Path, options: &StoreOptions) -> Result<Backend> {
    let claim = OpenFile::claim(path, || schema::check_sqlite_file_bytes(path))?;
    schema::inspect_sqlite_file(path).await?;
    let connect = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .foreign_keys(true)
        .busy_timeout(options.busy_timeout)
        .synchronous(match options.sqlite_sync {
            SqliteSync::Full => SqliteSynchronous::Full,
            SqliteSync::Normal => SqliteSynchronous::Normal,
        });
    let open_error = |e: sqlx::Error| StoreError::Database {
        context: format!("open {}", path.display()),
        source: e,
    };
    let mut conn = SqliteConnection::connect_with(&connect)
        .await
        .map_err(open_error)?;
    let migrated = schema::migrate_sqlite(&mut conn, path).await;
    conn.close().await.map_err(open_error)?;
    migrated?;
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(connect.clone())
        .await
        .map_err(open_error)?;
    let read = SqlitePoolOptions::new()
        .max_connections(options.max_connections)
        .connect_with(connect)
        .await
        .map_err(open_error)?;
    Ok(Backend::Sqlite {
        path: PathBuf::from(path),
        _claim: claim,
        read,
        write,
    })
}

async fn open_postgres(url: &str, options: &StoreOptions) -> Result<Backend> {
    let connect = PgConnectOptions::from_str(url).map_err(|e| StoreError::InvalidLocation {
        location: redact(url),
        reason: e.to_string(),
    })?;
    let pool = PgPoolOptions::new()
        .max_connections(options.max_connections)
        .connect_with(connect)
        .await
        .ctx(&format!("connect to {}", redact(url)))?;
    let mut conn = pool.acquire().await.ctx("acquire a connection")?;
    let schema = schema::migrate_postgres(&mut conn).await?;
    drop(conn);
    Ok(Backend::Postgres { pool, schema })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h:5432/db"), "postgres://u@h:5432/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
