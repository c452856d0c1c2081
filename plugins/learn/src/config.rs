//! What a training round does: where its groups come from, how many, the LoRA and trainer
//! hyper-parameters, the thread budget, and how the merged model is written.

use std::path::PathBuf;

use searchloop_core::Device;
use searchloop_llama::{LoraConfig, MergeEncoding};
use searchloop_train_sapo::{LossKind, TrainError, TrainerConfig};
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
    /// Optimizer, PPO epochs, mini-batches, the policy loss and advantages.
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
    /// A curriculum by question kind: replay prompts are drawn only from questions of these
    /// kinds (empty: every kind). A kind the model cannot yet answer at all gives groups
    /// without spread, which carry no advantage.
    pub prompt_kinds: Vec<String>,
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
    /// Demonstrations: when a replay prompt's question carries a worked solution
    /// ([`crate::Question::solution`]) and no episode of its group earned the reward a teacher
    /// playing that solution earns, the teacher's episode joins the group (trained as a
    /// [`searchloop_train_sapo::TrainSequence::demonstration`]). It is kept only when a tool's
    /// observation holds the gold answer, so it shows an answer read from the tools.
    pub demonstrations: bool,
    /// A warm start from demonstrations: a round that starts from the base model (no promoted
    /// adapter yet) trains on this many teacher episodes playing worked solutions of
    /// train-split prompts (of `prompt_kinds`), instead of sampling replay groups; 0 turns it
    /// off. Each trains with its reward as its advantage (a baseline of 0), under CISPO,
    /// whatever the round's loss: a clipped loss stops pushing a token once its ratio passes
    /// `1 + clip_eps`, which would cap how far one round can imitate, while CISPO's clipped
    /// weight never drops a token's gradient. Later rounds (from a promoted adapter) sample
    /// as configured.
    pub warm_start: usize,
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
            prompt_kinds: Vec::new(),
            rollout_temperature: None,
            dynamic_sampling: false,
            max_prompt_draws: 0,
            demonstrations: false,
            warm_start: 0,
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

    /// The config of a warm-start round (see [`RoundConfig::warm_start`]): this one, trained
    /// under CISPO.
    pub fn for_warm_start(&self) -> RoundConfig {
        let mut config = self.clone();
        config.trainer.loss.kind = LossKind::Cispo;
        config
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

/// The trainer's own checks ([`TrainerConfig::validate`]), with fields named from the round.
fn validate_trainer(t: &TrainerConfig) -> Result<()> {
    t.validate().map_err(|e| match e {
        TrainError::Config(msg) => LearnError::Config(format!("trainer.{msg}")),
        other => other.into(),
    })
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
    use searchloop_train_sapo::{IsCorrection, LossKind};

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

    #[test]
    fn loss_settings_parse_and_their_refusals_name_the_field() {
        let config: RoundConfig = toml_like(
            r#"{"trainer": {"old_logprobs": "recompute", "loss": {"kind": "gspo",
                "is_correction": "geo", "is_min": 0.99}}}"#,
        );
        config.validate().unwrap();
        let loss = &config.trainer.loss;
        assert_eq!(
            (loss.kind, loss.is_correction),
            (LossKind::Gspo, IsCorrection::Geo)
        );
        assert_eq!(loss.is_band(), Some((0.99, 1.001)));
        for (json, field) in [
            (
                r#"{"trainer": {"loss": {"is_correction": "tis"}}}"#,
                "trainer.loss.is_correction",
            ),
            (
                r#"{"trainer": {"loss": {"clip_eps": 1.5}}}"#,
                "trainer.loss.clip_eps",
            ),
            (
                r#"{"trainer": {"old_logprobs": "recompute", "loss": {"kind": "gspo",
                    "is_correction": "icepop"}}}"#,
                "trainer.loss.kind",
            ),
        ] {
            let err = toml_like(json).validate().unwrap_err();
            assert!(matches!(err, LearnError::Config(_)), "{err}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    fn toml_like(json: &str) -> RoundConfig {
        serde_json::from_str(json).unwrap()
    }
}
