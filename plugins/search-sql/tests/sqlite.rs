//! The inventory tool on a real SQLite file seeded from the retail generator. Every check
//! ends by verifying that the data is intact.

// Helpers outside `#[test]` functions panic on failure too: the panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use searchloop_demo::seed_retail_inventory;
use searchloop_search_sql::{InventoryTool, SqlError};
use tempfile::TempDir;

/// A freshly seeded inventory file.
struct Fixture {
    _dir: TempDir,
    url: String,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("inventory.db").display());
    seed_retail_inventory(&url, dataset().dir.path())
        .await
        .unwrap();
    Fixture { _dir: dir, url }
}

#[tokio::test]
async fn conformance() {
    check_conformance(&fixture().await.url).await;
}

#[tokio::test]
async fn answers_every_generated_inventory_question() {
    check_inventory_questions(&fixture().await.url).await;
}

#[tokio::test]
async fn find_products_joins_catalog_and_stock() {
    check_find_products(&fixture().await.url).await;
}

#[tokio::test]
async fn injection_attempts_in_every_parameter_are_inert() {
    check_injection_is_inert(&fixture().await.url).await;
}

#[tokio::test]
async fn wrong_types_missing_parameters_and_unknown_queries_are_rejected() {
    check_bad_arguments(&fixture().await.url).await;
}

#[tokio::test]
async fn a_slow_query_is_interrupted_and_the_connection_survives() {
    check_slow_query_is_stopped(&fixture().await.url).await;
}

#[tokio::test]
async fn declared_writes_are_refused_even_after_query_only_is_turned_off() {
    // `PRAGMA query_only = OFF` lifts one layer; the file is still opened read-only.
    check_declared_writes_are_refused(&fixture().await.url, "PRAGMA query_only = OFF").await;
}

#[tokio::test]
async fn the_row_limit_is_reported() {
    check_row_limit(&fixture().await.url).await;
}

#[tokio::test]
async fn bad_declarations_fail_when_the_tool_is_built() {
    let fixture = fixture().await;
    check_bad_declarations_fail_at_connect(&fixture.url).await;
    assert_intact(&fixture.url).await;
}

#[tokio::test]
async fn reseeding_replaces_the_data() {
    check_reseeding_is_idempotent(&fixture().await.url).await;
}

#[tokio::test]
async fn a_missing_database_file_is_an_error_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let err = InventoryTool::connect(retail_config(&url))
        .await
        .unwrap_err();
    assert!(matches!(err, SqlError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("missing.db"), "{err}");
    assert!(!path.exists());
}
