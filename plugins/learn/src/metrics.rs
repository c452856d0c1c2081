//! The round's metrics file: one JSON line per optimizer step (the trainer's step metrics plus
//! the batch statistics they belong to), then one line summarising the round.
//!
//! Lines are written as steps finish and flushed one by one, so the file can be followed while a
//! round trains. Non-finite values (a ratio minimum over no tokens, a KL without a reference
//! model) are written as `null`.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use searchloop_train_sapo::StepMetrics;
use serde::{Deserialize, Serialize};

use crate::{
    batch::BatchStats,
    error::{LearnError, Result},
};

/// The metrics file's name inside an adapter's folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What a round did, as written on the last metrics line and into the adapter registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// The round's number (the count of adapters registered before it).
    pub round: u64,
    /// The adapter version it trained from.
    pub parent: Option<u64>,
    /// What went into the batch.
    pub batch: BatchStats,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Sequences trained on (zero-std groups may be skipped).
    pub trained_sequences: usize,
    /// Mean |sampler − trainer| log-prob over trained tokens (see
    /// [`searchloop_train_sapo::TrainReport::logprob_gap`]).
    pub logprob_gap: Option<f64>,
    /// Largest |sampler − trainer| log-prob over the same tokens.
    pub logprob_gap_max: Option<f64>,
    /// Replay episodes sampled.
    pub rollout_episodes: usize,
    /// Tokens the model generated in them.
    pub rollout_tokens: usize,
    /// Wall time of sampling the replay groups.
    pub rollout_seconds: f64,
    /// Replay prompts a group was sampled for (more than the round's prompts when dynamic
    /// sampling replaced groups without spread).
    #[serde(default)]
    pub rollout_prompts: usize,
    /// Replay groups whose rewards differ.
    #[serde(default)]
    pub informative_groups: usize,
    /// Wall time of training (model load, epochs, adapter and merged model writes).
    pub train_seconds: f64,
    /// Tokens pushed through forward and backward passes (every position of every sequence,
    /// per epoch).
    pub trained_tokens: usize,
    /// CPU threads the trainer used.
    pub threads: usize,
}

/// One line of the metrics file.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MetricsLine<'a> {
    /// An optimizer step.
    Step {
        /// The round's number.
        round: u64,
        /// The step's metrics.
        #[serde(flatten)]
        step: &'a StepMetrics,
        /// Mean training reward of the batch.
        reward_mean: f64,
        /// Standard deviation of the training reward.
        reward_std: f64,
        /// Fraction of groups with equal rewards.
        zero_std_frac: f64,
        /// Mean model tokens per episode.
        response_len_mean: f64,
        /// Mean tool calls per episode.
        tool_calls_mean: f64,
    },
    /// The round's summary.
    Round(&'a RoundSummary),
}

/// Appends metrics lines to a file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Creates (truncating) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path)
            .map_err(|e| LearnError::io(format!("cannot create {}", path.display()), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Writes one line and flushes it.
    pub fn write(&mut self, line: &MetricsLine<'_>) -> Result<()> {
        let context = || format!("cannot write metrics to {}", self.path.display());
        let json = serde_json::to_string(line)
            .map_err(|e| LearnError::io(context(), std::io::Error::other(e)))?;
        writeln!(self.out, "{json}")
            .and_then(|()| self.out.flush())
            .map_err(|e| LearnError::io(context(), e))
    }

    /// Flushes and syncs the file, so it is complete before the folder is published.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.out
            .flush()
            .and_then(|()| self.out.get_ref().sync_all())
            .map_err(|e| LearnError::io(format!("cannot sync {}", self.path.display()), e))?;
        Ok(self.path)
    }
}

/// The step line of `step` in a round whose batch is `batch`.
pub fn step_line<'a>(round: u64, step: &'a StepMetrics, batch: &BatchStats) -> MetricsLine<'a> {
    MetricsLine::Step {
        round,
        step,
        reward_mean: batch.reward_mean,
        reward_std: batch.reward_std,
        zero_std_frac: batch.zero_std_frac,
        response_len_mean: batch.response_len_mean,
        tool_calls_mean: batch.tool_calls_mean,
    }
}
