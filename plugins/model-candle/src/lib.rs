//! searchloop's batched serving engine on candle.
//!
//! [`CandlePolicy`] serves a GGUF model (llama-family or Qwen2, dense f32 or quantized) as a
//! [`searchloop_core::Policy`]. One engine thread decodes every running sequence in each
//! forward pass, prefills waiting prompts in the same passes, reuses the keys and values of
//! cached prefixes (the system prompt, an episode's earlier turns), and drops a request as soon
//! as its caller stops waiting. Sampling is the engine's own, with a seeded generator per
//! sample, so every sample carries its exact token ids and the natural-log probability each
//! token had under the distribution it was drawn from.
//!
//! The model and its key/value cache are `searchloop-llama`'s ([`searchloop_llama::infer`]):
//! the same weights and numerics the trainer scores with.

// Tests may unwrap: a panic with the error is the clearest failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
mod engine;
pub mod error;
pub mod policy;

pub use config::CandleConfig;
pub use error::{CandleError, Result};
pub use policy::{CandlePolicy, EngineStats};
