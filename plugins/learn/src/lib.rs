//! Training rounds for searchloop: from rewarded trajectories to a registered LoRA candidate,
//! and the held-out evaluation that judges it.
//!
//! A round ([`run_round`]) gathers GRPO groups from two sources ([`GroupSource`]):
//!
//! - **replay**: `group_size` fresh episodes for each of `prompts_per_round` train-split
//!   questions, sampled through the serving agent (so they are logged like any episode) and
//!   rewarded by exact match, F1 and format;
//! - **feedback**: logged episodes whose reward ledger holds host feedback, read from the store
//!   from where the parent adapter's round stopped. They are grouped by group id or by prompt
//!   where those repeat; an episode with a unique prompt trains against a running mean of its
//!   task kind's feedback reward ([`RunningMean`]), kept per adapter lineage in the registry's
//!   learning state ([`searchloop_store_sql::LearningState`]).
//!
//! With `demonstrations` on, a replay group that found no answer as good as a teacher's gets a
//! teacher episode playing its question's worked solution (`demonstration.rs`), trained with
//! rescored log-probs. With `warm_start`, a round from the base model samples nothing: it
//! imitates that many teacher episodes, under CISPO.
//!
//! Each episode becomes a [`searchloop_train_sapo::TrainSequence`] ([`batch`]): its exact token
//! ids, a loss mask over the model's own tokens, the behaviour log-probs and the temperature
//! they were sampled at (the trainer scores under the same temperature), its training reward
//! under the store's reward policy, and its group. The trainer (GRPO + SAPO, AdamW, PPO epochs)
//! runs on a blocking thread inside its own rayon pool of `threads` cores. The candidate is
//! written as a PEFT adapter, a merged GGUF ([`MERGED_FILE`]) and a metrics file
//! ([`METRICS_FILE`], one JSON line per optimizer step), published atomically as
//! `adapters_dir/v<N>/` under the version the round reserved, and registered as a candidate.
//!
//! [`evaluate`] scores an agent on held-out items by exact match and F1 with fixed seeds.
//!
//! ```no_run
//! # async fn demo(agent: &searchloop_core::Agent, store: &searchloop_store_sql::Store)
//! #     -> searchloop_learn::Result<()> {
//! use std::{path::Path, sync::atomic::AtomicBool};
//! use searchloop_learn::{RoundConfig, RoundContext, run_round};
//!
//! let cancel = AtomicBool::new(false);
//! let ctx = RoundContext {
//!     agent,
//!     store,
//!     base_gguf: Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"),
//!     parent: None,
//!     parent_adapter_dir: None,
//!     adapters_dir: Path::new("adapters"),
//!     cancel: &cancel,
//! };
//! let out = run_round(&ctx, &RoundConfig::default()).await?;
//! println!("candidate v{} at {}", out.candidate.version, out.merged_gguf.display());
//! # Ok(()) }
//! ```

// Tests may unwrap: a panic with the error is the clearest failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod config;
mod demonstration;
pub mod error;
pub mod eval;
pub mod fetch;
mod groups;
pub mod metrics;
pub mod questions;
pub mod round;

pub use batch::{BatchStats, SkipReason};
pub use config::{GroupSource, MergedWeights, RoundConfig};
pub use error::{LearnError, Result};
pub use eval::{EVAL_CONCURRENCY, EvalReport, KindReport, evaluate, evaluate_observed};
pub use fetch::{base_model_hash, fetch_adapter};
pub use groups::FeedbackBaselines;
pub use metrics::{METRICS_FILE, RoundSummary};
pub use questions::{Question, read_eval_items, read_train_prompts};
pub use round::{
    MERGED_FILE, RoundContext, RoundObserver, RoundOutput, STAGING_PREFIX, discard_stale_rounds,
    run_round, run_round_observed,
};
pub use searchloop_store_sql::RunningMean;
