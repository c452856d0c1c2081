//! A registry written by the first schema (learning state in `training_config` JSON, no staging
//! status) is carried over to the current one on SQLite and PostgreSQL: the state moves to its
//! typed tables, versions are never reused, and a value of the wrong type stops the migration
//! instead of being read as a default.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Kind, TestDb};
use searchloop_store_sql::{AdapterStatus, Cursor, RunningMean, Store};

/// The first schema, as the store's first release created it.
fn v1_script(kind: Kind) -> &'static str {
    match kind {
        Kind::Sqlite => include_str!("../migrations/sqlite/0001_store.sql"),
        Kind::Postgres => include_str!("../migrations/postgres/0001_store.sql"),
    }
}

/// A database at schema version 1 with three adapters: v1 (promoted; a round's cursor and
/// baselines in its training config), v2 (registered by hand, no state), and v3 (deleted
/// again, so the next version must be 4).
async fn version_1_registry(kind: Kind, cursor_json: &str) -> TestDb {
    let db = TestDb::new(kind).await;
    if let TestDb::Sqlite { path, .. } = &db {
        // An empty file is a new database to SQLite; the test's own connection does not create one.
        std::fs::File::create(path).unwrap();
    }
    let schema_table = match kind {
        Kind::Sqlite => {
            "CREATE TABLE searchloop_schema (version INTEGER PRIMARY KEY, description TEXT NOT \
             NULL, applied_at_ns INTEGER NOT NULL);"
        }
        Kind::Postgres => {
            "CREATE TABLE searchloop_schema (version BIGINT PRIMARY KEY, description TEXT NOT \
             NULL, applied_at_ns BIGINT NOT NULL);"
        }
    };
    let config = format!(
        r#"{{"lr": 0.0005, "feedback_cursor": {cursor_json}, "feedback_baselines": {{"inventory": {{"mean": 0.25, "count": 12}}, "single_hop": {{"mean": -0.5, "count": 300}}}}}}"#
    );
    let script = format!(
        "{schema_table}\n{}\nINSERT INTO searchloop_schema VALUES (1, 'first', 0);\n\
         INSERT INTO adapters (content_hash, parent_version, path, training_config, \
         metrics_summary, status, created_at_ns) VALUES ('h1', NULL, '/a/v1', '{config}', '{{}}', \
         'promoted', 1);\n\
         INSERT INTO adapters (content_hash, parent_version, path, training_config, \
         metrics_summary, status, created_at_ns) VALUES ('h2', 1, '/a/v2', '{{\"lr\": 0.001}}', \
         '{{}}', 'candidate', 2);\n\
         INSERT INTO adapters (content_hash, parent_version, path, training_config, \
         metrics_summary, status, created_at_ns) VALUES ('h3', 1, '/a/v3', '{{}}', '{{}}', \
         'rejected', 3);\n\
         DELETE FROM adapters WHERE version = 3;\n\
         INSERT INTO promotions (version, action, reason, at_ns) VALUES (1, 'promote', NULL, 1);",
        v1_script(kind),
    );
    db.execute(&script).await;
    db
}

async fn carries_over(kind: Kind) {
    let db = version_1_registry(kind, "41").await;
    let store = db.open().await;
    let adapters = store.list_adapters().await.unwrap();
    assert_eq!(
        adapters
            .iter()
            .map(|a| (a.version, a.status))
            .collect::<Vec<_>>(),
        [(1, AdapterStatus::Promoted), (2, AdapterStatus::Candidate)]
    );
    // The state left the JSON for its tables; the rest of the config is untouched.
    assert_eq!(
        adapters[0].training_config,
        serde_json::json!({"lr": 0.0005})
    );
    assert_eq!(
        adapters[1].training_config,
        serde_json::json!({"lr": 0.001})
    );
    let state = store.learning_state(1).await.unwrap().unwrap();
    assert_eq!(state.feedback_cursor, "41".parse::<Cursor>().unwrap());
    assert_eq!(
        state.baselines.into_iter().collect::<Vec<_>>(),
        [
            (
                "inventory".to_string(),
                RunningMean {
                    mean: 0.25,
                    count: 12
                }
            ),
            (
                "single_hop".to_string(),
                RunningMean {
                    mean: -0.5,
                    count: 300
                }
            ),
        ]
    );
    assert_eq!(store.learning_state(2).await.unwrap(), None);
    assert!(matches!(
        store.learning_state(3).await,
        Err(searchloop_store_sql::StoreError::UnknownAdapter(3))
    ));
    // The promotion history and the one-promoted rule survived the rebuild.
    assert_eq!(store.promotion_history().await.unwrap().len(), 1);
    assert_eq!(store.promoted().await.unwrap().unwrap().version, 1);
    // Version 3 was assigned once: it is never assigned again.
    let staged = store.stage_adapter(Some(1)).await.unwrap();
    assert_eq!(staged, 4);
    store.discard_staged(staged).await.unwrap();
    store.close().await;
    // Opening again changes nothing.
    let store = db.open().await;
    assert_eq!(store.list_adapters().await.unwrap().len(), 2);
    assert!(store.learning_state(1).await.unwrap().is_some());
    store.close().await;
    db.cleanup().await;
}

async fn refuses_a_malformed_cursor(kind: Kind) {
    let db = version_1_registry(kind, "\"not a number\"").await;
    let err = Store::open_with(&db.location(), TestDb::options())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("migration 2"), "{err}");
    db.cleanup().await;
}

#[tokio::test]
async fn a_version_1_registry_is_carried_over_on_sqlite() {
    carries_over(Kind::Sqlite).await;
}

#[tokio::test]
async fn a_version_1_registry_is_carried_over_on_postgres() {
    carries_over(Kind::Postgres).await;
}

#[tokio::test]
async fn a_malformed_feedback_cursor_stops_the_migration_on_sqlite() {
    refuses_a_malformed_cursor(Kind::Sqlite).await;
}

#[tokio::test]
async fn a_malformed_feedback_cursor_stops_the_migration_on_postgres() {
    refuses_a_malformed_cursor(Kind::Postgres).await;
}
