//! Serving policy for searchloop on mistral.rs, with token-exact sampling.
//!
//! [`MistralRsPolicy`] serves a local GGUF model (any llama-family or Qwen2 file) through
//! mistral.rs and implements core's [`searchloop_core::Policy`]. mistral.rs reports base-10
//! log-probabilities without token ids and shares one random stream between requests, so this
//! crate samples by itself: a custom logits processor draws every token from its own seeded
//! stream at the requested temperature, top-p and top-k, records the token id and its
//! natural-log probability under the distribution it was drawn from, and returns logits masked
//! to that token so the engine must take it. Each sample is one engine request; a group of `n`
//! is `n` requests queued at once. On the CPU they are decoded one at a time, because
//! mistral.rs 0.8.1 decodes batched sequences wrongly there (see the `engine` module).
//!
//! - [`MistralRsConfig`]: which file, how its weights are encoded ([`WeightsEncoding`]), and
//!   the engine's limits.
//! - [`MistralRsPolicy`]: loading, chat rendering, tokenization, sampling, and raw next-token
//!   logits for scoring.
//! - [`ModelError`]: everything that can fail.

mod config;
mod engine;
mod error;
mod gguf;
mod policy;
mod processor;

pub use config::{MistralRsConfig, WeightsEncoding};
pub use error::{ModelError, Result};
pub use policy::{MistralRsPolicy, SamplerStats};
