//! searchloop-runtime: the wiring every searchloop front end shares (the CLI, the HTTP server,
//! the FFI bindings): the default model, the application config, and building an agent from it.

pub mod config;
pub mod default_model;
pub mod error;
pub mod service;

pub use config::AppConfig;
pub use error::{Result, RuntimeError};
pub use service::Runtime;
