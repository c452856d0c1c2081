//! searchloop-server: the searchloop HTTP service (`searchloop serve`), built on axum.
//!
//! | endpoint | does |
//! |---|---|
//! | `POST /v1/ask` | runs one episode: `{question, temperature?, top_p?, top_k?, seed?}` → answer, trajectory id, tool calls, latency, adapter version |
//! | `POST /v1/feedback` | adds a host reward to a trajectory: `{trajectory_id, source, value, weight?, idempotency_key?}` |
//! | `GET /v1/trajectories/{id}` | the stored trajectory with its reward ledger |
//! | `GET /v1/adapters` | the adapter registry and the version serving here |
//! | `POST /v1/adapters/{v}/promote` | promotes adapter `v` and swaps it in (episodes in flight finish on the old model) |
//! | `POST /v1/adapters/rollback` | returns to an earlier promoted adapter: `{to?}` or an empty body |
//! | `POST /v1/train` | starts a training round with its eval gate in the background (202); `GET /v1/train` tells how the last one ended |
//! | `GET /healthz` | 200 while serving, 503 once shutdown has begun (always open) |
//! | `GET /metrics` | Prometheus text: requests and latencies per route and status, episodes, tool calls and errors, generated tokens, feedback, store counts, and (over a runtime) training rounds, gate decisions and adapter swaps |
//!
//! `API.md` beside this crate's manifest gives the JSON schema of every body.
//!
//! Every failure is a JSON body `{"error": {"code", "message"}}` with a 4xx status for bad
//! input (bad JSON, wrong content type, oversize body, unknown id, missing or wrong API key) and
//! 503/504 for shutdown and timeouts; 500 is reserved for server bugs (a broken model).
//!
//! The server runs over any [`searchloop_core::Agent`] and [`searchloop_store_sql::Store`]
//! ([`AppState::new`]), or over a started [`searchloop_runtime::Runtime`]
//! ([`AppState::from_runtime`]):
//!
//! ```no_run
//! # async fn run(runtime: searchloop_runtime::Runtime) -> searchloop_server::Result<()> {
//! use std::sync::Arc;
//! use searchloop_server::{AppState, ServerConfig, bind, serve};
//!
//! let config = ServerConfig::default();
//! let listener = bind(&config).await?;
//! let state = AppState::from_runtime(Arc::new(runtime));
//! serve(listener, state, &config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

pub mod api;
pub mod config;
pub mod error;
pub mod metrics;
mod routes;
mod server;
mod state;

pub use config::{ApiKey, ServerConfig};
pub use error::{Result, ServerError};
pub use routes::router;
pub use server::{bind, serve};
pub use state::AppState;
