//! searchloop-runtime: the wiring every searchloop front end shares (the CLI, the HTTP server,
//! the FFI bindings): the default model, the application config, opening the tools, building
//! the served policy, and the [`Runtime`] façade over the agent, the store and the learning
//! loop (`searchloop-loop`).

pub mod config;
pub mod default_model;
pub mod error;
pub mod service;

pub use config::AppConfig;
pub use error::{Result, RuntimeError};
pub use searchloop_loop::{
    AdapterManager, LoopMetrics, LossMetrics, PolicyLoader, RoundReport, SchedulerConfig,
    SwapReport,
};
pub use service::{ModelLoader, Runtime};
