//! GRPO + SAPO LoRA trainer for searchloop on candle.
//!
//! The serving model is a quantized GGUF; candle's quantized matmul has no backward, so this
//! crate dequantizes the GGUF ([`gguf`]) into a differentiable llama-family forward pass
//! ([`model`]), trains a LoRA adapter ([`lora`]) with the GRPO + SAPO loss ([`loss`]) in a
//! PPO-style loop ([`trainer`]), saves the adapter in Hugging Face PEFT format, and writes a
//! merged GGUF for serving ([`merge`]).
//!
//! The device is always the caller's choice (a [`candle_core::Device`] argument); the `cuda`
//! feature only makes CUDA devices available.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use searchloop_train_sapo::{Llama, LoraAdapter, LoraConfig, Trainer, TrainerConfig};
//!
//! # fn main() -> searchloop_train_sapo::Result<()> {
//! let device = Device::Cpu;
//! let model = Llama::load("model.gguf", &device, DType::F32)?;
//! let adapter = LoraAdapter::new(LoraConfig::default(), model.config(), &device, DType::F32)?;
//! let mut trainer = Trainer::new(model, adapter, TrainerConfig::default())?;
//! let report = trainer.train(&[])?;
//! println!("{} optimizer steps", report.steps.len());
//! trainer.adapter().save_peft("adapter-dir", "HuggingFaceTB/SmolLM2-135M-Instruct")?;
//! # Ok(())
//! # }
//! ```

// Tests may unwrap: a panic with the error is the clearest failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod error;
mod fused;
pub mod gguf;
mod kernels;
pub mod lora;
pub mod loss;
pub mod merge;
pub mod model;
pub mod pack;
pub mod sample;
pub mod trainer;

#[cfg(test)]
mod grad_check;
#[cfg(test)]
mod test_support;

pub use error::{Result, TrainError};
pub use gguf::{Architecture, GgufFile, LlamaConfig, LlamaWeights, RopeStyle, load_llama};
pub use lora::{LoraAdapter, LoraConfig, TargetModule, gguf_rows_to_hf, hf_rows_to_gguf};
pub use loss::{
    AdvantageConfig, Advantages, LossAggregation, LossConfig, LossMetrics, LossNormalizer,
    PolicyLossInputs, group_advantages, policy_loss,
};
pub use merge::{MergeEncoding, MergeReport, merge_into_gguf};
pub use model::{Llama, TokenStats};
pub use pack::PackedSequences;
pub use sample::{SampleParams, SampledSequence, sample};
pub use trainer::{
    OldLogprobSource, StepMetrics, TrainReport, TrainSequence, Trainer, TrainerConfig,
};
