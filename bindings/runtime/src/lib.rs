//! searchloop-runtime: the wiring every searchloop front end shares (the CLI, the HTTP server,
//! the FFI bindings): the default model, the application config, and building an agent from it.

pub mod adapters;
pub mod config;
pub mod default_model;
pub mod error;
pub mod gate;
pub mod metrics;
pub mod monitor;
pub mod scheduler;
pub mod service;

pub use adapters::{AdapterManager, PolicyLoader, SwapReport};
pub use config::AppConfig;
pub use error::{Result, RuntimeError};
pub use metrics::LoopMetrics;
pub use scheduler::{RoundReport, SchedulerConfig};
pub use service::Runtime;
