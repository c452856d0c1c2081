//! The store's schema and its versioned migrations, one script per backend, and the checks that
//! refuse a file or schema that is not a searchloop store before anything is written to it.
//!
//! Versions live in the `searchloop_schema` table (one row per applied migration). A store whose
//! newest version is above [`LATEST_VERSION`] was written by a newer build and is refused.

use std::path::{Path, PathBuf};

use sqlx::{Connection, PgConnection, Row, SqliteConnection, sqlite::SqliteConnectOptions};

use crate::{
    codec,
    error::{DbContext, Result, StoreError},
};

/// The newest schema version this build writes and reads.
pub(crate) const LATEST_VERSION: i64 = 4;

/// The table recording applied migrations; its presence marks a database as a searchloop store.
const SCHEMA_TABLE: &str = "searchloop_schema";

/// `PRAGMA application_id` of searchloop SQLite stores ("SLST"), so `file(1)`-style tools and
/// other programs can tell the file apart from their own.
const SQLITE_APPLICATION_ID: i64 = 0x534C_5354;

const CREATE_SCHEMA_TABLE_SQLITE: &str = "CREATE TABLE searchloop_schema (version INTEGER \
     PRIMARY KEY, description TEXT NOT NULL, applied_at_ns INTEGER NOT NULL)";

const CREATE_SCHEMA_TABLE_POSTGRES: &str = "CREATE TABLE searchloop_schema (version BIGINT \
     PRIMARY KEY, description TEXT NOT NULL, applied_at_ns BIGINT NOT NULL)";

/// One migration: its version, a description, and the script per backend.
struct Migration {
    version: i64,
    description: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

/// Every migration, oldest first. Never edit a released script: append a new version.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "trajectories, reward ledger, training groups, adapter registry",
        sqlite: SQLITE_V1,
        postgres: POSTGRES_V1,
    },
    Migration {
        version: 2,
        description: "staged adapter versions; typed feedback cursor and baselines per adapter",
        sqlite: SQLITE_V2,
        postgres: POSTGRES_V2,
    },
    Migration {
        version: 3,
        description: "the tools a trajectory's task names",
        sqlite: V3,
        postgres: V3,
    },
    Migration {
        version: 4,
        description: "the replica that ran a trajectory; adapter files in the registry",
        sqlite: SQLITE_V4,
        postgres: POSTGRES_V4,
    },
];

/// Version 4 for SQLite: a nullable replica name per trajectory (rows from before read as
/// naming none), and the PEFT files of each published adapter, so that a serving replica on
/// another machine can fetch the adapter from the store instead of a shared disk.
const SQLITE_V4: &str = include_str!("../migrations/sqlite/0004_fleet.sql");

/// Version 4 for PostgreSQL: the same change, with the weights as BYTEA.
const POSTGRES_V4: &str = include_str!("../migrations/postgres/0004_fleet.sql");

/// Version 3, the same text for both databases: a nullable JSON array of tool names per
/// trajectory. Existing rows read as naming none.
const V3: &str = "ALTER TABLE trajectories ADD COLUMN task_tools TEXT;";

/// Version 2 for SQLite: the `staging` status (a version reserved before its round writes
/// the files named after it), and the learning state a round leaves for the rounds trained
/// from its adapter in typed tables instead of keys of its `training_config` JSON. Existing
/// state is carried over and its keys removed; a value of the wrong type fails the migration
/// on the new tables' checks rather than being read as a default.
///
/// SQLite cannot change a CHECK constraint in place, so the adapters table is rebuilt (the
/// documented create-copy-drop-rename procedure); [`migrate_sqlite`] turns foreign key
/// enforcement off around it, so that dropping the old table cascades to nothing, and checks
/// every reference before committing. The AUTOINCREMENT high-water mark is carried over, so a
/// version is never reused.
const SQLITE_V2: &str = include_str!("../migrations/sqlite/0002_staging_and_learning_state.sql");

/// Version 2 for PostgreSQL: the same change; PostgreSQL alters the CHECK constraint in place,
/// and its casts fail the migration on a value of the wrong type.
const POSTGRES_V2: &str =
    include_str!("../migrations/postgres/0002_staging_and_learning_state.sql");

/// Version 1 for SQLite. Small columns come first: SQLite stores a row's columns in order, and a
/// query that filters on metadata then never reads the blobs and long texts (in overflow pages)
/// behind them. `AUTOINCREMENT` keeps sequence numbers from ever being reused after
/// retention deletes the newest rows. A training group's `change_seq` is NULL while it has
/// changes no sequencing round has numbered yet; `store_counters` remembers the last number given
/// (the PostgreSQL schema uses a sequence).
const SQLITE_V1: &str = include_str!("../migrations/sqlite/0001_store.sql");

/// Version 1 for PostgreSQL: the same tables with native types (identity columns, BYTEA,
/// DOUBLE PRECISION, BIGINT everywhere so both backends decode to `i64`).
const POSTGRES_V1: &str = include_str!("../migrations/postgres/0001_store.sql");

/// What a SQLite file looked like before the store touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SqliteFileState {
    /// No file, or an empty one (SQLite treats a zero-length file as an empty database).
    New,
    /// A searchloop store at this schema version (possibly 0: created, never migrated).
    Ours,
}

/// Checks an existing file's bytes without SQLite: it is not a folder, and its 100-byte header
/// is a SQLite header whose page count the file holds (cheap, and clear for text files, random
/// bytes and truncation). This opens and closes the file, so it must not run while this process
/// has SQLite connections on it (see [`crate::open_files`]).
pub(crate) fn check_sqlite_file_bytes(path: &Path) -> Result<()> {
    match sqlite_file_len(path)? {
        Some(bytes) if bytes > 0 => check_sqlite_header(path, bytes),
        _ => Ok(()),
    }
}

/// The file's length, or `None` when there is no file; a folder is refused.
fn sqlite_file_len(path: &Path) -> Result<Option<u64>> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(StoreError::InvalidLocation {
            location: path.display().to_string(),
            reason: "it is a directory".into(),
        }),
        Ok(meta) => Ok(Some(meta.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            context: format!("cannot read the metadata of {}", path.display()),
            source,
        }),
    }
}

/// Inspects an existing file's schema over a read-only connection, which never checkpoints or
/// rewrites the file. [`check_sqlite_file_bytes`] has vetted the bytes first.
pub(crate) async fn inspect_sqlite_file(path: &Path) -> Result<SqliteFileState> {
    if sqlite_file_len(path)?.is_none_or(|bytes| bytes == 0) {
        return Ok(SqliteFileState::New);
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .create_if_missing(false);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| classify_sqlite_error(path, e))?;
    let state = sqlite_schema_state(&mut conn, path).await;
    // A failure to close a read-only connection cannot have changed the file.
    let _ = conn.close().await;
    state
}

/// Reads the 100-byte header: the magic string, the page size, and (when the header's size
/// field is valid) whether the file holds every page the header promises.
fn check_sqlite_header(path: &Path, file_len: u64) -> Result<()> {
    use std::io::Read;
    let mut header = [0u8; 100];
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::NotADatabase {
                    path: path.to_path_buf(),
                }
            } else {
                StoreError::Io {
                    context: format!("cannot read {}", path.display()),
                    source,
                }
            }
        });
    read?;
    if &header[..16] != b"SQLite format 3\0" {
        return Err(StoreError::NotADatabase {
            path: path.to_path_buf(),
        });
    }
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536u64,
        n if n >= 512 && n.is_power_of_two() => u64::from(n),
        n => {
            return Err(StoreError::CorruptFile {
                path: path.to_path_buf(),
                detail: format!("invalid page size {n} in the header"),
            });
        }
    };
    // The page count at offset 28 is valid when the "version-valid-for" number at 92 matches
    // the change counter at 24 (SQLite file format, section 1.3.7). A crash during a checkpoint
    // can leave the file shorter than its header says while the WAL still holds the missing
    // pages, so the check only applies when there is no WAL to recover from.
    let pages = u64::from(be32(28));
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let wal_holds_pages = std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0);
    if !wal_holds_pages && be32(92) == be32(24) && pages > 0 && file_len < pages * page_size {
        return Err(StoreError::CorruptFile {
            path: path.to_path_buf(),
            detail: format!(
                "truncated: the header promises {pages} pages of {page_size} bytes ({} bytes), \
                 the file has {file_len}",
                pages * page_size
            ),
        });
    }
    Ok(())
}

/// Maps a SQLite open or read error to a clear store error.
fn classify_sqlite_error(path: &Path, e: sqlx::Error) -> StoreError {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| c.parse::<i32>().ok());
    // Primary result codes: 11 = SQLITE_CORRUPT, 26 = SQLITE_NOTADB (extended codes keep the
    // primary code in the low byte).
    match code.map(|c| c & 0xff) {
        Some(26) => StoreError::NotADatabase {
            path: path.to_path_buf(),
        },
        Some(11) => StoreError::CorruptFile {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Database {
            context: format!("open {}", path.display()),
            source: e,
        },
    }
}

async fn sqlite_schema_state(conn: &mut SqliteConnection, path: &Path) -> Result<SqliteFileState> {
    let location = path.display().to_string();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| classify_sqlite_error(path, e))?;
    let application_id: i64 = sqlx::query_scalar("PRAGMA application_id")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| classify_sqlite_error(path, e))?;
    if application_id != 0 && application_id != SQLITE_APPLICATION_ID {
        return Err(StoreError::ForeignDatabase {
            location,
            detail: format!("its application id is {application_id:#x}, not searchloop's"),
        });
    }
    if tables.is_empty() {
        return Ok(SqliteFileState::New);
    }
    check_our_tables(&location, &tables)?;
    let version = stored_version(&mut *conn, &location).await?;
    check_version(&location, version)?;
    Ok(SqliteFileState::Ours)
}

/// Refuses a database whose tables exist but do not include the schema table.
fn check_our_tables(location: &str, tables: &[String]) -> Result<()> {
    if tables.iter().any(|t| t == SCHEMA_TABLE) {
        return Ok(());
    }
    let mut shown: Vec<&str> = tables.iter().take(5).map(String::as_str).collect();
    if tables.len() > shown.len() {
        shown.push("...");
    }
    Err(StoreError::ForeignDatabase {
        location: location.to_string(),
        detail: format!(
            "it has tables ({}) but no {SCHEMA_TABLE} table",
            shown.join(", ")
        ),
    })
}

fn check_version(location: &str, version: Option<i64>) -> Result<()> {
    match version {
        Some(v) if v > LATEST_VERSION => Err(StoreError::SchemaTooNew {
            location: location.to_string(),
            found: v,
            supported: LATEST_VERSION,
        }),
        Some(v) if v < 1 => Err(StoreError::ForeignDatabase {
            location: location.to_string(),
            detail: format!("its {SCHEMA_TABLE} table records an unknown version {v}"),
        }),
        None => Err(StoreError::ForeignDatabase {
            location: location.to_string(),
            detail: format!("its {SCHEMA_TABLE} table records no version"),
        }),
        Some(_) => Ok(()),
    }
}

/// The newest applied version, or `None` when the schema table is empty.
async fn stored_version<'c, E>(conn: E, location: &str) -> Result<Option<i64>>
where
    E: sqlx::Executor<'c>,
    for<'r> i64: sqlx::Decode<'r, E::Database> + sqlx::Type<E::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, E::Database>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, E::Database>,
    usize: sqlx::ColumnIndex<<E::Database as sqlx::Database>::Row>,
{
    let row = sqlx::query("SELECT MAX(version) FROM searchloop_schema")
        .fetch_one(conn)
        .await
        .ctx(&format!("read the schema version of {location}"))?;
    row.try_get::<Option<i64>, _>(0)
        .ctx(&format!("read the schema version of {location}"))
}

/// Brings a SQLite store to [`LATEST_VERSION`] inside one `BEGIN IMMEDIATE` transaction, so
/// processes opening the same new file at once apply each migration exactly once. The file was
/// inspected first; the checks are repeated under the write lock.
pub(crate) async fn migrate_sqlite(conn: &mut SqliteConnection, path: &Path) -> Result<()> {
    let location = path.display().to_string();
    // 16 KiB pages: a trajectory row (20-40 KB with its blobs and texts) then spans a few
    // overflow pages instead of a dozen, which halves the time to read one back. SQLite applies
    // this only while the file is still empty; for an existing store it changes nothing.
    sqlx::query("PRAGMA page_size = 16384")
        .execute(&mut *conn)
        .await
        .ctx(&format!("set the page size of {location}"))?;
    // WAL lets readers (the trainer) run while a writer commits. Setting it needs no
    // transaction, and it persists in the file.
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
        .fetch_one(&mut *conn)
        .await
        .ctx(&format!("switch {location} to WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::InvalidLocation {
            location,
            reason: format!("SQLite refused WAL mode (journal mode is '{mode}')"),
        });
    }
    // Off for the migration's connection only (it cannot change inside a transaction): a
    // migration that rebuilds a table must not cascade the old table's drop to the rows that
    // reference it. The references are checked before the commit instead.
    sqlx::query("PRAGMA foreign_keys = OFF")
        .execute(&mut *conn)
        .await
        .ctx(&format!("prepare {location} for migration"))?;
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .ctx(&format!("lock {location} for migration"))?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(&mut *tx)
    .await
    .ctx(&format!("list the tables of {location}"))?;
    apply_migrations::<sqlx::Sqlite>(
        &mut tx,
        &location,
        &tables,
        CREATE_SCHEMA_TABLE_SQLITE,
        |m| m.sqlite,
    )
    .await?;
    let broken: Vec<String> = sqlx::query_scalar("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(&mut *tx)
        .await
        .ctx(&format!("check the references of {location}"))?;
    if !broken.is_empty() {
        return Err(StoreError::InvalidLocation {
            location,
            reason: format!("the migration would leave broken references in {broken:?}"),
        });
    }
    tx.commit()
        .await
        .ctx(&format!("commit the migration of {location}"))
}

/// Brings the PostgreSQL schema to [`LATEST_VERSION`]. An advisory lock serialises replicas that
/// start together; PostgreSQL's DDL is transactional, so a failed migration leaves nothing.
/// A schema that holds other tables but no schema table is refused, not shared.
pub(crate) async fn migrate_postgres(conn: &mut PgConnection) -> Result<String> {
    let mut tx = conn.begin().await.ctx("begin the schema migration")?;
    // The key is an arbitrary constant that names "searchloop store migration".
    sqlx::query("SELECT pg_advisory_xact_lock(7362514118291)")
        .execute(&mut *tx)
        .await
        .ctx("take the migration lock")?;
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await
        .ctx("read the current schema")?;
    let schema = schema.ok_or_else(|| StoreError::InvalidLocation {
        location: "postgres".into(),
        reason: "no schema is selected (the search_path names no existing schema)".into(),
    })?;
    let location = format!("PostgreSQL schema '{schema}'");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await
    .ctx("list the tables of the schema")?;
    apply_migrations::<sqlx::Postgres>(
        &mut tx,
        &location,
        &tables,
        CREATE_SCHEMA_TABLE_POSTGRES,
        |m| m.postgres,
    )
    .await?;
    tx.commit()
        .await
        .ctx(&format!("commit the migration of {location}"))?;
    Ok(schema)
}

/// Inside a migration transaction: creates the schema table in an empty database, or checks
/// that the existing `tables` are a store of a version this build knows; then applies every
/// newer migration (`script` picks the backend's text) and records it.
async fn apply_migrations<DB>(
    conn: &mut DB::Connection,
    location: &str,
    tables: &[String],
    schema_table_ddl: &'static str,
    script: fn(&Migration) -> &'static str,
) -> Result<()>
where
    DB: sqlx::Database,
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<i64>: sqlx::Decode<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let current = if tables.is_empty() {
        create_schema_table(&mut *conn, schema_table_ddl).await?;
        0
    } else {
        check_our_tables(location, tables)?;
        let v = stored_version(&mut *conn, location).await?;
        check_version(location, v)?;
        v.unwrap_or(0)
    };
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        sqlx::raw_sql(script(m))
            .execute(&mut *conn)
            .await
            .ctx(&format!("apply migration {} to {location}", m.version))?;
        record_migration(&mut *conn, m).await?;
    }
    Ok(())
}

/// Creates the schema table; `ddl` is [`CREATE_SCHEMA_TABLE_SQLITE`] or
/// [`CREATE_SCHEMA_TABLE_POSTGRES`].
async fn create_schema_table<'c, E: sqlx::Executor<'c>>(conn: E, ddl: &'static str) -> Result<()> {
    sqlx::raw_sql(ddl)
        .execute(conn)
        .await
        .ctx("create the schema version table")?;
    Ok(())
}

async fn record_migration<'c, E>(conn: E, m: &Migration) -> Result<()>
where
    E: sqlx::Executor<'c>,
    for<'q> i64: sqlx::Encode<'q, E::Database> + sqlx::Type<E::Database>,
    for<'q> &'q str: sqlx::Encode<'q, E::Database> + sqlx::Type<E::Database>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, E::Database>,
{
    let now = codec::to_nanos("migration time", chrono::Utc::now())?;
    sqlx::query(
        "INSERT INTO searchloop_schema (version, description, applied_at_ns) VALUES ($1, $2, $3)",
    )
    .bind(m.version)
    .bind(m.description)
    .bind(now)
    .execute(conn)
    .await
    .ctx(&format!("record migration {}", m.version))?;
    Ok(())
}
