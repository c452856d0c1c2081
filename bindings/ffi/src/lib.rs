//! uniffi bindings of searchloop for Python, Kotlin and Swift: the runtime in-process, behind
//! one [`Agent`] object.
//!
//! The API is declared with uniffi's proc-macros (there is no UDL file); `uniffi-bindgen`
//! (this crate's binary, run by `scripts/bindings.sh`) reads it from the built library and
//! generates the `searchloop` module of each language.
//!
//! - [`Agent`]: built from typed [`AgentOptions`] or a config file; `ask`, `feedback`,
//!   `trajectory` and `stats` are async (a coroutine in Python, `suspend` in Kotlin, `async`
//!   in Swift) and run on the bindings' tokio runtime.
//! - [`SearchTool`]: a search tool the host implements, registered beside the Rust tools;
//!   whatever it raises becomes an observation for the model, never a crash.
//! - [`SearchloopError`]: the one flat error every function raises, its message naming the
//!   value at fault.
//!
//! Core types stay free of uniffi: this crate copies them into plain records.

uniffi::setup_scaffolding!("searchloop");

mod agent;
pub mod error;
mod host_tool;
mod options;
mod records;

pub use agent::Agent;
pub use error::{HostToolError, Result, SearchloopError};
pub use host_tool::SearchTool;
pub use options::{AgentOptions, CatalogOptions, ScriptedPolicyOptions};
pub use records::{
    Answer, EpisodeEnd, FeedbackOutcome, RewardRecord, StoreStats, ToolCallRecord, TrajectoryRecord,
};
