//! Test harness shared by the store's integration tests: a fresh store per test on SQLite (a file
//! in a temporary directory) or PostgreSQL (a schema of its own in `SEARCHLOOP_PG_URL`'s
//! database, so tests run in parallel with each other and with other crates' tests), raw SQL
//! access for tests that damage rows, and the macro that runs one test body on both backends.

#![allow(dead_code)]

pub mod sample;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use searchloop_store_sql::{Store, StoreOptions};
use sqlx::Connection;

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL schema.
    Postgres,
}

/// The PostgreSQL URL, or a failure that says how to get one.
pub fn pg_url() -> String {
    std::env::var("SEARCHLOOP_PG_URL").unwrap_or_else(|_| {
        panic!(
            "SEARCHLOOP_PG_URL is not set: the store's PostgreSQL tests need a server; start one \
             with `eval \"$(scripts/postgres.sh start)\"`"
        )
    })
}

/// One test's database.
#[derive(Debug)]
pub enum TestDb {
    /// A SQLite file in its own directory.
    Sqlite {
        /// Removed on drop.
        dir: tempfile::TempDir,
        /// The store file.
        path: PathBuf,
    },
    /// A PostgreSQL schema of its own.
    Postgres {
        /// The server URL.
        base: String,
        /// The schema.
        schema: String,
    },
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestDb {
    /// A new, empty database of `kind`.
    pub async fn new(kind: Kind) -> Self {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("store.db");
                TestDb::Sqlite { dir, path }
            }
            Kind::Postgres => {
                let base = pg_url();
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                let schema = format!(
                    "store_test_{}_{}_{}",
                    std::process::id(),
                    nanos % 1_000_000_000,
                    COUNTER.fetch_add(1, Ordering::Relaxed)
                );
                let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
                sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                TestDb::Postgres { base, schema }
            }
        }
    }

    /// What to pass to [`Store::open`].
    pub fn location(&self) -> String {
        match self {
            TestDb::Sqlite { path, .. } => path.display().to_string(),
            TestDb::Postgres { base, schema } => {
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}options[search_path]={schema}")
            }
        }
    }

    /// Opens the store with small pools (many tests run at once).
    pub async fn open(&self) -> Store {
        Store::open_with(&self.location(), Self::options())
            .await
            .unwrap()
    }

    /// The options tests open stores with.
    pub fn options() -> StoreOptions {
        StoreOptions {
            max_connections: 4,
            ..StoreOptions::default()
        }
    }

    /// Runs statements outside the store (to damage rows, or to fake a newer schema).
    pub async fn execute(&self, sql: &str) {
        self.try_execute(sql).await.unwrap();
    }

    /// Runs statements outside the store and returns the driver's verdict.
    pub async fn try_execute(&self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            TestDb::Sqlite { path, .. } => {
                let mut conn =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                        .await?;
                let result = sqlx::raw_sql(sql).execute(&mut conn).await;
                conn.close().await?;
                result.map(drop)
            }
            TestDb::Postgres { base, schema } => {
                let mut conn = sqlx::PgConnection::connect(base).await?;
                let result = sqlx::raw_sql(&format!("SET search_path TO {schema}; {sql}"))
                    .execute(&mut conn)
                    .await;
                conn.close().await?;
                result.map(drop)
            }
        }
    }

    /// Drops the PostgreSQL schema (the SQLite directory goes with the value). Tests call it at
    /// the end, so a failed test leaves its schema behind for inspection.
    pub async fn cleanup(self) {
        if let TestDb::Postgres { base, schema } = &self {
            let mut conn = sqlx::PgConnection::connect(base).await.unwrap();
            sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
}

/// Runs each test body on SQLite and on PostgreSQL, with `$db` a fresh [`TestDb`] and `$store`
/// the store opened on it.
#[macro_export]
macro_rules! on_both_backends {
    ($(async fn $name:ident($db:ident, $store:ident) $body:block)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $db = common::TestDb::new(common::Kind::Sqlite).await;
                    let $store = $db.open().await;
                    $body
                    $store.close().await;
                    $db.cleanup().await;
                }
            )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $db = common::TestDb::new(common::Kind::Postgres).await;
                    let $store = $db.open().await;
                    $body
                    $store.close().await;
                    $db.cleanup().await;
                }
            )*
        }
    };
}
