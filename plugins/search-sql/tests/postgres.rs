//! The inventory tool on a real PostgreSQL server (`SEARCHLOOP_PG_URL`, started by
//! `scripts/postgres.sh start`). Each test seeds a schema of its own, so suites can run at
//! once on the same server, and drops it (and any role it made) afterwards. Every check ends
//! by verifying that the data is intact.

// Helpers outside `#[test]` functions panic on failure too: the panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;

use common::*;
use searchloop_core::DynTool;
use searchloop_demo::seed_retail_inventory;
use serde_json::json;
use sqlx::{Connection, postgres::PgConnection};
use url::Url;

/// The server's URL; the suite fails, never skips, without one.
fn server_url() -> String {
    std::env::var("SEARCHLOOP_PG_URL").unwrap_or_else(|_| {
        panic!(
            "SEARCHLOOP_PG_URL is not set: start a server with \
             `eval \"$(scripts/postgres.sh start)\"` and run the tests again"
        )
    })
}

/// `base` logged in as `user` (when given) with `search_path` set to `schema`.
fn url_for(base: &str, schema: &str, user: Option<&str>) -> String {
    let mut url = Url::parse(base).unwrap();
    if let Some(user) = user {
        url.set_username(user).unwrap();
        url.set_password(None).unwrap();
    }
    url.query_pairs_mut()
        .append_pair("options", &format!("-c search_path={schema}"));
    url.to_string()
}

/// A schema seeded with the retail inventory, dropped with its roles when the test ends.
struct Fixture {
    server: String,
    schema: String,
    url: String,
    roles: Mutex<Vec<String>>,
}

async fn fixture() -> Fixture {
    let server = server_url();
    let schema = format!("search_sql_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&server).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = url_for(&server, &schema, None);
    seed_retail_inventory(&url, dataset().dir.path())
        .await
        .unwrap();
    Fixture {
        server,
        schema,
        url,
        roles: Mutex::new(Vec::new()),
    }
}

impl Fixture {
    /// A login role that may only read this schema's tables.
    async fn read_only_role(&self) -> String {
        let role = format!("{}_reader", self.schema);
        let mut admin = PgConnection::connect(&self.url).await.unwrap();
        for statement in [
            format!("CREATE ROLE {role} LOGIN"),
            format!("GRANT USAGE ON SCHEMA {} TO {role}", self.schema),
            format!(
                "GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {role}",
                self.schema
            ),
        ] {
            sqlx::query(&statement).execute(&mut admin).await.unwrap();
        }
        self.roles.lock().unwrap().push(role.clone());
        role
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let server = self.server.clone();
        let schema = self.schema.clone();
        let roles = std::mem::take(&mut *self.roles.lock().unwrap());
        // Drop runs outside async code (and during unwinding), so the cleanup gets a runtime
        // of its own on a thread of its own.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&server).await.unwrap();
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                for role in roles {
                    sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
                        .execute(&mut admin)
                        .await
                        .unwrap();
                }
            });
        })
        .join()
        .unwrap();
    }
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
async fn a_slow_query_is_cancelled_and_the_connection_survives() {
    check_slow_query_is_stopped(&fixture().await.url).await;
}

#[tokio::test]
async fn declared_writes_are_refused_even_after_the_session_default_is_changed() {
    // The session default can be switched off, but every call opens `BEGIN READ ONLY`.
    check_declared_writes_are_refused(
        &fixture().await.url,
        "SET default_transaction_read_only = off",
    )
    .await;
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
async fn a_read_only_role_adds_a_layer_the_tool_works_under() {
    let fixture = fixture().await;
    let role = fixture.read_only_role().await;
    let reader_url = url_for(&fixture.server, &fixture.schema, Some(&role));

    let tool = connect(retail_config(&reader_url)).await;
    let sku = dataset().data.products[0].sku.clone();
    let text = tool
        .call_json(json!({"query": "stock_by_sku", "sku": sku}))
        .await
        .unwrap();
    assert!(text.starts_with("stock_by_sku: 8 rows"), "{text}");

    // Outside the tool's read-only transactions, the role itself cannot write.
    let mut reader = PgConnection::connect(&reader_url).await.unwrap();
    let err = sqlx::query("DELETE FROM stock")
        .execute(&mut reader)
        .await
        .unwrap_err();
    let code = err.as_database_error().and_then(|e| e.code()).unwrap();
    assert_eq!(code, "42501", "{err}");
    assert_intact(&fixture.url).await;
}
