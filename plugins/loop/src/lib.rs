//! searchloop's closed learning loop: it turns rounds of training into a better served model,
//! or into nothing, never into a worse one.
//!
//! - [`scheduler`]: [`LearningLoop`] runs a round ([`searchloop_learn`]'s, or a host's
//!   [`RoundRunner`]), judges its candidate, and promotes or rejects it; its scheduler starts
//!   rounds on new data or on a timer.
//! - [`gate`]: the eval gate (held-out score against the serving model) and the ISDD alarm.
//! - [`monitor`]: the online monitor that rolls a fresh promotion back when its live reward falls.
//! - [`adapters`]: [`AdapterManager`], blue/green promotion and rollback in crash-safe order,
//!   with models built by a [`PolicyLoader`] the host provides.
//! - [`metrics`]: the loop's counters.
//!
//! The crate knows no serving engine and no tool: it sees models as `searchloop_core::Policy`
//! values made by a [`PolicyLoader`], and the base model as a file path.

// Tests may unwrap: a panic with the error is the clearest failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod adapters;
pub mod error;
pub mod gate;
pub mod metrics;
pub mod monitor;
pub mod scheduler;

pub use adapters::{AdapterLocator, AdapterManager, FleetCache, PolicyLoader, SwapReport};
pub use error::{LoopError, Result};
pub use gate::{EvalReport, GateConfig, GateMetric, GateVerdict};
pub use metrics::LoopMetrics;
pub use monitor::MonitorConfig;
pub use scheduler::{
    BaseModel, EvalConfig, LearningLoop, RoundCandidate, RoundJob, RoundReport, RoundRunner,
    SchedulerConfig, TriggerConfig,
};
pub use searchloop_train_sapo::LossMetrics;
