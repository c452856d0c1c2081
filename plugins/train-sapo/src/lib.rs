//! GRPO + SAPO LoRA trainer for searchloop on candle.
//!
//! The model is `searchloop-llama`'s differentiable llama-family forward pass over dense
//! (dequantized) weights. This crate turns logged episodes into advantages and a policy loss
//! ([`loss`]: GRPO + SAPO by default, or GRPO, GSPO, CISPO or GRPO + LLDS, optionally with a
//! sampler→behaviour importance correction from [`correction`]), and trains a LoRA adapter with
//! it in a PPO-style loop ([`trainer`]).
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use searchloop_llama::{Llama, LoraAdapter, LoraConfig};
//! use searchloop_train_sapo::{Trainer, TrainerConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
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

pub mod correction;
pub mod error;
pub mod loss;
pub mod trainer;

#[cfg(test)]
mod grad_check;

pub use correction::IsCorrection;
pub use error::{Result, TrainError};
pub use loss::{
    AdvantageConfig, Advantages, LossAggregation, LossConfig, LossKind, LossMetrics,
    LossNormalizer, PolicyLossInputs, group_advantages, policy_loss,
};
pub use trainer::{
    OldLogprobSource, StepMetrics, TrainReport, TrainSequence, Trainer, TrainerConfig,
};
