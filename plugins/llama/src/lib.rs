//! A llama-family decoder (llama, qwen2) on candle, shared by searchloop's trainer and its
//! candle serving engine.
//!
//! The serving file is a quantized GGUF; candle's quantized matmul has no backward, so
//! [`gguf`] dequantizes it into dense weights for a differentiable forward pass ([`model`]),
//! over padded batches or sequences packed along their shared prefixes ([`pack`]). Its
//! per-token ops are fused graph nodes with parallel CPU kernels ([`kernels`], and the
//! attention and output head in `fused`). [`lora`] holds LoRA adapters and their Hugging Face
//! PEFT files; [`merge`] writes a GGUF with an adapter merged in, for serving.
//!
//! The device is always the caller's choice (a [`candle_core::Device`] argument); the `cuda`
//! feature only makes CUDA devices available.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use searchloop_llama::Llama;
//!
//! # fn main() -> searchloop_llama::Result<()> {
//! let model = Llama::load("model.gguf", &Device::Cpu, DType::F32)?;
//! println!("{} layers", model.config().n_layer);
//! # Ok(())
//! # }
//! ```

// Tests may unwrap: a panic with the error is the clearest failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod chat;
pub mod error;
mod few_rows;
mod fused;
pub mod gguf;
pub mod infer;
mod kernels;
pub mod lora;
pub mod merge;
pub mod model;
pub mod pack;
#[cfg(any(test, feature = "test-support"))]
pub mod sample;
#[cfg(any(test, feature = "test-support"))]
#[allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
pub mod test_support;
pub mod tokenizer;

pub use error::{LlamaError, Result};
pub use gguf::{Architecture, GgufFile, LlamaConfig, LlamaWeights, RopeStyle, load_llama};
pub use infer::{KvCache, ServingModel, SlotId, TokenBatch, WeightsEncoding};
pub use lora::{LoraAdapter, LoraConfig, TargetModule, gguf_rows_to_hf, hf_rows_to_gguf};
pub use merge::{MergeEncoding, MergeReport, merge_into_gguf};
pub use model::{Llama, TokenStats};
pub use pack::PackedSequences;
