//! The training loop: advantages, PPO epochs over shuffled mini-batches, gradient
//! accumulation over micro-batches, gradient-norm clipping, linear warm-up, AdamW on the LoRA
//! variables only.
//!
//! Determinism: shuffling and dropout draw from seeded ChaCha streams, and candle's CPU kernels
//! are deterministic, so the same inputs and seed give bit-identical adapters on the CPU.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::correction::IsCorrection;
use crate::error::{Result, TrainError};
use crate::loss::{
    AdvantageConfig, LossConfig, LossMetrics, LossNormalizer, PolicyLossInputs, group_advantages,
    policy_loss,
};
use searchloop_llama::LoraAdapter;
use searchloop_llama::pack::{PackedSequences, common_prefix};
use searchloop_llama::{Llama, TokenStats};

/// One logged episode, flattened to what the trainer needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSequence {
    /// The full token sequence: prompt, model turns, tool observations.
    pub tokens: Vec<u32>,
    /// `true` for model-generated tokens, which are trained; same length as `tokens`. The first
    /// token has no context to be predicted from and is never trained, whatever its flag.
    pub loss_mask: Vec<bool>,
    /// Natural-log probability the behaviour policy gave each token; same length as `tokens`,
    /// meaningful where `loss_mask` is true.
    pub behaviour_logprobs: Vec<f32>,
    /// The episode's scalar reward.
    pub reward: f64,
    /// Sequences sampled from the same prompt share a group id; advantages are relative to it.
    pub group_id: String,
    /// A reward baseline for an episode without a group (a logged one with host feedback, whose
    /// prompt never repeated): its advantage is `reward - baseline` and `group_id` is ignored.
    #[serde(default)]
    pub baseline: Option<f64>,
    /// The adapter version that sampled it (`None`: the base model). With
    /// [`OldLogprobSource::Recompute`], `logp_old` is recomputed under that version's adapter
    /// when the trainer holds it ([`Trainer::add_behaviour_adapter`]), else under its own.
    #[serde(default)]
    pub adapter_version: Option<u64>,
    /// The temperature the behaviour policy sampled at: the trainer scores tokens under
    /// `softmax(logits / temperature)`, the distribution `behaviour_logprobs` come from.
    #[serde(default = "unit_temperature")]
    pub temperature: f64,
    /// A worked demonstration rather than a sample: its tokens were written, not drawn, so
    /// `behaviour_logprobs` mean nothing and `logp_old` is always recomputed under the
    /// trainer's starting adapter. Its ratio then starts at 1, and the clipped objective moves
    /// the policy toward it as far as the loss lets it move toward any sample of the batch.
    #[serde(default)]
    pub demonstration: bool,
}

fn unit_temperature() -> f64 {
    1.0
}

/// Where `logp_old`, the behaviour policy's log-probs, comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OldLogprobSource {
    /// The sampler's recorded log-probs.
    #[default]
    Behaviour,
    /// Recomputed by the trainer before the first update, under the adapter version that
    /// sampled each sequence when the trainer was given it ([`Trainer::add_behaviour_adapter`])
    /// and under the trainer's starting adapter otherwise: the sampler's distribution with the
    /// trainer's numerics. The recorded log-probs are kept beside them for a sampler correction
    /// ([`LossConfig::is_correction`]), which only this source allows.
    Recompute,
}

/// Hyper-parameters of a training call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Config files name only the fields they change, and a misspelt field is an error.
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Steps of linear warm-up from `learning_rate / warmup_steps` to `learning_rate`.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// AdamW denominator epsilon.
    pub adam_eps: f64,
    /// Passes over the batch.
    pub ppo_epochs: usize,
    /// Sequences per optimizer step.
    pub mini_batch_size: usize,
    /// Sequences per forward/backward (gradients accumulate over a mini-batch).
    pub micro_batch_size: usize,
    /// When non-zero, micro-batches are cut by packed length instead of
    /// `micro_batch_size`: the mini-batch's sequences, ordered so that those sharing prefixes
    /// sit together, fill a micro-batch until its packed row would pass this many tokens (a
    /// longer sequence goes alone). Memory follows the packed length, so this bounds it while
    /// letting shared prompts be computed once for as many sequences as fit.
    pub micro_batch_tokens: usize,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f64,
    /// The policy loss.
    pub loss: LossConfig,
    /// How advantages are computed.
    pub advantages: AdvantageConfig,
    /// Where `logp_old` comes from.
    pub old_logprobs: OldLogprobSource,
    /// Seed for shuffling.
    pub seed: u64,
}

impl TrainerConfig {
    /// Checks every value, and that the loss's sampler correction has both log-probs it
    /// compares, so that a bad config fails before any model work. Messages name fields as
    /// written under the trainer's table (`loss.clip_eps`).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(TrainError::Config(msg));
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if self.ppo_epochs == 0 || self.mini_batch_size == 0 || self.micro_batch_size == 0 {
            return bad(
                "ppo_epochs, mini_batch_size and micro_batch_size must be at least 1".into(),
            );
        }
        for (name, value) in [
            ("max_grad_norm", self.max_grad_norm),
            ("weight_decay", self.weight_decay),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(format!("{name} must be a finite number >= 0, got {value}"));
            }
        }
        for (name, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return bad(format!("{name} must be in [0, 1), got {value}"));
            }
        }
        if !(self.adam_eps > 0.0 && self.advantages.std_eps >= 0.0) {
            return bad("adam_eps must be positive and advantages.std_eps >= 0".into());
        }
        self.loss.validate().map_err(|e| match e {
            TrainError::Config(msg) => TrainError::Config(format!("loss.{msg}")),
            other => other,
        })?;
        let correction = self.loss.is_correction;
        if correction != IsCorrection::None && self.old_logprobs != OldLogprobSource::Recompute {
            return bad(format!(
                "loss.is_correction = \"{}\" weighs tokens by exp(logp_old - logp_sampler), the \
                 trainer's recomputed behaviour log-prob against the sampler's recorded one; with \
                 old_logprobs = \"behaviour\" the two are the same numbers, so set old_logprobs \
                 = \"recompute\" or is_correction = \"none\"",
                correction.name()
            ));
        }
        Ok(())
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-5,
            warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            ppo_epochs: 1,
            mini_batch_size: 8,
            micro_batch_size: 2,
            micro_batch_tokens: 0,
            max_grad_norm: 1.0,
            loss: LossConfig::default(),
            advantages: AdvantageConfig::default(),
            old_logprobs: OldLogprobSource::Behaviour,
            seed: 0,
        }
    }
}

/// Metrics of one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Global optimizer step (1-based, counted over the trainer's life).
    pub step: usize,
    /// PPO epoch within this call.
    pub epoch: usize,
    /// Learning rate used for this step.
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Sequences in the mini-batch.
    pub sequences: usize,
    /// Loss metrics merged over the mini-batch's micro-batches.
    pub loss: LossMetrics,
}

/// What one [`Trainer::train`] call did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// One entry per optimizer step.
    pub steps: Vec<StepMetrics>,
    /// Sequences given.
    pub sequences: usize,
    /// Sequences trained on (zero-std groups may be skipped).
    pub trained_sequences: usize,
    /// Distinct groups.
    pub groups: usize,
    /// Groups whose rewards were all equal.
    pub zero_std_groups: usize,
    /// Mean reward over all given sequences.
    pub reward_mean: f64,
    /// Population standard deviation of the rewards.
    pub reward_std: f64,
    /// Mean number of trained tokens per given sequence.
    pub response_len_mean: f64,
    /// Mean |behaviour − trainer| log-prob over trained tokens: the sampler/trainer numerics
    /// gap. With [`OldLogprobSource::Recompute`] it covers every trained sequence; with
    /// [`OldLogprobSource::Behaviour`] it is measured for free on the first mini-batch, whose
    /// forward pass runs before any update. `None` when nothing was trained.
    pub logprob_gap: Option<f64>,
    /// Largest |behaviour − trainer| log-prob over the same tokens as `logprob_gap`.
    pub logprob_gap_max: Option<f64>,
}

/// A trainer holding the frozen base model, the LoRA adapter and AdamW's state.
pub struct Trainer {
    model: Llama,
    adapter: LoraAdapter,
    /// Adapters of the versions that sampled the batch, by version (`None`: the base model),
    /// for recomputing `logp_old`; a `None` adapter scores with the base model alone.
    behaviour_adapters: HashMap<Option<u64>, Option<LoraAdapter>>,
    optimizer: AdamW,
    config: TrainerConfig,
    step: usize,
    rng: ChaCha8Rng,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

/// A sequence ready for batching: shifted to next-token positions.
struct Prepared {
    tokens: Vec<u32>,
    /// Length `tokens.len() - 1`: whether position `j` (predicting token `j + 1`) is trained.
    mask: Vec<bool>,
    old: Vec<f32>,
    /// The sampler's recorded log-probs, kept when `old` is recomputed for a sampler
    /// correction.
    sampler: Option<Vec<f32>>,
    reference: Option<Vec<f32>>,
    advantage: f64,
    temperature: f64,
    adapter_version: Option<u64>,
    demonstration: bool,
}

impl Trainer {
    /// Creates a trainer once its config validates ([`TrainerConfig::validate`]); the
    /// optimizer covers exactly the adapter's variables.
    pub fn new(model: Llama, adapter: LoraAdapter, config: TrainerConfig) -> Result<Self> {
        config.validate()?;
        if adapter.model_config() != model.config() {
            return Err(TrainError::Adapter(
                "the adapter was built for a different model configuration".to_string(),
            ));
        }
        let params = ParamsAdamW {
            lr: config.learning_rate,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.adam_eps,
            weight_decay: config.weight_decay,
        };
        let optimizer = AdamW::new(adapter.vars(), params)?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Self {
            model,
            adapter,
            behaviour_adapters: HashMap::new(),
            optimizer,
            config,
            step: 0,
            rng,
        })
    }

    /// Gives the trainer the adapter that adapter `version` served with (`None` for the base
    /// model, scored without an adapter), so that [`OldLogprobSource::Recompute`] scores the
    /// sequences that version sampled under it rather than under the adapter being trained.
    pub fn add_behaviour_adapter(
        &mut self,
        version: Option<u64>,
        mut adapter: Option<LoraAdapter>,
    ) -> Result<()> {
        if let Some(a) = &mut adapter {
            if a.model_config() != self.model.config() {
                return Err(TrainError::Adapter(format!(
                    "the adapter of version {version:?} was built for a different model \
                     configuration"
                )));
            }
            // Scoring only: no dropout.
            a.set_training(false);
        }
        self.behaviour_adapters.insert(version, adapter);
        Ok(())
    }

    /// The frozen base model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The adapter being trained.
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Gives back the model and the trained adapter.
    pub fn into_parts(self) -> (Llama, LoraAdapter) {
        (self.model, self.adapter)
    }

    /// Trains on one batch of rewarded sequences: `ppo_epochs` passes of shuffled mini-batches,
    /// one optimizer step each.
    pub fn train(&mut self, batch: &[TrainSequence]) -> Result<TrainReport> {
        self.train_with(batch, &mut |_| true)
    }

    /// The optimizer steps [`Trainer::train`] will take on `batch`, for progress reporting.
    /// Sequences of zero-std groups count as trained here; with skipping on, fewer steps may
    /// run.
    pub fn planned_steps(&self, batch: &[TrainSequence]) -> usize {
        self.config.ppo_epochs * batch.len().div_ceil(self.config.mini_batch_size)
    }

    /// [`Trainer::train`], calling `observer` after every optimizer step. When the observer
    /// returns `false` training stops with [`TrainError::Cancelled`]; the adapter then holds
    /// the updates made so far and should be discarded.
    pub fn train_with(
        &mut self,
        batch: &[TrainSequence],
        observer: &mut dyn FnMut(&StepMetrics) -> bool,
    ) -> Result<TrainReport> {
        let vocab = self.model.config().vocab_size;
        for (i, s) in batch.iter().enumerate() {
            validate(i, s, vocab)?;
        }
        let rewards: Vec<f64> = batch.iter().map(|s| s.reward).collect();
        let groups: Vec<&str> = batch.iter().map(|s| s.group_id.as_str()).collect();
        let baselines: Vec<Option<f64>> = batch.iter().map(|s| s.baseline).collect();
        let adv = group_advantages(&rewards, &groups, &baselines, &self.config.advantages)?;
        let n = batch.len().max(1) as f64;
        let reward_mean = rewards.iter().sum::<f64>() / n;
        let reward_std = (rewards
            .iter()
            .map(|r| (r - reward_mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let response_len_mean = batch
            .iter()
            .map(|s| s.loss_mask.iter().skip(1).filter(|&&m| m).count() as f64)
            .sum::<f64>()
            / n;

        let mut prepared: Vec<Prepared> = batch
            .iter()
            .zip(adv.values.iter().zip(&adv.keep))
            .filter(|(_, (_, keep))| **keep)
            .map(|(s, (&a, _))| Prepared {
                tokens: s.tokens.clone(),
                mask: s.loss_mask[1..].to_vec(),
                old: s.behaviour_logprobs[1..].to_vec(),
                sampler: None,
                reference: None,
                advantage: a,
                temperature: s.temperature,
                adapter_version: s.adapter_version,
                demonstration: s.demonstration,
            })
            .collect();

        let mut gap = GapStats::default();
        let recompute = self.config.old_logprobs == OldLogprobSource::Recompute;
        let keep_sampler = self.config.loss.is_correction != IsCorrection::None;
        // Demonstrations are always rescored: their recorded log-probs are not a sampler's.
        let rescored: Vec<usize> = (0..prepared.len())
            .filter(|&i| recompute || prepared[i].demonstration)
            .collect();
        if !rescored.is_empty() {
            self.adapter.set_training(false);
            // Micro-batches of one behaviour adapter each: `Some(version)` for a version the
            // trainer holds, `None` for the trainer's own adapter (always a demonstration's).
            let mut by_behaviour: BTreeMap<Option<Option<u64>>, Vec<usize>> = BTreeMap::new();
            for i in rescored {
                let p = &prepared[i];
                let version = p.adapter_version;
                let key = (!p.demonstration && self.behaviour_adapters.contains_key(&version))
                    .then_some(version);
                by_behaviour.entry(key).or_default().push(i);
            }
            for (key, members) in by_behaviour {
                let adapter = match key.and_then(|v| self.behaviour_adapters.get(&v)) {
                    Some(behaviour) => behaviour.as_ref(),
                    None => Some(&self.adapter),
                };
                for chunk in self.micro_batches(&prepared, &members) {
                    let lps = self.logprobs_no_grad(&prepared, &chunk, adapter)?;
                    for (&i, lp) in chunk.iter().zip(lps) {
                        let p = &mut prepared[i];
                        if p.demonstration {
                            // No sampler drew it, so a sampler correction sees a ratio of 1.
                            if keep_sampler {
                                p.sampler = Some(lp.clone());
                            }
                            p.old = lp;
                            continue;
                        }
                        gap.add(&p.mask, &p.old, &lp);
                        let recorded = std::mem::replace(&mut p.old, lp);
                        if keep_sampler {
                            p.sampler = Some(recorded);
                        }
                    }
                }
            }
        }
        if self.config.loss.kl_beta != 0.0 && !prepared.is_empty() {
            let all: Vec<usize> = (0..prepared.len()).collect();
            for chunk in self.micro_batches(&prepared, &all) {
                let lps = self.logprobs_no_grad(&prepared, &chunk, None)?;
                for (&i, lp) in chunk.iter().zip(lps) {
                    prepared[i].reference = Some(lp);
                }
            }
        }

        let mut steps = Vec::new();
        self.adapter.set_training(true);
        let result = (|| -> Result<()> {
            for epoch in 0..self.config.ppo_epochs {
                let mut order: Vec<usize> = (0..prepared.len()).collect();
                order.shuffle(&mut self.rng);
                for mini in order.chunks(self.config.mini_batch_size) {
                    // Before the first update the trainer's log-probs are those of the policy
                    // that (ideally) sampled the batch, so this forward pass measures the gap.
                    let measure = (!recompute && steps.is_empty()).then_some(&mut gap);
                    if let Some(m) = self.optimizer_step(&prepared, mini, epoch, measure)? {
                        let go_on = observer(&m);
                        steps.push(m);
                        if !go_on {
                            return Err(TrainError::Cancelled);
                        }
                    }
                }
            }
            Ok(())
        })();
        self.adapter.set_training(false);
        result?;

        Ok(TrainReport {
            steps,
            sequences: batch.len(),
            trained_sequences: prepared.len(),
            groups: adv.groups,
            zero_std_groups: adv.zero_std_groups,
            reward_mean,
            reward_std,
            response_len_mean,
            logprob_gap: gap.mean(),
            logprob_gap_max: gap.max(),
        })
    }

    /// One mini-batch: accumulate gradients over micro-batches, clip, step.
    fn optimizer_step(
        &mut self,
        data: &[Prepared],
        mini: &[usize],
        epoch: usize,
        mut gap: Option<&mut GapStats>,
    ) -> Result<Option<StepMetrics>> {
        let masks: Vec<&[bool]> = mini.iter().map(|&i| data[i].mask.as_slice()).collect();
        let advs: Vec<f64> = mini.iter().map(|&i| data[i].advantage).collect();
        let normalizer = LossNormalizer::from_host(&masks, &advs)?;
        if normalizer.tokens == 0.0 {
            return Ok(None);
        }
        let vars = self.adapter.vars();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut last_store: Option<GradStore> = None;
        let mut metrics: Option<LossMetrics> = None;
        for micro in self.micro_batches(data, mini) {
            let micro = micro.as_slice();
            let batch = self.collate(data, micro)?;
            let stats = self.score(data, micro, &batch, Some(&self.adapter))?;
            let logp = stats.logprobs;
            if let Some(gap) = gap.as_deref_mut() {
                let rows = logp.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for (&i, row) in micro.iter().zip(rows) {
                    if !data[i].demonstration {
                        gap.add(&data[i].mask, &data[i].old, &row);
                    }
                }
            }
            let sampler = match &batch.sampler {
                Some(t) => Some(t.to_dtype(logp.dtype())?),
                None => None,
            };
            let inputs = PolicyLossInputs {
                logp: &logp,
                logp_old: &batch.old.to_dtype(logp.dtype())?,
                logp_sampler: sampler.as_ref(),
                mask: &batch.mask.to_dtype(logp.dtype())?,
                advantages: &batch.advantages.to_dtype(logp.dtype())?,
                ref_logp: batch.reference.as_ref(),
                entropy: Some(&stats.entropy),
                normalizer: Some(normalizer),
            };
            let (loss, m) = policy_loss(&inputs, &self.config.loss)?;
            let grads = loss.backward()?;
            for (slot, var) in acc.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
            // Only the newest store is kept: AdamW needs a GradStore to read from, and holding
            // older ones would keep every micro-batch's activation gradients alive.
            last_store = Some(grads);
            match metrics.as_mut() {
                Some(total) => total.merge(&m),
                None => metrics = Some(m),
            }
        }
        let (Some(mut store), Some(metrics)) = (last_store, metrics) else {
            return Ok(None);
        };
        let mut sq = 0.0;
        for g in acc.iter().flatten() {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        let clip = self.config.max_grad_norm;
        let factor = if clip > 0.0 && grad_norm > clip {
            clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        for (slot, var) in acc.into_iter().zip(&vars) {
            if let Some(g) = slot {
                let g = if factor == 1.0 { g } else { (g * factor)? };
                store.insert(var.as_tensor(), g);
            }
        }
        self.step += 1;
        let lr = if self.config.warmup_steps > 0 {
            self.config.learning_rate
                * (self.step as f64 / self.config.warmup_steps as f64).min(1.0)
        } else {
            self.config.learning_rate
        };
        self.optimizer.set_learning_rate(lr);
        self.optimizer.step(&store)?;
        Ok(Some(StepMetrics {
            step: self.step,
            epoch,
            learning_rate: lr,
            grad_norm,
            sequences: mini.len(),
            loss: metrics,
        }))
    }

    /// Detached next-token log-probs, with (`with_adapter`) or without the adapter.
    fn logprobs_no_grad(
        &self,
        data: &[Prepared],
        idx: &[usize],
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<Vec<f32>>> {
        let batch = self.collate(data, idx)?;
        let stats = self.score(data, idx, &batch, adapter)?;
        let rows = stats
            .logprobs
            .detach()
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(idx
            .iter()
            .zip(rows)
            .map(|(&i, mut row)| {
                row.truncate(data[i].mask.len());
                row
            })
            .collect())
    }

    /// Splits `idx` into micro-batches: by count, or by packed length with
    /// [`TrainerConfig::micro_batch_tokens`].
    fn micro_batches(&self, data: &[Prepared], idx: &[usize]) -> Vec<Vec<usize>> {
        let budget = self.config.micro_batch_tokens;
        if budget == 0 {
            return idx
                .chunks(self.config.micro_batch_size)
                .map(<[usize]>::to_vec)
                .collect();
        }
        // In lexicographic order a sequence shares its longest prefix with the one before it,
        // which is what packing it adds to.
        let mut order = idx.to_vec();
        order.sort_by(|&a, &b| data[a].tokens.cmp(&data[b].tokens));
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut packed = 0;
        let mut previous: Option<&[u32]> = None;
        for i in order {
            let tokens = data[i].tokens.as_slice();
            let shared = previous.map_or(0, |p| common_prefix(p, tokens));
            let added = tokens.len() - shared;
            match batches.last_mut() {
                Some(batch) if packed + added <= budget => {
                    batch.push(i);
                    packed += added;
                }
                _ => {
                    batches.push(vec![i]);
                    packed = tokens.len();
                }
            }
            previous = Some(tokens);
        }
        batches
    }

    /// Log-probs of a collated micro-batch at its trained positions (zero elsewhere), its
    /// sequences packed along their shared prefixes.
    fn score(
        &self,
        data: &[Prepared],
        idx: &[usize],
        batch: &Collated,
        adapter: Option<&LoraAdapter>,
    ) -> Result<TokenStats> {
        let scored: Vec<&[bool]> = idx.iter().map(|&i| data[i].mask.as_slice()).collect();
        Ok(self
            .model
            .packed_token_logprobs(&batch.pack, &scored, adapter, &batch.temperatures)?)
    }

    /// Packs a micro-batch's sequences and right-pads its per-token values into tensors.
    fn collate(&self, data: &[Prepared], idx: &[usize]) -> Result<Collated> {
        let device: &Device = self.model.device();
        let t = idx.iter().map(|&i| data[i].tokens.len()).max().unwrap_or(2);
        let b = idx.len();
        let sequences: Vec<&[u32]> = idx.iter().map(|&i| data[i].tokens.as_slice()).collect();
        let pack = PackedSequences::new(&sequences)?;
        let mut mask = vec![0f32; b * (t - 1)];
        let mut old = vec![0f32; b * (t - 1)];
        let mut sampler = vec![0f32; b * (t - 1)];
        let mut has_sampler = true;
        let mut reference = vec![0f32; b * (t - 1)];
        let mut has_reference = true;
        let mut advantages = Vec::with_capacity(b);
        let mut temperatures = Vec::with_capacity(b);
        for (row, &i) in idx.iter().enumerate() {
            let p = &data[i];
            for j in 0..p.mask.len() {
                let k = row * (t - 1) + j;
                mask[k] = if p.mask[j] { 1.0 } else { 0.0 };
                // Untrained positions may carry junk (NaN, -inf) from the logger; they are
                // masked anyway, and zeroing them keeps every product in the loss finite.
                old[k] = if p.mask[j] { p.old[j] } else { 0.0 };
            }
            match &p.sampler {
                Some(recorded) => {
                    for (j, (&m, &v)) in p.mask.iter().zip(recorded).enumerate() {
                        sampler[row * (t - 1) + j] = if m { v } else { 0.0 };
                    }
                }
                None => has_sampler = false,
            }
            match &p.reference {
                Some(r) => {
                    for (j, &v) in r.iter().enumerate() {
                        reference[row * (t - 1) + j] = v;
                    }
                }
                None => has_reference = false,
            }
            advantages.push(p.advantage);
            temperatures.push(p.temperature);
        }
        Ok(Collated {
            pack,
            mask: Tensor::from_vec(mask, (b, t - 1), device)?,
            old: Tensor::from_vec(old, (b, t - 1), device)?,
            sampler: if has_sampler {
                Some(Tensor::from_vec(sampler, (b, t - 1), device)?)
            } else {
                None
            },
            reference: if has_reference {
                Some(Tensor::from_vec(reference, (b, t - 1), device)?)
            } else {
                None
            },
            advantages: Tensor::from_vec(advantages, b, device)?,
            temperatures,
        })
    }
}

/// Running |behaviour − trainer| log-prob differences over trained tokens.
#[derive(Default)]
struct GapStats {
    sum: f64,
    max: f64,
    count: usize,
}

impl GapStats {
    fn add(&mut self, mask: &[bool], behaviour: &[f32], trainer: &[f32]) {
        for ((&m, &old), &new) in mask.iter().zip(behaviour).zip(trainer) {
            if m {
                let d = f64::from((old - new).abs());
                self.sum += d;
                self.max = self.max.max(d);
                self.count += 1;
            }
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }
}

struct Collated {
    pack: PackedSequences,
    mask: Tensor,
    old: Tensor,
    /// The sampler's log-probs, when every sequence kept them.
    sampler: Option<Tensor>,
    reference: Option<Tensor>,
    advantages: Tensor,
    temperatures: Vec<f64>,
}

fn validate(i: usize, s: &TrainSequence, vocab: usize) -> Result<()> {
    let n = s.tokens.len();
    if n < 2 {
        return Err(TrainError::InvalidInput(format!(
            "sequence {i} has {n} tokens; at least 2 are needed"
        )));
    }
    if s.loss_mask.len() != n || s.behaviour_logprobs.len() != n {
        return Err(TrainError::InvalidInput(format!(
            "sequence {i}: {n} tokens, {} mask flags, {} log-probs",
            s.loss_mask.len(),
            s.behaviour_logprobs.len()
        )));
    }
    if !(s.temperature.is_finite() && s.temperature > 0.0) {
        return Err(TrainError::InvalidInput(format!(
            "sequence {i}: temperature {} must be a positive finite number (greedy samples \
             have no distribution to train on)",
            s.temperature
        )));
    }
    if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(TrainError::InvalidInput(format!(
            "sequence {i}: token {t} is outside the vocabulary of {vocab}"
        )));
    }
    let bad = s
        .loss_mask
        .iter()
        .zip(&s.behaviour_logprobs)
        .skip(1)
        .any(|(&m, lp)| m && !(lp.is_finite() && *lp <= 0.0));
    if bad {
        return Err(TrainError::InvalidInput(format!(
            "sequence {i}: a trained token has a behaviour log-prob that is not a finite value <= 0"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::LossKind;
    use searchloop_llama::sample::{SampleParams, sample};
    use searchloop_llama::{Architecture, LlamaConfig};
    use searchloop_llama::{LoraConfig, TargetModule};

    const PROMPT: [u32; 3] = [1, 2, 3];

    fn toy_config() -> LlamaConfig {
        LlamaConfig {
            architecture: Architecture::Llama,
            n_layer: 2,
            hidden_size: 32,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 8,
            ffn_hidden: 64,
            vocab_size: 32,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
        }
    }

    fn toy_trainer(seed: u64, trainer: TrainerConfig) -> Trainer {
        let model = Llama::random(toy_config(), 21, &Device::Cpu, DType::F32).unwrap();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: TargetModule::ALL.to_vec(),
            seed,
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::new(lora, model.config(), &Device::Cpu, DType::F32).unwrap();
        Trainer::new(model, adapter, trainer).unwrap()
    }

    /// The next-token distribution after the prompt, under the current adapter.
    fn next_token_probs(t: &Trainer) -> Vec<f32> {
        let ids = Tensor::new(&[PROMPT], &Device::Cpu).unwrap();
        let logits = t.model().forward(&ids, None, Some(t.adapter())).unwrap();
        let last = logits.narrow(1, 2, 1).unwrap().flatten_all().unwrap();
        candle_nn::ops::log_softmax(&last, candle_core::D::Minus1)
            .unwrap()
            .exp()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Samples `groups × 8` one-token continuations and rewards those equal to `target`.
    fn rollouts(
        t: &Trainer,
        target: u32,
        groups: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<TrainSequence> {
        rollouts_at(t, target, groups, 1.0, rng)
    }

    /// [`rollouts`] sampled at `temperature`.
    fn rollouts_at(
        t: &Trainer,
        target: u32,
        groups: usize,
        temperature: f64,
        rng: &mut ChaCha8Rng,
    ) -> Vec<TrainSequence> {
        let params = SampleParams {
            n: 8,
            max_new_tokens: 1,
            temperature,
            stop: None,
        };
        let mut out = Vec::new();
        for g in 0..groups {
            for s in sample(t.model(), Some(t.adapter()), &PROMPT, &params, rng).unwrap() {
                let hit = s.tokens[3] == target;
                out.push(TrainSequence {
                    loss_mask: vec![false, false, false, true],
                    behaviour_logprobs: s.logprobs,
                    tokens: s.tokens,
                    reward: if hit { 1.0 } else { 0.0 },
                    group_id: format!("g{g}"),
                    baseline: None,
                    adapter_version: None,
                    temperature: params.temperature,
                    demonstration: false,
                });
            }
        }
        out
    }

    fn toy_config_trainer() -> TrainerConfig {
        TrainerConfig {
            learning_rate: 2e-2,
            ppo_epochs: 2,
            mini_batch_size: 32,
            micro_batch_size: 16,
            max_grad_norm: 1.0,
            seed: 5,
            ..TrainerConfig::default()
        }
    }

    /// A token the untrained model emits now and then (about 6 % of the time), so that groups
    /// carry signal.
    fn sometimes_sampled(probs: &[f32]) -> u32 {
        probs
            .iter()
            .enumerate()
            .min_by(|a, b| (a.1 - 0.06).abs().total_cmp(&(b.1 - 0.06).abs()))
            .map(|(i, _)| i as u32)
            .unwrap()
    }

    #[test]
    fn toy_task_reward_rises() {
        let mut t = toy_trainer(1, toy_config_trainer());
        let start = next_token_probs(&t);
        let target = sometimes_sampled(&start);
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let mut rewards = Vec::new();
        let mut trained = false;
        for _ in 0..12 {
            let batch = rollouts(&t, target, 8, &mut rng);
            let report = t.train(&batch).unwrap();
            rewards.push(report.reward_mean);
            trained |= report.steps.iter().any(|s| s.loss.tokens > 0);
        }
        let end = next_token_probs(&t);
        let (p0, p1) = (start[target as usize], end[target as usize]);
        let early = rewards[..3].iter().sum::<f64>() / 3.0;
        let late = rewards[rewards.len() - 3..].iter().sum::<f64>() / 3.0;
        println!(
            "toy task: p(target) {p0:.3} -> {p1:.3}; sampled reward {early:.3} (first 3 \
             iterations) -> {late:.3} (last 3); {} optimizer steps",
            t.steps_taken()
        );
        assert!(trained);
        assert!(p1 > 0.3 && p1 > 4.0 * p0, "p(target) {p0} -> {p1}");
        assert!(late > early + 0.2, "reward {early} -> {late}");
    }

    #[test]
    fn training_is_deterministic_on_cpu() {
        let run = || {
            let mut t = toy_trainer(4, toy_config_trainer());
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            for _ in 0..2 {
                let batch = rollouts(&t, 5, 4, &mut rng);
                t.train(&batch).unwrap();
            }
            t.adapter()
                .vars()
                .iter()
                .flat_map(|v| {
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn accumulation_matches_one_big_micro_batch_and_warmup_scales_lr() {
        let batch = {
            let t = toy_trainer(2, toy_config_trainer());
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let mut b = rollouts(&t, 5, 2, &mut rng);
            // Make sure both groups carry signal whatever was sampled.
            b[0].reward = 1.0;
            b[8].reward = 1.0;
            b
        };
        let cfg = |micro: usize, tokens: usize| TrainerConfig {
            ppo_epochs: 1,
            mini_batch_size: 16,
            micro_batch_size: micro,
            micro_batch_tokens: tokens,
            max_grad_norm: 0.0,
            warmup_steps: 4,
            ..toy_config_trainer()
        };
        let run = |micro: usize, tokens: usize| {
            let mut t = toy_trainer(2, cfg(micro, tokens));
            let report = t.train(&batch).unwrap();
            let vars: Vec<f32> = t
                .adapter()
                .vars()
                .iter()
                .flat_map(|v| {
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect();
            (report, vars)
        };
        let (r1, v1) = run(16, 0);
        assert_eq!(r1.steps.len(), 1);
        // Micro-batches of 3 sequences, and micro-batches cut at 6 packed tokens (a shared
        // 3-token prompt and up to 3 distinct answers) with the micro-batch size ignored.
        for (r4, v4) in [run(3, 0), run(1, 6)] {
            assert!((r1.steps[0].loss.loss - r4.steps[0].loss.loss).abs() < 1e-6);
            assert!(
                (r1.steps[0].grad_norm - r4.steps[0].grad_norm).abs()
                    < 1e-5 * r1.steps[0].grad_norm
            );
            let max = v1
                .iter()
                .zip(&v4)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-5, "{max}");
        }
        let lr = toy_config_trainer().learning_rate;
        assert!((r1.steps[0].learning_rate - lr / 4.0).abs() < 1e-12);
    }

    #[test]
    fn token_budgets_cut_micro_batches_by_packed_length() {
        let cfg = TrainerConfig {
            micro_batch_tokens: 10,
            ..toy_config_trainer()
        };
        let t = toy_trainer(1, cfg);
        let prepared: Vec<Prepared> = [
            vec![1, 2, 3, 4, 5, 6],
            vec![9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
            vec![1, 2, 3, 4, 7, 8],
            vec![1, 2, 3, 9],
            vec![1, 2, 5],
        ]
        .into_iter()
        .map(|tokens| Prepared {
            mask: vec![true; tokens.len() - 1],
            old: vec![0.0; tokens.len() - 1],
            tokens,
            sampler: None,
            reference: None,
            advantage: 1.0,
            temperature: 1.0,
            adapter_version: None,
            demonstration: false,
        })
        .collect();
        // Sorted: [1 2 3 4 5 6] (6), [1 2 3 4 7 8] (+2), [1 2 3 9] (+1), [1 2 5] (+1) = 10 packed
        // tokens; the 12-token sequence exceeds the budget and goes alone.
        assert_eq!(
            t.micro_batches(&prepared, &[0, 1, 2, 3, 4]),
            vec![vec![0, 2, 3, 4], vec![1]]
        );
        let pack = PackedSequences::new(&[
            &prepared[0].tokens[..],
            &prepared[2].tokens,
            &prepared[3].tokens,
            &prepared[4].tokens,
        ])
        .unwrap();
        assert_eq!(pack.len(), 10);
    }

    #[test]
    fn recomputed_old_logprobs_match_the_sampler() {
        let cfg = TrainerConfig {
            old_logprobs: OldLogprobSource::Recompute,
            ..toy_config_trainer()
        };
        let mut t = toy_trainer(3, cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut batch = rollouts(&t, 4, 2, &mut rng);
        batch[0].reward = 1.0;
        let report = t.train(&batch).unwrap();
        let gap = report.logprob_gap.unwrap();
        assert!(gap < 1e-5, "sampler/trainer gap {gap}");
        // Right after recomputation the first step is exactly on-policy.
        assert!((report.steps[0].loss.ratio_mean - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_demonstration_is_rescored_and_pulls_a_group_that_never_found_the_answer() {
        let mut t = toy_trainer(1, toy_config_trainer());
        let start = next_token_probs(&t);
        // The least likely token: a group of samples practically never finds it.
        let target = start
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut batch = rollouts(&t, target, 1, &mut rng);
        assert!(batch.iter().all(|s| s.reward == 0.0));
        // Written, not sampled: its recorded log-probs are meaningless (0 here, as a teacher
        // records them).
        let demonstration = TrainSequence {
            tokens: vec![PROMPT[0], PROMPT[1], PROMPT[2], target],
            loss_mask: vec![false, false, false, true],
            behaviour_logprobs: vec![0.0; 4],
            reward: 1.0,
            group_id: "g0".into(),
            baseline: None,
            adapter_version: None,
            temperature: 1.0,
            demonstration: true,
        };
        batch.push(demonstration.clone());
        let report = t.train(&batch).unwrap();
        // Rescored, it starts exactly on-policy, and it is left out of the sampler gap.
        assert!((report.steps[0].loss.ratio_mean - 1.0).abs() < 1e-6);
        assert!(report.logprob_gap.unwrap() < 1e-5);
        let p1 = next_token_probs(&t)[target as usize];
        let p0 = start[target as usize];
        assert!(p1 > 1.5 * p0, "p(target) {p0} -> {p1}");

        // Taken as a sample instead, its recorded log-prob of 0 puts the ratio far from 1 and
        // shows up as a gap: the flag is what makes the difference.
        let mut plain = toy_trainer(1, toy_config_trainer());
        let last = batch.len() - 1;
        batch[last].demonstration = false;
        let report = plain.train(&batch).unwrap();
        assert!(report.logprob_gap_max.unwrap() > 1.0);
    }

    #[test]
    fn recomputation_scores_each_sequence_under_the_adapter_version_that_sampled_it() {
        // Version 7: an adapter moved away from its start by a few large steps.
        let drift = TrainerConfig {
            learning_rate: 0.05,
            ..toy_config_trainer()
        };
        let mut served = toy_trainer(3, drift);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..3 {
            let mut batch = rollouts(&served, 4, 2, &mut rng);
            batch[0].reward = 1.0;
            served.train(&batch).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        served.adapter().save_peft(dir.path(), "toy").unwrap();
        let load = || {
            LoraAdapter::load_peft(
                dir.path(),
                served.model().config(),
                &Device::Cpu,
                DType::F32,
            )
            .unwrap()
        };
        let mut batch = rollouts(&served, 4, 2, &mut rng);
        batch[0].reward = 1.0;
        for s in &mut batch {
            s.adapter_version = Some(7);
        }
        let recompute = TrainerConfig {
            old_logprobs: OldLogprobSource::Recompute,
            ..toy_config_trainer()
        };
        // A trainer starting from a fresh adapter scores them far from the sampler, and its
        // first step sees no drift at all (its logp_old is its own)...
        let mut fresh = toy_trainer(3, recompute.clone());
        let report = fresh.train(&batch).unwrap();
        let off = report.logprob_gap_max.unwrap();
        assert!(off > 1e-3, "{off}");
        assert!((report.steps[0].loss.ratio_mean - 1.0).abs() < 1e-6);
        // ...unless it holds version 7's adapter: then logp_old is the sampler's, and the first
        // step's ratios show the real distance between the two adapters.
        let mut held = toy_trainer(3, recompute.clone());
        held.add_behaviour_adapter(Some(7), Some(load())).unwrap();
        let report = held.train(&batch).unwrap();
        let on = report.logprob_gap_max.unwrap();
        assert!(on < 1e-5, "{on}");
        assert!((report.steps[0].loss.ratio_mean - 1.0).abs() > 1e-4);
        // Another version's adapter does not apply to these sequences.
        let mut other = toy_trainer(3, recompute);
        other.add_behaviour_adapter(Some(8), Some(load())).unwrap();
        let wrong = other.train(&batch).unwrap().logprob_gap_max.unwrap();
        assert!((wrong - off).abs() < 1e-6, "{wrong} vs {off}");
    }

    #[test]
    fn tempered_scoring_matches_a_tempered_sampler_and_the_gap_is_always_measured() {
        for (source, temperature) in [
            (OldLogprobSource::Recompute, 0.3),
            (OldLogprobSource::Behaviour, 0.3),
            (OldLogprobSource::Behaviour, 1.7),
        ] {
            let cfg = TrainerConfig {
                old_logprobs: source,
                ..toy_config_trainer()
            };
            let mut t = toy_trainer(3, cfg);
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let mut batch = rollouts_at(&t, 4, 2, temperature, &mut rng);
            batch[0].reward = 1.0;
            batch[9].reward = 1.0;
            let report = t.train(&batch).unwrap();
            let (gap, max) = (report.logprob_gap.unwrap(), report.logprob_gap_max.unwrap());
            assert!(
                max < 1e-5 && gap <= max,
                "{source:?} T={temperature}: {gap} {max}"
            );
            // The first step runs before any update, so its ratios are exactly 1.
            assert!((report.steps[0].loss.ratio_mean - 1.0).abs() < 1e-5);
        }
        // Scored at the wrong temperature the same tokens are far off: the check can fail.
        let mut t = toy_trainer(3, toy_config_trainer());
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut batch = rollouts_at(&t, 4, 2, 0.3, &mut rng);
        batch[0].reward = 1.0;
        for s in &mut batch {
            s.temperature = 1.0;
        }
        let report = t.train(&batch).unwrap();
        assert!(report.logprob_gap_max.unwrap() > 0.05, "{report:?}");
    }

    #[test]
    fn an_observer_sees_every_step_and_can_cancel() {
        let mut t = toy_trainer(1, toy_config_trainer());
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut batch = rollouts(&t, 4, 8, &mut rng);
        batch[0].reward = 1.0;
        let planned = t.planned_steps(&batch);
        let mut seen = Vec::new();
        let report = t
            .train_with(&batch, &mut |m| {
                seen.push(m.step);
                true
            })
            .unwrap();
        assert_eq!(seen.len(), report.steps.len());
        assert!(report.steps.len() <= planned && !seen.is_empty());
        let mut calls = 0;
        let stopped = t.train_with(&batch, &mut |_| {
            calls += 1;
            false
        });
        assert!(matches!(stopped, Err(TrainError::Cancelled)));
        assert_eq!(calls, 1);
    }

    #[test]
    fn every_loss_kind_learns_the_toy_task() {
        let kinds = [
            (LossKind::Grpo, IsCorrection::Tis),
            (LossKind::Sapo, IsCorrection::Icepop),
            (LossKind::Gspo, IsCorrection::Mis),
            (LossKind::Cispo, IsCorrection::None),
            (LossKind::Llds, IsCorrection::Geo),
        ];
        for (kind, is_correction) in kinds {
            let cfg = TrainerConfig {
                loss: LossConfig {
                    kind,
                    is_correction,
                    ..LossConfig::default()
                },
                old_logprobs: OldLogprobSource::Recompute,
                ..toy_config_trainer()
            };
            let mut t = toy_trainer(1, cfg);
            let start = next_token_probs(&t);
            let target = sometimes_sampled(&start);
            let mut rng = ChaCha8Rng::seed_from_u64(99);
            let mut last = None;
            for _ in 0..8 {
                let batch = rollouts(&t, target, 8, &mut rng);
                last = t.train(&batch).unwrap().steps.pop();
            }
            let (p0, p1) = (
                start[target as usize],
                next_token_probs(&t)[target as usize],
            );
            let m = last.unwrap().loss;
            println!(
                "{kind:?} + {is_correction:?}: p(target) {p0:.3} -> {p1:.3}; last step: seq \
                 ratio {:?}, clip {:.3}, LLDS active {:.3}, IS weight {:?}",
                m.seq_ratio_mean, m.clip_frac, m.llds_active_frac, m.is_weight_mean
            );
            assert!(p1 > 3.0 * p0, "{kind:?}: p(target) {p0} -> {p1}");
            assert_eq!(
                m.is_weight_mean.is_some(),
                is_correction != IsCorrection::None
            );
        }
    }

    #[test]
    fn a_sampler_correction_needs_recomputed_old_logprobs() {
        let cfg = TrainerConfig {
            loss: LossConfig {
                is_correction: IsCorrection::Tis,
                ..LossConfig::default()
            },
            ..toy_config_trainer()
        };
        let model = Llama::random(toy_config(), 21, &Device::Cpu, DType::F32).unwrap();
        let adapter = LoraAdapter::new(
            LoraConfig::default(),
            model.config(),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let err = Trainer::new(model, adapter, cfg.clone()).unwrap_err();
        assert!(matches!(err, TrainError::Config(_)), "{err}");
        assert!(
            err.to_string().contains("old_logprobs = \"recompute\""),
            "{err}"
        );
        TrainerConfig {
            old_logprobs: OldLogprobSource::Recompute,
            ..cfg
        }
        .validate()
        .unwrap();
        // The loss's own refusals come out named from the trainer's table.
        let gspo_tis = TrainerConfig {
            loss: LossConfig {
                kind: LossKind::Gspo,
                is_correction: IsCorrection::Tis,
                ..LossConfig::default()
            },
            old_logprobs: OldLogprobSource::Recompute,
            ..toy_config_trainer()
        };
        let err = gspo_tis.validate().unwrap_err().to_string();
        assert!(err.contains("loss.kind = \"gspo\""), "{err}");
    }

    #[test]
    fn the_sampler_correction_weighs_by_the_recorded_logprobs() {
        let cfg = TrainerConfig {
            loss: LossConfig {
                is_correction: IsCorrection::Tis,
                ..LossConfig::default()
            },
            old_logprobs: OldLogprobSource::Recompute,
            ppo_epochs: 1,
            ..toy_config_trainer()
        };
        let mut t = toy_trainer(3, cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut batch = rollouts(&t, 4, 2, &mut rng);
        for s in &mut batch {
            s.reward = 0.0;
        }
        // Group 0: two rewarded episodes whose sampler gave the answer a third of the
        // probability the trainer recomputes (w = 3, truncated to 2), and six unrewarded ones
        // the sampler scored exactly (w = 1).
        for s in &mut batch[..2] {
            s.reward = 1.0;
            s.behaviour_logprobs[3] -= 3f32.ln();
        }
        let report = t.train(&batch).unwrap();
        assert!((report.logprob_gap_max.unwrap() - 3f64.ln()).abs() < 1e-4);
        let m = &report.steps[0].loss;
        assert_eq!(report.trained_sequences, 8);
        assert_eq!((m.positive_tokens, m.negative_tokens), (2, 6));
        assert!(
            (m.is_weight_mean.unwrap() - (2.0 * 2.0 + 6.0) / 8.0).abs() < 1e-4,
            "{m:?}"
        );
        assert_eq!(
            (m.is_clip_frac_pos, m.is_clip_frac_neg),
            (Some(1.0), Some(0.0))
        );
    }

    #[test]
    fn malformed_sequences_are_rejected() {
        let mut t = toy_trainer(1, toy_config_trainer());
        let good = TrainSequence {
            tokens: vec![1, 2, 3],
            loss_mask: vec![false, true, true],
            behaviour_logprobs: vec![0.0, -1.0, -2.0],
            reward: 1.0,
            group_id: "g".to_string(),
            baseline: None,
            adapter_version: None,
            temperature: 1.0,
            demonstration: false,
        };
        let short_mask = TrainSequence {
            loss_mask: vec![false, true],
            ..good.clone()
        };
        let bad_token = TrainSequence {
            tokens: vec![1, 2, 999],
            ..good.clone()
        };
        let bad_logprob = TrainSequence {
            behaviour_logprobs: vec![0.0, f32::NAN, -2.0],
            ..good.clone()
        };
        let greedy = TrainSequence {
            temperature: 0.0,
            ..good.clone()
        };
        for bad in [short_mask, bad_token, bad_logprob, greedy] {
            assert!(matches!(
                t.train(&[good.clone(), bad]),
                Err(TrainError::InvalidInput(_))
            ));
        }
        // A batch whose only group has equal rewards trains nothing, without error.
        let report = t.train(&[good.clone(), good]).unwrap();
        assert_eq!((report.steps.len(), report.zero_std_groups), (0, 1));
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("zero_std_groups"));
    }
}
