//! What a training round does: where its groups come from, how many, the LoRA and trainer
//! hyper-parameters, the thread budget, and how the merged model is written.

use std::path::PathBuf;

use searchloop_core::Device;
use searchloop_llama::{LoraConfig, MergeEncoding};
use searchloop_train_sapo::TrainerConfig;
use serde::{Deserialize, Serialize};

use crate::error::{LearnError, Result};

/// Where a round's GRPO groups come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSource {
    /// Fresh groups: `group_size` episodes per train-split prompt, sampled through the serving
    /// agent and rewarded by exact match, F1 and format.
    Replay,
    /// Logged episodes that carry host feedback, grouped by prompt where a prompt repeats, and
    /// otherwise against the running mean feedback reward of their task kind (the in-batch
    /// mean of the kind until a round has recorded one).
    Feedback,
    /// Both of the above in one batch.
    #[default]
    Both,
}

impl GroupSource {
    /// Whether replay groups are sampled.
    pub fn replay(self) -> bool {
        matches!(self, Self::Replay | Self::Both)
    }

    /// Whether logged feedback is used.
    pub fn feedback(self) -> bool {
        matches!(self, Self::Feedback | Self::Both)
    }
}

/// How the merged model's adapted projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergedWeights {
    /// Dense f32: exactly base + scale·B·A. Serving dequantizes to f32 by default anyway.
    #[default]
    F32,
    /// Re-quantized to Q8_0: about a quarter of the size, near-exact.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Re-quantized to each tensor's encoding in the base file.
    SameAsBase,
}

impl MergedWeights {
    /// The trainer's encoding.
    pub fn encoding(self) -> MergeEncoding {
        match self {
            Self::F32 => MergeEncoding::F32,
            Self::Q8_0 => MergeEncoding::Q8_0,
            Self::SameAsBase => MergeEncoding::SameAsBase,
        }
    }
}

/// Everything one training round needs besides its context (see [`crate::RoundContext`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundConfig {
    /// Optimizer, PPO epochs, mini-batches, the GRPO + SAPO loss and advantages.
    pub trainer: TrainerConfig,
    /// The adapter trained when the round starts from the base model (a round that starts
    /// from a promoted adapter continues that adapter, with its rank and targets).
    pub lora: LoraConfig,
    /// Episodes sampled per replay prompt (G).
    pub group_size: usize,
    /// Replay prompts per round.
    pub prompts_per_round: usize,
    /// Where groups come from.
    pub source: GroupSource,
    /// CPU threads the trainer may use; 0 means all cores but one (at least one), so serving
    /// keeps a core while a round trains.
    pub threads: usize,
    /// Replay prompts: a JSONL file of questions (`question`, `answers`, and optionally `id`,
    /// `kind`, `split`), like the retail data set's `questions.jsonl`; lines whose `split` is
    /// `heldout` are never used. Absent: the train-split questions of logged episodes.
    pub prompts: Option<PathBuf>,
    /// Sampling temperature of replay episodes; absent uses the serving agent's own, so the
    /// round trains the distribution that is served. The trainer always scores each episode
    /// at the temperature recorded with it.
    pub rollout_temperature: Option<f32>,
    /// Dynamic sampling (DAPO): a replay group whose episodes all earn the same reward carries
    /// no advantage, so more prompts are drawn until `prompts_per_round` groups have spread,
    /// or `max_prompt_draws` prompts were tried.
    pub dynamic_sampling: bool,
    /// Most replay prompts one round tries with dynamic sampling (0: three times
    /// `prompts_per_round`).
    pub max_prompt_draws: usize,
    /// Seed of prompt choice and replay sampling.
    pub seed: u64,
    /// Episodes longer than this many tokens are left out (their activations would not fit).
    pub max_sequence_tokens: usize,
    /// Most logged feedback episodes per round; the newest are kept.
    pub max_feedback_episodes: usize,
    /// How the merged model is written.
    pub merged_weights: MergedWeights,
    /// The device the trainer runs on; absent: the serving model's (`[model] device`), or the
    /// CPU where there is none. A GPU needs the `cuda` feature.
    pub device: Option<Device>,
    /// The Hugging Face id written into the PEFT `adapter_config.json` as the base model.
    pub base_model_name: String,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            trainer: TrainerConfig {
                // LoRA needs a larger step than full fine-tuning; 5e-5 moves a rank-8 adapter
                // on a 135M model visibly within a round without collapsing it.
                learning_rate: 5e-5,
                // A micro-batch packs at most as many tokens as the longest sequence a round
                // keeps (`max_sequence_tokens`), so its memory bound is one such sequence's,
                // while shared prompts are computed once for as many sequences as fit.
                micro_batch_tokens: 2048,
                ..TrainerConfig::default()
            },
            lora: LoraConfig::default(),
            group_size: 8,
            prompts_per_round: 4,
            source: GroupSource::Both,
            threads: 0,
            prompts: None,
            rollout_temperature: None,
            dynamic_sampling: false,
            max_prompt_draws: 0,
            seed: 0,
            max_sequence_tokens: 2048,
            max_feedback_episodes: 256,
            merged_weights: MergedWeights::F32,
            device: None,
            base_model_name: "HuggingFaceTB/SmolLM2-135M-Instruct".to_string(),
        }
    }
}

impl RoundConfig {
    /// Checks every value, so a bad config fails before any model work.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(LearnError::Config(msg));
        if self.group_size < 2 {
            return bad(format!(
                "group_size must be at least 2 (a group of one has no advantage), got {}",
                self.group_size
            ));
        }
        if self.prompts_per_round == 0 {
            return bad("prompts_per_round must be at least 1".into());
        }
        if let Some(t) = self.rollout_temperature
            && !(t.is_finite() && t > 0.0)
        {
            return bad(format!(
                "rollout_temperature must be a positive number (a greedy episode has no \
                 distribution to train), got {t}"
            ));
        }
        if self.max_sequence_tokens < 2 {
            return bad("max_sequence_tokens must be at least 2".into());
        }
        if self.max_feedback_episodes == 0 && self.source == GroupSource::Feedback {
            return bad("max_feedback_episodes is 0 but the source is feedback only".into());
        }
        if self.base_model_name.trim().is_empty() {
            return bad("base_model_name must not be empty".into());
        }
        validate_trainer(&self.trainer)?;
        validate_lora(&self.lora)
    }

    /// Most replay prompts a round tries (`prompts_per_round` without dynamic sampling).
    pub fn prompt_draws(&self) -> usize {
        match (self.dynamic_sampling, self.max_prompt_draws) {
            (false, _) => self.prompts_per_round,
            (true, 0) => 3 * self.prompts_per_round,
            (true, n) => n.max(self.prompts_per_round),
        }
    }

    /// The thread budget after resolving 0.
    pub fn thread_budget(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }
}

fn validate_trainer(t: &TrainerConfig) -> Result<()> {
    let bad = |msg: String| Err(LearnError::Config(format!("trainer.{msg}")));
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
        return bad(format!(
            "learning_rate must be positive, got {}",
            t.learning_rate
        ));
    }
    if t.ppo_epochs == 0 || t.mini_batch_size == 0 || t.micro_batch_size == 0 {
        return bad("ppo_epochs, mini_batch_size and micro_batch_size must be at least 1".into());
    }
    if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
        return bad(format!(
            "max_grad_norm must be >= 0, got {}",
            t.max_grad_norm
        ));
    }
    for (name, value) in [
        ("weight_decay", t.weight_decay),
        ("loss.sapo_weight", t.loss.sapo_weight),
        ("loss.kl_beta", t.loss.kl_beta),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return bad(format!("{name} must be a finite number >= 0, got {value}"));
        }
    }
    for (name, value) in [("beta1", t.beta1), ("beta2", t.beta2)] {
        if !(0.0..1.0).contains(&value) {
            return bad(format!("{name} must be in [0, 1), got {value}"));
        }
    }
    if !(t.loss.clip_eps > 0.0 && t.loss.clip_eps < 1.0) {
        return bad(format!(
            "loss.clip_eps must be in (0, 1), got {}",
            t.loss.clip_eps
        ));
    }
    if !(t.loss.sapo_threshold.is_finite() && t.loss.sapo_threshold > 0.0) {
        return bad(format!(
            "loss.sapo_threshold must be positive, got {}",
            t.loss.sapo_threshold
        ));
    }
    if !(t.adam_eps > 0.0 && t.advantages.std_eps >= 0.0) {
        return bad("adam_eps must be positive and advantages.std_eps >= 0".into());
    }
    Ok(())
}

fn validate_lora(l: &LoraConfig) -> Result<()> {
    let bad = |msg: String| Err(LearnError::Config(format!("lora.{msg}")));
    if l.rank == 0 {
        return bad("rank must be at least 1".into());
    }
    if !(l.alpha.is_finite() && l.alpha > 0.0) {
        return bad(format!("alpha must be positive, got {}", l.alpha));
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return bad(format!("dropout must be in [0, 1), got {}", l.dropout));
    }
    if l.targets.is_empty() {
        return bad("targets must name at least one projection".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_toml_overrides_single_fields() {
        RoundConfig::default().validate().unwrap();
        let config: RoundConfig = toml_like(
            r#"{"group_size": 4, "source": "replay", "trainer": {"learning_rate": 1e-4,
                "loss": {"sapo_weight": 0.0}}, "lora": {"rank": 4}, "merged_weights": "q8_0"}"#,
        );
        config.validate().unwrap();
        assert_eq!(config.group_size, 4);
        assert_eq!(config.source, GroupSource::Replay);
        assert_eq!(config.trainer.learning_rate, 1e-4);
        assert_eq!(config.trainer.loss.sapo_weight, 0.0);
        assert_eq!(config.trainer.loss.clip_eps, 0.2);
        assert_eq!(config.lora.rank, 4);
        assert_eq!(config.merged_weights, MergedWeights::Q8_0);
        assert!(config.thread_budget() >= 1);
    }

    #[test]
    fn bad_values_and_unknown_fields_are_refused() {
        for bad in [
            RoundConfig {
                group_size: 1,
                ..RoundConfig::default()
            },
            RoundConfig {
                prompts_per_round: 0,
                ..RoundConfig::default()
            },
            RoundConfig {
                rollout_temperature: Some(0.0),
                ..RoundConfig::default()
            },
            RoundConfig {
                trainer: TrainerConfig {
                    learning_rate: f64::NAN,
                    ..TrainerConfig::default()
                },
                ..RoundConfig::default()
            },
            RoundConfig {
                lora: LoraConfig {
                    targets: vec![],
                    ..LoraConfig::default()
                },
                ..RoundConfig::default()
            },
        ] {
            let err = bad.validate().unwrap_err();
            assert!(matches!(err, LearnError::Config(_)), "{err}");
        }
        assert!(serde_json::from_str::<RoundConfig>(r#"{"group_sise": 4}"#).is_err());
        assert!(serde_json::from_str::<RoundConfig>(r#"{"trainer": {"lr": 1}}"#).is_err());
    }

    fn toml_like(json: &str) -> RoundConfig {
        serde_json::from_str(json).unwrap()
    }
}
