//! The two databases behind the tool, opened read-only, and the one operation the tool needs:
//! run a declared query with bound values, under a statement timeout, returning at most N rows.
//!
//! Read-only holds at two levels on each database:
//!
//! - SQLite: the file is opened with `SQLITE_OPEN_READONLY` (`mode=ro`), and every connection
//!   sets `PRAGMA query_only = ON`. A progress handler stops a statement that passes its
//!   deadline (`sqlite3_interrupt` semantics), which leaves the connection usable.
//! - PostgreSQL: sessions start with `default_transaction_read_only = on` and a session
//!   `statement_timeout`, and every call runs in `BEGIN READ ONLY` with `SET LOCAL
//!   statement_timeout`. A read-only role (see the tests) is a third layer the host can add.

use std::{
    str::FromStr,
    time::{Duration, Instant},
};

use futures::{Stream, TryStreamExt};
use sqlx::{
    Column, Executor, Row, TypeInfo, ValueRef,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres},
    sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow},
};

use crate::{
    args::Bound,
    config::{CompiledQuery, ParamType, SqlLimits},
    error::{Result, SqlError},
};

/// SQLite virtual-machine instructions between two deadline checks: frequent enough to stop
/// within about a millisecond, rare enough to cost nothing measurable.
const PROGRESS_OPS: i32 = 1_000;
/// SQLite's primary result code for an interrupted statement.
const SQLITE_INTERRUPT: i32 = 9;
/// SQLite's primary result code for a write to a read-only database.
const SQLITE_READONLY: i32 = 8;
/// PostgreSQL's SQLSTATE for a statement cancelled by `statement_timeout`.
const PG_QUERY_CANCELED: &str = "57014";
/// PostgreSQL's SQLSTATE for a write in a read-only transaction.
const PG_READ_ONLY_TRANSACTION: &str = "25006";

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The backend of `url`: `sqlite:` or `postgres://` / `postgresql://`.
    pub(crate) fn of(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(SqlError::Config(format!(
                "database '{}' must be a sqlite:// or postgres:// URL",
                redact(url)
            )))
        }
    }
}

/// `url` with the password of its user info replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..authority_start],
                &authority[..colon],
                &url[authority_start + at..]
            ),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// One result cell.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    /// SQL NULL.
    Null,
    /// An integer of any width.
    Integer(i64),
    /// A floating-point number.
    Float(f64),
    /// Text, dates and times.
    Text(String),
    /// A boolean.
    Boolean(bool),
}

/// At most `max_rows` rows of a result.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Rows {
    /// Column names.
    pub(crate) columns: Vec<String>,
    /// The rows.
    pub(crate) rows: Vec<Vec<Cell>>,
    /// Whether the result had more rows than were read.
    pub(crate) truncated: bool,
}

/// A read-only connection pool.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

impl Pool {
    /// Opens a read-only pool on `url`; fails when the database cannot be reached.
    pub(crate) async fn connect_read_only(url: &str, limits: &SqlLimits) -> Result<Self> {
        let connect_error = |source| SqlError::Connect {
            database: redact(url),
            source,
        };
        let timeout = Duration::from_millis(limits.statement_timeout_ms);
        match Backend::of(url)? {
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(connect_error)?
                    .read_only(true)
                    .create_if_missing(false)
                    .pragma("query_only", "ON")
                    .busy_timeout(timeout);
                SqlitePoolOptions::new()
                    .max_connections(limits.max_connections)
                    .acquire_timeout(acquire_timeout(limits))
                    .connect_with(options)
                    .await
                    .map(Self::Sqlite)
                    .map_err(connect_error)
            }
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(url)
                    .map_err(connect_error)?
                    .options([
                        ("default_transaction_read_only", "on".to_string()),
                        ("statement_timeout", limits.statement_timeout_ms.to_string()),
                    ]);
                PgPoolOptions::new()
                    .max_connections(limits.max_connections)
                    .acquire_timeout(acquire_timeout(limits))
                    .connect_with(options)
                    .await
                    .map(Self::Postgres)
                    .map_err(connect_error)
            }
        }
    }

    /// Prepares `query` once, so a declared query naming a missing table or column, or
    /// binding a parameter with the wrong type, fails when the tool is built, not mid-episode.
    pub(crate) async fn prepare(&self, query: &CompiledQuery) -> Result<()> {
        let prepare_error = |source| SqlError::Prepare {
            query: query.name.clone(),
            source,
        };
        match self {
            Self::Sqlite(pool) => {
                let mut conn = pool.acquire().await.map_err(prepare_error)?;
                conn.prepare(query.sql.sqlite.as_str())
                    .await
                    .map_err(prepare_error)?;
            }
            Self::Postgres(pool) => {
                // The statement is cached under its text, so it is prepared with the types the
                // calls will bind.
                let types: Vec<_> = query.params.iter().map(|p| pg_type(p.param_type)).collect();
                let mut conn = pool.acquire().await.map_err(prepare_error)?;
                conn.prepare_with(query.sql.postgres.as_str(), &types)
                    .await
                    .map_err(prepare_error)?;
            }
        }
        Ok(())
    }

    /// Runs `query` with `args` bound, reading at most `limits.max_rows` rows.
    pub(crate) async fn fetch(
        &self,
        query: &CompiledQuery,
        args: &[Bound],
        limits: &SqlLimits,
    ) -> Result<Rows> {
        let timeout = Duration::from_millis(limits.statement_timeout_ms);
        let fail = |source| classify(query, limits.statement_timeout_ms, source);
        let work = async {
            match self {
                Self::Sqlite(pool) => fetch_sqlite(pool, query, args, limits.max_rows, timeout)
                    .await
                    .map_err(|e| e.into_sql_error(fail)),
                Self::Postgres(pool) => fetch_postgres(pool, query, args, limits)
                    .await
                    .map_err(|e| e.into_sql_error(fail)),
            }
        };
        // The databases stop the statement themselves; this outer limit (the wait for a
        // connection, the statement, and a grace period) only guards against a connection that
        // stops answering altogether.
        let limit = acquire_timeout(limits) + timeout + Duration::from_secs(2);
        tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(SqlError::Timeout {
                query: query.name.clone(),
                ms: limits.statement_timeout_ms,
            })
        })
    }

    /// Closes every connection.
    pub(crate) async fn close(&self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

/// How long a call waits for a free connection (and the pool for its first one): at least 5 s,
/// so a busy machine does not fail connections, and bounded, so a saturated pool fails a call
/// instead of hanging it.
fn acquire_timeout(limits: &SqlLimits) -> Duration {
    Duration::from_millis(limits.statement_timeout_ms).max(Duration::from_secs(5))
}

/// A failure inside a fetch: a database error to classify, or an already-built error.
enum FetchError {
    Sqlx(sqlx::Error),
    Built(SqlError),
}

impl FetchError {
    fn into_sql_error(self, classify: impl FnOnce(sqlx::Error) -> SqlError) -> SqlError {
        match self {
            Self::Sqlx(error) => classify(error),
            Self::Built(error) => error,
        }
    }
}

impl From<sqlx::Error> for FetchError {
    fn from(error: sqlx::Error) -> Self {
        Self::Sqlx(error)
    }
}

/// Sorts a database error into a timeout, a refused write, or a plain failure.
fn classify(query: &CompiledQuery, ms: u64, error: sqlx::Error) -> SqlError {
    if let sqlx::Error::Database(db) = &error {
        let code = db.code().unwrap_or_default();
        let primary_sqlite_code = code.parse::<i32>().ok().map(|c| c & 0xff);
        if primary_sqlite_code == Some(SQLITE_INTERRUPT) || code == PG_QUERY_CANCELED {
            return SqlError::Timeout {
                query: query.name.clone(),
                ms,
            };
        }
        if primary_sqlite_code == Some(SQLITE_READONLY) || code == PG_READ_ONLY_TRANSACTION {
            return SqlError::WriteRefused {
                query: query.name.clone(),
                message: db.message().to_string(),
            };
        }
    }
    SqlError::Database {
        query: query.name.clone(),
        source: error,
    }
}

/// The PostgreSQL type a parameter is bound as.
fn pg_type(param_type: ParamType) -> sqlx::postgres::PgTypeInfo {
    use sqlx::Type;
    match param_type {
        ParamType::String => <String as Type<Postgres>>::type_info(),
        ParamType::Integer => <i64 as Type<Postgres>>::type_info(),
        ParamType::Number => <f64 as Type<Postgres>>::type_info(),
        ParamType::Boolean => <bool as Type<Postgres>>::type_info(),
    }
}

/// Binds `args` in order; the same code serves both databases.
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Bound::Text(value) => query.bind(value.as_deref()),
                Bound::Integer(value) => query.bind(*value),
                Bound::Number(value) => query.bind(*value),
                Bound::Boolean(value) => query.bind(*value),
            };
        }
        query
    }};
}

async fn fetch_sqlite(
    pool: &SqlitePool,
    query: &CompiledQuery,
    args: &[Bound],
    max_rows: usize,
    timeout: Duration,
) -> Result<Rows, FetchError> {
    let mut conn = pool.acquire().await?;
    let deadline = Instant::now() + timeout;
    // Set on every call: a handler left by a cancelled call holds an old deadline.
    conn.lock_handle()
        .await?
        .set_progress_handler(PROGRESS_OPS, move || Instant::now() < deadline);
    let statement = bind_all!(sqlx::query(query.sql.sqlite.as_str()), args);
    collect(statement.fetch(&mut *conn), max_rows, |row| {
        decode_sqlite(query, row)
    })
    .await
}

async fn fetch_postgres(
    pool: &PgPool,
    query: &CompiledQuery,
    args: &[Bound],
    limits: &SqlLimits,
) -> Result<Rows, FetchError> {
    let mut tx = pool
        .begin_with(format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
            limits.statement_timeout_ms
        ))
        .await?;
    let statement = bind_all!(sqlx::query(query.sql.postgres.as_str()), args);
    let rows = collect(statement.fetch(&mut *tx), limits.max_rows, |row| {
        decode_postgres(query, row)
    })
    .await;
    // A read-only transaction has nothing to commit; ending it returns a clean connection.
    let ended = tx.rollback().await;
    let rows = rows?;
    ended?;
    Ok(rows)
}

/// Reads up to `max_rows` rows from `stream` (one more to learn whether there are more).
async fn collect<R: Row>(
    stream: impl Stream<Item = Result<R, sqlx::Error>>,
    max_rows: usize,
    decode: impl Fn(&R) -> Result<Vec<Cell>, FetchError>,
) -> Result<Rows, FetchError> {
    let mut stream = std::pin::pin!(stream);
    let mut rows = Rows::default();
    while let Some(row) = stream.try_next().await? {
        if rows.columns.is_empty() {
            rows.columns = row.columns().iter().map(|c| c.name().to_string()).collect();
        }
        if rows.rows.len() == max_rows {
            rows.truncated = true;
            break;
        }
        rows.rows.push(decode(&row)?);
    }
    Ok(rows)
}

fn unsupported(query: &CompiledQuery, column: &str, type_name: &str) -> FetchError {
    FetchError::Built(SqlError::UnsupportedColumn {
        query: query.name.clone(),
        column: column.to_string(),
        type_name: type_name.to_string(),
    })
}

/// A SQLite row's cells, by each value's storage class.
fn decode_sqlite(query: &CompiledQuery, row: &SqliteRow) -> Result<Vec<Cell>, FetchError> {
    let mut cells = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            cells.push(Cell::Null);
            continue;
        }
        let type_name = raw.type_info().name().to_string();
        cells.push(match type_name.as_str() {
            "INTEGER" | "BOOLEAN" => Cell::Integer(row.try_get_unchecked::<i64, _>(i)?),
            "REAL" => Cell::Float(row.try_get_unchecked::<f64, _>(i)?),
            "TEXT" | "DATE" | "TIME" | "DATETIME" => {
                Cell::Text(row.try_get_unchecked::<String, _>(i)?)
            }
            other => return Err(unsupported(query, column.name(), other)),
        });
    }
    Ok(cells)
}

/// A PostgreSQL row's cells, by column type.
fn decode_postgres(query: &CompiledQuery, row: &PgRow) -> Result<Vec<Cell>, FetchError> {
    let mut cells = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            cells.push(Cell::Null);
            continue;
        }
        let type_name = raw.type_info().name().to_string();
        cells.push(match type_name.as_str() {
            "BOOL" => Cell::Boolean(row.try_get::<bool, _>(i)?),
            "INT2" => Cell::Integer(row.try_get::<i16, _>(i)?.into()),
            "INT4" => Cell::Integer(row.try_get::<i32, _>(i)?.into()),
            "INT8" => Cell::Integer(row.try_get::<i64, _>(i)?),
            "FLOAT4" => Cell::Float(row.try_get::<f32, _>(i)?.into()),
            "FLOAT8" => Cell::Float(row.try_get::<f64, _>(i)?),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => Cell::Text(row.try_get::<String, _>(i)?),
            "DATE" => Cell::Text(row.try_get::<chrono::NaiveDate, _>(i)?.to_string()),
            "TIMESTAMP" => Cell::Text(row.try_get::<chrono::NaiveDateTime, _>(i)?.to_string()),
            "TIMESTAMPTZ" => Cell::Text(
                row.try_get::<chrono::DateTime<chrono::Utc>, _>(i)?
                    .to_rfc3339(),
            ),
            other => return Err(unsupported(query, column.name(), other)),
        });
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://a.db"), "sqlite://a.db");
        assert!(Backend::of("mysql://x").is_err());
        assert_eq!(Backend::of("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::of("postgresql://x").unwrap(), Backend::Postgres);
    }
}
