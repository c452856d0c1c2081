//! The two backends behind one [`crate::Store`]: connection pools, the few SQL fragments that
//! differ between SQLite and PostgreSQL, and the macros that run one query body on either.
//!
//! Every query is written once with `$n` placeholders, which both drivers accept. The macros
//! expand a body once per backend, so the same source is type-checked against each driver's
//! native types (BLOB and BYTEA both decode to `Vec<u8>`). `sqlx::Any` was the alternative; it
//! was not chosen because the store needs backend-specific transaction modes (`BEGIN IMMEDIATE`,
//! `REPEATABLE READ` snapshots), different SQL for the group sequencing round, and SQLite file
//! inspection before connecting, none of which `Any` exposes.
//!
//! PostgreSQL migrations, sequencing rounds and registry changes each take their own advisory
//! lock; SQLite serialises all of them with `BEGIN IMMEDIATE`.

use std::path::PathBuf;

use sqlx::{PgPool, SqlitePool};

use crate::open_files::OpenFile;

/// The pools of one open store.
#[derive(Debug)]
pub(crate) enum Backend {
    /// A SQLite file. One writer connection serialises this process's writes (SQLite allows
    /// one writer at a time anyway, and waiting in the pool is fairer and cheaper than
    /// SQLite's sleep-and-retry busy handler); other processes are serialised by
    /// `BEGIN IMMEDIATE` and the busy timeout.
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Connections for reads.
        read: SqlitePool,
        /// The single connection for writes.
        write: SqlitePool,
        /// This store's claim on the file, held as long as its pools.
        _claim: OpenFile,
    },
    /// A PostgreSQL schema.
    Postgres {
        /// Connections for reads and writes.
        pool: PgPool,
        /// The schema holding the store's tables.
        schema: String,
    },
}

/// The SQL that differs between the backends.
#[derive(Debug)]
pub(crate) struct Dialect {
    /// Starts a write transaction. SQLite takes the write lock up front, so a transaction that
    /// reads before it writes cannot fail to upgrade its lock.
    pub(crate) begin_write: &'static str,
    /// Starts a read-only transaction that sees one snapshot throughout.
    pub(crate) begin_snapshot: &'static str,
    /// One sequencing round, run in order in one write transaction: gives every changed
    /// ("dirty") training group the next position of the group change stream (see
    /// [`crate::Store::rewarded_groups`]). Rounds run one at a time (SQLite's write lock, a
    /// PostgreSQL advisory lock held to commit), so positions become visible in increasing order
    /// and nothing ever appears behind a position a reader has seen. On PostgreSQL the round
    /// skips groups a writer holds locked: that writer leaves them dirty, for the next round.
    pub(crate) sequence_groups: &'static [&'static str],
    /// Serialises adapter registry changes across processes (SQLite's `BEGIN IMMEDIATE` already
    /// does).
    pub(crate) lock_registry: Option<&'static str>,
    /// Tells listening processes that the promoted adapter changed, when the transaction
    /// commits (PostgreSQL's NOTIFY; SQLite has no other process to tell).
    pub(crate) notify_registry: Option<&'static str>,
}

/// SQLite's dialect.
pub(crate) const SQLITE: Dialect = Dialect {
    begin_write: "BEGIN IMMEDIATE",
    begin_snapshot: "BEGIN",
    sequence_groups: &[
        "UPDATE trajectory_groups SET change_seq = \
         (SELECT value FROM store_counters WHERE name = 'group_changes') + dirty.rank \
         FROM (SELECT group_key, row_number() OVER (ORDER BY group_key) AS rank \
               FROM trajectory_groups WHERE change_seq IS NULL) AS dirty \
         WHERE trajectory_groups.group_key = dirty.group_key",
        "UPDATE store_counters SET value = \
         MAX(value, COALESCE((SELECT MAX(change_seq) FROM trajectory_groups), 0)) \
         WHERE name = 'group_changes'",
    ],
    lock_registry: None,
    notify_registry: None,
};

/// PostgreSQL's dialect.
pub(crate) const POSTGRES: Dialect = Dialect {
    begin_write: "BEGIN",
    begin_snapshot: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    sequence_groups: &[
        // An arbitrary constant naming "searchloop group sequencing".
        "SELECT pg_advisory_xact_lock(7362514118293)",
        "UPDATE trajectory_groups SET change_seq = nextval('trajectory_group_changes') \
         WHERE group_key IN (SELECT group_key FROM trajectory_groups WHERE change_seq IS NULL \
                             FOR UPDATE SKIP LOCKED)",
    ],
    // An arbitrary constant naming "searchloop adapter registry".
    lock_registry: Some("SELECT pg_advisory_xact_lock(7362514118292)"),
    notify_registry: Some("SELECT pg_notify('searchloop_registry', current_schema())"),
};

/// Runs `$body` with `$pool` bound to the pool for reads and `$d` to the [`Dialect`].
macro_rules! on_read {
    ($store:expr, |$pool:ident, $d:ident| $body:expr) => {
        match &*$store.backend {
            $crate::backend::Backend::Sqlite { read: $pool, .. } => {
                let $d: &$crate::backend::Dialect = &$crate::backend::SQLITE;
                $body
            }
            $crate::backend::Backend::Postgres { pool: $pool, .. } => {
                let $d: &$crate::backend::Dialect = &$crate::backend::POSTGRES;
                $body
            }
        }
    };
}

/// Runs `$body` with `$pool` bound to the pool for writes and `$d` to the [`Dialect`].
macro_rules! on_write {
    ($store:expr, |$pool:ident, $d:ident| $body:expr) => {
        match &*$store.backend {
            $crate::backend::Backend::Sqlite { write: $pool, .. } => {
                let $d: &$crate::backend::Dialect = &$crate::backend::SQLITE;
                $body
            }
            $crate::backend::Backend::Postgres { pool: $pool, .. } => {
                let $d: &$crate::backend::Dialect = &$crate::backend::POSTGRES;
                $body
            }
        }
    };
}

/// Reads column `$name` of `$row`, naming the column in the error.
macro_rules! col {
    ($row:expr, $name:literal) => {
        $crate::error::DbContext::ctx(
            sqlx::Row::try_get($row, $name),
            concat!("read column ", $name),
        )?
    };
}

pub(crate) use {col, on_read, on_write};
