//! The learning loop of a serving process: training rounds, the eval gate, promotion, the live
//! monitor, and the scheduler that starts rounds on its own.
//!
//! # A round
//!
//! [`LearningLoop::train_now`] (and the scheduler) runs one round at a time:
//!
//! 1. the round (searchloop-learn's `run_round`) builds groups, trains a LoRA adapter from the
//!    promoted one, writes its merged GGUF and registers it as a candidate. It runs on a
//!    blocking-pool thread, so its CPU work never occupies the threads that serve requests, with
//!    the configured thread budget for candle, under a memory cap: a round does not start while
//!    the process's resident memory is at [`SchedulerConfig::memory_cap_mb`], and one that
//!    passes it (checked every 100 ms) is cancelled. Cancellation takes effect at the round's
//!    next check (between replay episodes and between optimizer steps), so what one optimizer
//!    step allocates is bounded by the round config (a micro-batch of at most
//!    `trainer.micro_batch_tokens` packed tokens, or `trainer.micro_batch_size` sequences of at
//!    most `max_sequence_tokens` when that is 0), not by the cap. A round that fails or is cancelled leaves no
//!    registry row (searchloop-learn's guarantee);
//! 2. the gate evaluates the candidate and the model serving now on the same held-out
//!    questions with the same seed, through agents that record nothing (held-out episodes must
//!    never become training data), and judges them ([`crate::gate`]);
//! 3. the candidate is promoted (a blue/green swap, see [`crate::adapters`]) or rejected with
//!    the reason; the eval results are recorded in the registry either way.
//!
//! # The scheduler
//!
//! [`LearningLoop::attach_scheduler`] validates its config at once (a bad config is one clear error
//! at start-up, never at the first round), then polls every `poll_seconds`:
//!
//! - it follows the registry (a promotion or rollback made by another process);
//! - it runs the live monitor ([`crate::monitor`]) and rolls back on a regression;
//! - it starts a round when `new_rewarded` rewarded trajectories arrived since the last round
//!   (or since it was attached), or when `interval_minutes` passed with at least
//!   `min_rewarded` new ones. The count is taken after each round, so the round's own rollouts
//!   do not trigger the next one.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use searchloop_core::{Agent, PolicySlot};
use searchloop_learn as learn;
use searchloop_store_sql::{AdapterRecord, RegistryListener, Store, TrainerLease};
use searchloop_train_sapo::TrainReport;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    adapters::{AdapterManager, SwapReport},
    error::{LoopError, Result},
    gate::{self, EvalReport, GateConfig, GateVerdict},
    metrics::{LoopMetrics, bump},
    monitor::{self, MonitorConfig},
};

/// When rounds start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggerConfig {
    /// Start a round once this many new rewarded trajectories were stored (`None`: never on
    /// count).
    pub new_rewarded: Option<u64>,
    /// Start a round once this many minutes passed since the last one (`None`: never on time)
    /// ...
    pub interval_minutes: Option<f64>,
    /// ... provided at least this many new rewarded trajectories were stored.
    pub min_rewarded: u64,
    /// Seconds between two looks at the store, the registry and the monitor.
    pub poll_seconds: f64,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        Self {
            new_rewarded: Some(64),
            interval_minutes: Some(60.0),
            min_rewarded: 16,
            poll_seconds: 10.0,
        }
    }
}

impl TriggerConfig {
    /// Checks the thresholds: at least one trigger, none of them zero.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LoopError::Config(m));
        if self.new_rewarded.is_none() && self.interval_minutes.is_none() {
            return bad(
                "learn.trigger needs new_rewarded or interval_minutes (or both); with neither, \
                 no round would ever start"
                    .into(),
            );
        }
        if self.new_rewarded == Some(0) {
            return bad(
                "learn.trigger.new_rewarded must be at least 1 (0 would start a round at every \
                 poll)"
                    .into(),
            );
        }
        if let Some(minutes) = self.interval_minutes {
            if !minutes.is_finite() || minutes <= 0.0 {
                return bad(format!(
                    "learn.trigger.interval_minutes must be a positive number of minutes, got \
                     {minutes}"
                ));
            }
            if self.min_rewarded == 0 {
                return bad(
                    "learn.trigger.min_rewarded must be at least 1 (a timed round needs new \
                     data to learn from)"
                        .into(),
                );
            }
        }
        if !self.poll_seconds.is_finite() || self.poll_seconds <= 0.0 {
            return bad(format!(
                "learn.trigger.poll_seconds must be positive, got {}",
                self.poll_seconds
            ));
        }
        Ok(())
    }
}

/// Why a round started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoundTrigger {
    /// [`LearningLoop::train_now`].
    Manual,
    /// Enough new rewarded trajectories.
    NewData {
        /// New rewarded trajectories since the last round.
        rewarded: u64,
    },
    /// The interval passed with enough new data.
    Timer {
        /// Minutes since the last round.
        minutes: f64,
        /// New rewarded trajectories since the last round.
        rewarded: u64,
    },
}

/// Whether a round is due, given the new rewarded trajectories and the time since the last
/// round.
pub fn due(
    new_rewarded: u64,
    since_last: Duration,
    trigger: &TriggerConfig,
) -> Option<RoundTrigger> {
    if trigger.new_rewarded.is_some_and(|n| new_rewarded >= n) {
        return Some(RoundTrigger::NewData {
            rewarded: new_rewarded,
        });
    }
    let minutes = since_last.as_secs_f64() / 60.0;
    match trigger.interval_minutes {
        Some(interval) if minutes >= interval && new_rewarded >= trigger.min_rewarded => {
            Some(RoundTrigger::Timer {
                minutes,
                rewarded: new_rewarded,
            })
        }
        _ => None,
    }
}

/// The held-out set the gate evaluates on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// A JSONL file of questions (`question`, `answers`, and optionally `id`, `kind`,
    /// `split`), like the retail data set's `questions.jsonl`; only lines whose `split` is
    /// absent or `heldout` are used.
    pub set: PathBuf,
    /// How many of its questions to use (the first ones).
    pub questions: usize,
    /// Seed of the evaluation episodes; both models get the same.
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            set: PathBuf::new(),
            questions: 16,
            seed: 0,
        }
    }
}

impl EvalConfig {
    /// Reads the held-out questions, failing with the file and line at fault.
    pub fn load_items(&self) -> Result<Vec<learn::Question>> {
        let path = &self.set;
        if path.as_os_str().is_empty() {
            return Err(LoopError::Config(
                "learn.eval.set must name the held-out questions file".into(),
            ));
        }
        learn::read_eval_items(path, self.questions)
            .map_err(|e| LoopError::Config(format!("learn.eval.set: {e}")))
    }
}

/// The `[learn]` section: everything the learning loop of a serving process needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Where rounds write adapters (one folder per version).
    pub adapters_dir: PathBuf,
    /// When rounds start.
    pub trigger: TriggerConfig,
    /// Resident memory of the whole process, in MiB, past which a running round is cancelled.
    pub memory_cap_mb: u64,
    /// The gate's held-out set.
    pub eval: EvalConfig,
    /// The round: groups, LoRA, trainer, and the thread budget.
    pub round: learn::RoundConfig,
    /// The eval gate.
    pub gate: GateConfig,
    /// The live monitor.
    pub monitor: MonitorConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            adapters_dir: PathBuf::from("adapters"),
            trigger: TriggerConfig::default(),
            memory_cap_mb: 8192,
            eval: EvalConfig::default(),
            round: learn::RoundConfig::default(),
            gate: GateConfig::default(),
            monitor: MonitorConfig::default(),
        }
    }
}

impl SchedulerConfig {
    /// Makes the relative paths absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let paths = [&mut self.adapters_dir, &mut self.eval.set]
            .into_iter()
            .chain(self.round.prompts.as_mut());
        for p in paths {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks everything before any round: thresholds, the memory cap, the eval set (it must
    /// exist and hold held-out questions), the round, the gate and the monitor.
    pub fn validate(&self) -> Result<()> {
        self.trigger.validate()?;
        if self.adapters_dir.as_os_str().is_empty() {
            return Err(LoopError::Config(
                "learn.adapters_dir must name a folder".into(),
            ));
        }
        if self.memory_cap_mb == 0 {
            return Err(LoopError::Config(
                "learn.memory_cap_mb must be positive".into(),
            ));
        }
        if let Some(resident) = resident_mb()
            && resident >= self.memory_cap_mb
        {
            return Err(LoopError::Config(format!(
                "learn.memory_cap_mb ({}) is below what the process already uses ({resident} \
                 MiB): every round would be stopped",
                self.memory_cap_mb
            )));
        }
        if self.eval.questions == 0 {
            return Err(LoopError::Config(
                "learn.eval.questions must be at least 1".into(),
            ));
        }
        self.eval.load_items()?;
        self.round
            .validate()
            .map_err(|e| LoopError::Config(format!("learn.round: {e}")))?;
        self.gate.validate()?;
        self.monitor.validate()
    }
}

/// How often a running round's memory is checked.
const MEMORY_POLL: Duration = Duration::from_millis(100);

/// Resident memory of this process in MiB (Linux; `None` elsewhere).
fn resident_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// What a round is given. Owned, so the round can run on its own thread.
#[derive(Clone)]
pub struct RoundJob {
    /// The serving agent (replay groups sample through it).
    pub agent: Arc<Agent>,
    /// The store.
    pub store: Arc<Store>,
    /// The base model's GGUF.
    pub base_gguf: PathBuf,
    /// The promoted adapter the round trains from (`None`: the base model).
    pub parent: Option<AdapterRecord>,
    /// The parent's folder on this machine (its PEFT files): fetched from the registry when
    /// another process trained it.
    pub parent_dir: Option<PathBuf>,
    /// Where adapters are written.
    pub adapters_dir: PathBuf,
    /// Set to stop the round.
    pub cancel: Arc<AtomicBool>,
    /// The round's settings.
    pub config: learn::RoundConfig,
}

impl std::fmt::Debug for RoundJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundJob")
            .field("base_gguf", &self.base_gguf)
            .field("parent", &self.parent.as_ref().map(|p| p.version))
            .field("adapters_dir", &self.adapters_dir)
            .finish_non_exhaustive()
    }
}

/// What a round produced: a registered candidate.
#[derive(Debug, Clone)]
pub struct RoundCandidate {
    /// The candidate, registered with status `candidate`; its merged GGUF is in its folder
    /// under [`crate::adapters::MERGED_FILE`].
    pub record: AdapterRecord,
    /// The training report (per-step metrics feed the ISDD alarm).
    pub train: TrainReport,
    /// What the round did (its batch, sampling and training times), when the runner says.
    pub summary: Option<learn::RoundSummary>,
}

/// Runs training rounds. The runtime's runner is searchloop-learn's round ([`LearnRunner`]);
/// a host may bring another.
#[async_trait]
pub trait RoundRunner: Send + Sync {
    /// Runs one round. A round that fails or is cancelled registers nothing.
    async fn run(&self, job: &RoundJob) -> Result<RoundCandidate>;
}

/// searchloop-learn's training round.
#[derive(Debug, Clone, Copy, Default)]
pub struct LearnRunner;

#[async_trait]
impl RoundRunner for LearnRunner {
    async fn run(&self, job: &RoundJob) -> Result<RoundCandidate> {
        let ctx = learn::RoundContext {
            agent: &job.agent,
            store: &job.store,
            base_gguf: &job.base_gguf,
            parent: job.parent.as_ref().map(|p| p.version),
            parent_adapter_dir: job.parent_dir.as_deref(),
            adapters_dir: &job.adapters_dir,
            cancel: &job.cancel,
        };
        let output = learn::run_round(&ctx, &job.config)
            .await
            .map_err(|e| match e {
                learn::LearnError::Cancelled => LoopError::RoundCancelled,
                e => LoopError::Learn(e),
            })?;
        Ok(RoundCandidate {
            record: output.candidate,
            train: output.report,
            summary: Some(output.summary),
        })
    }
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Why it ran.
    pub trigger: RoundTrigger,
    /// The candidate's version.
    pub candidate: u64,
    /// The version it was compared with (the one serving when the gate ran).
    pub incumbent: Option<u64>,
    /// The candidate's held-out scores (`None` when the ISDD alarm rejected it unevaluated).
    pub candidate_eval: Option<EvalReport>,
    /// The incumbent's, on the same questions and seed.
    pub incumbent_eval: Option<EvalReport>,
    /// The gate's decision.
    pub verdict: GateVerdict,
    /// The swap, when the candidate was promoted.
    pub swap: Option<SwapReport>,
    /// The training report.
    pub train: TrainReport,
    /// What the round did, when its runner says (searchloop-learn's does).
    pub summary: Option<learn::RoundSummary>,
    /// Wall time of the training part, in milliseconds.
    pub train_ms: u64,
    /// Wall time of the gate (both evaluations and the decision), in milliseconds.
    pub gate_ms: u64,
}

/// The base model's GGUF file, the weights every round trains on. A function rather than a
/// path, because the embedded default model is fetched on first use.
pub type BaseModel = Arc<dyn Fn() -> Result<PathBuf> + Send + Sync>;

/// The learning loop of a serving process: training rounds with their gate, the scheduler
/// that starts them, and the counters a metrics endpoint reads.
pub struct LearningLoop {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LearningLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LearningLoop")
            .field("configured", &self.configured())
            .field("scheduler_attached", &self.scheduler_attached())
            .finish_non_exhaustive()
    }
}

struct Shared {
    agent: Arc<Agent>,
    adapters: Arc<AdapterManager>,
    base_model: BaseModel,
    config: Mutex<Option<SchedulerConfig>>,
    runner: Mutex<Arc<dyn RoundRunner>>,
    /// Held for a whole round: one round at a time.
    round: tokio::sync::Mutex<()>,
    /// The store's trainer lease, once this process has taken it: one process trains at a
    /// time. Kept for the process's life, so the trainer stays the trainer.
    lease: tokio::sync::Mutex<Option<TrainerLease>>,
    /// The cancel flag of the running round.
    cancel: Mutex<Option<Arc<AtomicBool>>>,
    /// The base model's last evaluation and what it was measured on (adapters keep theirs in
    /// the registry).
    base_eval: Mutex<Option<(serde_json::Value, EvalReport)>>,
    scheduler: Mutex<Option<SchedulerTask>>,
    /// The registry follower of a serving replica without a scheduler.
    follower: Mutex<Option<SchedulerTask>>,
}

struct SchedulerTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// Locks a std mutex; a poisoned lock only means a panic elsewhere while it was held, and every
/// value kept under these locks stays valid across such a panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LearningLoop {
    /// The loop of a process serving through `agent`, whose adapters `adapters` manages;
    /// rounds train on `base_model` with `config` (`None`: rounds need a scheduler attached
    /// first).
    pub fn new(
        agent: Arc<Agent>,
        adapters: Arc<AdapterManager>,
        base_model: BaseModel,
        config: Option<SchedulerConfig>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                agent,
                adapters,
                base_model,
                config: Mutex::new(config),
                runner: Mutex::new(Arc::new(LearnRunner)),
                round: tokio::sync::Mutex::new(()),
                lease: tokio::sync::Mutex::new(None),
                cancel: Mutex::new(None),
                base_eval: Mutex::new(None),
                scheduler: Mutex::new(None),
                follower: Mutex::new(None),
            }),
        }
    }

    fn stop_scheduler(&self) -> Option<JoinHandle<()>> {
        let task = lock(&self.shared.scheduler).take()?;
        // The receiver may be gone already if the task ended; there is nothing to stop then.
        let _ = task.stop.send(true);
        Some(task.handle)
    }
}

impl Drop for LearningLoop {
    fn drop(&mut self) {
        if let Some(handle) = self.stop_scheduler() {
            handle.abort();
        }
        self.shared.cancel_round();
    }
}

impl Shared {
    fn cancel_round(&self) -> bool {
        match lock(&self.cancel).as_ref() {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Makes sure this process holds the store's trainer lease: keeps one it holds while its
    /// session lives, else takes it, else fails with [`LoopError::TrainerElsewhere`].
    async fn hold_trainer_lease(&self) -> Result<()> {
        let mut lease = self.lease.lock().await;
        if let Some(held) = lease.as_mut() {
            if held.is_held().await {
                return Ok(());
            }
            tracing::warn!("the trainer lease's database session ended; taking the lease again");
            *lease = None;
        }
        match self.adapters.store().try_trainer_lease().await? {
            Some(taken) => {
                *lease = Some(taken);
                Ok(())
            }
            None => Err(LoopError::TrainerElsewhere),
        }
    }

    /// Runs one round and its gate.
    async fn train(&self, trigger: RoundTrigger) -> Result<RoundReport> {
        let _round = self.round.try_lock().map_err(|_| LoopError::RoundBusy)?;
        let config = lock(&self.config).clone().ok_or_else(|| {
            LoopError::Config(
                "training needs a [learn] section in the config, or a scheduler attached".into(),
            )
        })?;
        self.hold_trainer_lease().await?;
        let counters = self.adapters.counters().clone();
        bump(&counters.rounds_started);
        counters.round_running.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.train_and_gate(trigger, &config).await;
        counters.round_running.store(false, Ordering::Relaxed);
        counters
            .last_round_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        match &result {
            Ok(report) => {
                bump(&counters.rounds_completed);
                counters.record_round_loss(&report.train);
                match report.verdict {
                    GateVerdict::Promote => bump(&counters.candidates_promoted),
                    GateVerdict::Reject { .. } => bump(&counters.candidates_rejected),
                }
            }
            Err(LoopError::RoundCancelled) => bump(&counters.rounds_cancelled),
            Err(_) => bump(&counters.rounds_failed),
        }
        result
    }

    async fn train_and_gate(
        &self,
        trigger: RoundTrigger,
        config: &SchedulerConfig,
    ) -> Result<RoundReport> {
        let store = self.adapters.store().clone();
        std::fs::create_dir_all(&config.adapters_dir).map_err(|e| {
            LoopError::io(
                format!(
                    "cannot create learn.adapters_dir {}",
                    config.adapters_dir.display()
                ),
                e,
            )
        })?;
        learn::discard_stale_rounds(&store, &config.adapters_dir).await?;
        if let Some(resident_mb) = resident_mb().filter(|r| *r >= config.memory_cap_mb) {
            return Err(LoopError::MemoryCap {
                resident_mb,
                cap_mb: config.memory_cap_mb,
            });
        }
        let parent = store.promoted().await?;
        let parent_dir = match &parent {
            Some(record) => Some(self.adapters.locator().folder(record).await?),
            None => None,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        *lock(&self.cancel) = Some(cancel.clone());
        let job = RoundJob {
            agent: self.agent.clone(),
            store: store.clone(),
            base_gguf: (self.base_model)()?,
            parent,
            parent_dir,
            adapters_dir: config.adapters_dir.clone(),
            cancel: cancel.clone(),
            config: config.round.clone(),
        };
        let started = Instant::now();
        let candidate = self.run_bounded(job, config.memory_cap_mb).await;
        *lock(&self.cancel) = None;
        let candidate = candidate?;
        let train_ms = started.elapsed().as_millis() as u64;
        let started = Instant::now();
        let version = candidate.record.version;
        match self.gate(&candidate, config, &cancel).await {
            Ok(outcome) => Ok(RoundReport {
                trigger,
                candidate: version,
                incumbent: outcome.incumbent,
                candidate_eval: outcome.candidate_eval,
                incumbent_eval: outcome.incumbent_eval,
                verdict: outcome.verdict,
                swap: outcome.swap,
                train: candidate.train,
                summary: candidate.summary,
                train_ms,
                gate_ms: started.elapsed().as_millis() as u64,
            }),
            Err(e) => {
                // A candidate that could not be judged must not stay a candidate forever.
                let reason = format!("the eval gate did not finish: {e}");
                if let Err(reject) = store.reject(version, &reason).await {
                    tracing::warn!(version, error = %reject, "cannot reject an unjudged candidate");
                }
                Err(e)
            }
        }
    }

    /// Runs the round on a blocking-pool thread, cancelling it when the process outgrows
    /// `cap_mb`.
    async fn run_bounded(&self, job: RoundJob, cap_mb: u64) -> Result<RoundCandidate> {
        let runner = lock(&self.runner).clone();
        let cancel = job.cancel.clone();
        let handle = tokio::runtime::Handle::current();
        // The round's future is driven on a blocking-pool thread: whatever CPU work it does
        // inline never holds up the runtime's worker threads, which keep serving requests.
        let mut round =
            tokio::task::spawn_blocking(move || handle.block_on(async { runner.run(&job).await }));
        let mut over_cap = None;
        let result = loop {
            tokio::select! {
                joined = &mut round => break joined,
                () = tokio::time::sleep(MEMORY_POLL) => {
                    if over_cap.is_none()
                        && let Some(resident) = resident_mb().filter(|r| *r > cap_mb)
                    {
                        tracing::warn!(resident, cap_mb, "memory cap exceeded; cancelling the round");
                        over_cap = Some(resident);
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
            }
        };
        let result = result.map_err(|e| learn::LearnError::Thread(e.to_string()))?;
        match (result, over_cap) {
            (Ok(candidate), None) if !cancel.load(Ordering::SeqCst) => Ok(candidate),
            // A round that finished despite the flag still produced a registered candidate;
            // reject it so it is never served.
            (Ok(candidate), over_cap) => {
                let reason = match over_cap {
                    Some(r) => format!("memory cap exceeded ({r} MiB > {cap_mb} MiB)"),
                    None => "the round was cancelled".to_string(),
                };
                job_reject(&self.adapters, candidate.record.version, &reason).await;
                Err(stop_error(over_cap, cap_mb))
            }
            (Err(_), _) if cancel.load(Ordering::SeqCst) => Err(stop_error(over_cap, cap_mb)),
            (Err(e), _) => Err(e),
        }
    }

    /// Judges the candidate: the ISDD alarm first (it needs no evaluation; a warm start's
    /// candidate, trained on demonstrations only, has no sampled tokens for it), then the
    /// candidate and the serving model on the same held-out questions and seed. Records the
    /// results and promotes or rejects.
    async fn gate(
        &self,
        candidate: &RoundCandidate,
        config: &SchedulerConfig,
        cancel: &AtomicBool,
    ) -> Result<GateOutcome> {
        let store = self.adapters.store();
        let version = candidate.record.version;
        let incumbent_policy = self.agent.policy().current();
        let mut outcome = GateOutcome {
            verdict: GateVerdict::Promote,
            incumbent: incumbent_policy.adapter_version(),
            candidate_eval: None,
            incumbent_eval: None,
            swap: None,
        };
        let mut candidate_policy = None;
        let items = config.eval.load_items()?;
        let key = self.eval_key(config, items.len())?;
        // The alarm reads drift between sampler and trainer on sampled tokens. A round that
        // trained demonstrations only (a warm start) sampled none, and the rise of its ratios
        // is how far it moved toward them, which is its purpose: the evaluation judges it.
        let demonstrations_only = candidate
            .summary
            .as_ref()
            .is_some_and(|s| s.batch.demonstrations_only());
        let alarm = if demonstrations_only {
            None
        } else {
            gate::isdd_alarm(&candidate.train.steps, &config.gate.isdd)
        };
        if let Some(reason) = alarm {
            outcome.verdict = GateVerdict::Reject { reason };
        } else {
            let policy = self
                .adapters
                .locator()
                .load(self.adapters.loader().as_ref(), Some(&candidate.record))
                .await?;
            let candidate_eval = self.evaluate(policy.clone(), &items, config).await?;
            let incumbent_eval = match self.cached_eval(outcome.incumbent, &key).await? {
                Some(report) => report,
                None => {
                    let report = self.evaluate(incumbent_policy, &items, config).await?;
                    if outcome.incumbent.is_none() {
                        *lock(&self.base_eval) = Some((key.clone(), report.clone()));
                    }
                    report
                }
            };
            outcome.verdict = gate::judge(&candidate_eval, &incumbent_eval, &config.gate);
            outcome.candidate_eval = Some(candidate_eval);
            outcome.incumbent_eval = Some(incumbent_eval);
            candidate_policy = Some(policy);
        }
        if cancel.load(Ordering::SeqCst) {
            outcome.verdict = GateVerdict::Reject {
                reason: "the round was cancelled before its gate decided".into(),
            };
        }
        let results = serde_json::json!({
            "metric": config.gate.metric.name(),
            "margin": config.gate.margin,
            EVAL_KEY: key,
            "candidate": outcome.candidate_eval,
            "incumbent": outcome.incumbent_eval,
            "incumbent_version": outcome.incumbent,
            "verdict": outcome.verdict,
        });
        store.set_eval(version, &results, &[]).await?;
        match (&outcome.verdict, candidate_policy) {
            (GateVerdict::Promote, Some(policy)) => {
                outcome.swap = Some(self.adapters.promote_loaded(version, policy).await?);
            }
            (GateVerdict::Promote, None) => {
                outcome.swap = Some(self.adapters.promote(version).await?);
            }
            (GateVerdict::Reject { reason }, _) => {
                store.reject(version, reason).await?;
            }
        }
        Ok(outcome)
    }

    /// What makes two evaluations comparable: the same questions (file and count), seed and
    /// agent settings.
    fn eval_key(&self, config: &SchedulerConfig, questions: usize) -> Result<serde_json::Value> {
        let agent = serde_json::to_vec(self.agent.config()).map_err(|e| {
            LoopError::Config(format!(
                "the agent config cannot be encoded for the eval key: {e}"
            ))
        })?;
        let digest: String = Sha256::digest(&agent)
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(serde_json::json!({
            "set": config.eval.set.display().to_string(),
            "questions": questions,
            "seed": config.eval.seed,
            "agent": digest,
        }))
    }

    /// An earlier evaluation of `version` under the same `key`: the registry keeps each
    /// adapter's own evaluation from its gate, and this process remembers the base model's.
    async fn cached_eval(
        &self,
        version: Option<u64>,
        key: &serde_json::Value,
    ) -> Result<Option<EvalReport>> {
        let Some(version) = version else {
            return Ok(lock(&self.base_eval)
                .as_ref()
                .filter(|(k, _)| k == key)
                .map(|(_, report)| report.clone()));
        };
        let Some(results) = self
            .adapters
            .store()
            .get_adapter(version)
            .await?
            .and_then(|r| r.eval_results)
        else {
            return Ok(None);
        };
        if results.get(EVAL_KEY) != Some(key) {
            return Ok(None);
        }
        let Some(candidate) = results.get("candidate").filter(|c| !c.is_null()) else {
            return Ok(None);
        };
        serde_json::from_value(candidate.clone())
            .map(Some)
            .map_err(|e| {
                LoopError::Adapter(format!(
                    "adapter v{version}: its recorded evaluation cannot be read: {e}"
                ))
            })
    }

    /// Held-out scores of `policy`, through an agent that records nothing.
    async fn evaluate(
        &self,
        policy: Arc<dyn searchloop_core::Policy>,
        items: &[learn::Question],
        config: &SchedulerConfig,
    ) -> Result<EvalReport> {
        let agent = Agent::new(
            Arc::new(PolicySlot::new(policy)),
            self.agent.tools().clone(),
            self.agent.config().clone(),
        )?;
        Ok(learn::evaluate(&agent, items, config.eval.seed).await?)
    }
}

/// The key under which eval results record what they were measured on.
const EVAL_KEY: &str = "eval";

/// What the gate decided and measured.
struct GateOutcome {
    verdict: GateVerdict,
    incumbent: Option<u64>,
    candidate_eval: Option<EvalReport>,
    incumbent_eval: Option<EvalReport>,
    swap: Option<SwapReport>,
}

async fn job_reject(adapters: &AdapterManager, version: u64, reason: &str) {
    if let Err(e) = adapters.store().reject(version, reason).await {
        tracing::warn!(version, error = %e, "cannot reject a cancelled round's candidate");
    }
}

fn stop_error(over_cap: Option<u64>, cap_mb: u64) -> LoopError {
    match over_cap {
        Some(resident_mb) => LoopError::MemoryCap {
            resident_mb,
            cap_mb,
        },
        None => LoopError::RoundCancelled,
    }
}

/// The rewarded trajectories in the store.
async fn rewarded_count(store: &Store) -> Result<u64> {
    Ok(store.stats().await?.rewarded_trajectories)
}

/// Completes on the listener's next registry change; never without a listener.
async fn registry_changed(listener: Option<&mut RegistryListener>) -> Result<()> {
    match listener {
        Some(listener) => Ok(listener.changed().await?),
        None => std::future::pending().await,
    }
}

/// The scheduler's loop; see the module docs.
async fn scheduler_loop(
    shared: Arc<Shared>,
    config: SchedulerConfig,
    baseline: u64,
    mut stop: watch::Receiver<bool>,
) {
    let poll = Duration::from_secs_f64(config.trigger.poll_seconds);
    let store = shared.adapters.store().clone();
    let mut baseline = Some(baseline);
    let mut last_round = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = shared.adapters.sync().await {
            tracing::warn!(error = %e, "cannot follow the adapter registry");
        }
        match monitor::check(&store, &config.monitor).await {
            Ok(Some(regression)) => {
                let reason = regression.reason();
                match shared.adapters.rollback(None, &reason).await {
                    Ok(swap) => {
                        bump(&shared.adapters.counters().auto_rollbacks);
                        tracing::warn!(?swap, %reason, "rolled back automatically");
                    }
                    Err(e) => tracing::warn!(error = %e, "automatic rollback failed"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "the online monitor cannot read the store"),
        }
        let count = match rewarded_count(&store).await {
            Ok(count) => count,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count rewarded trajectories");
                continue;
            }
        };
        let since = count.saturating_sub(*baseline.get_or_insert(count));
        let Some(trigger) = due(since, last_round.elapsed(), &config.trigger) else {
            continue;
        };
        match shared.train(trigger).await {
            Ok(report) => tracing::info!(
                candidate = report.candidate,
                verdict = ?report.verdict,
                "training round finished"
            ),
            Err(LoopError::RoundBusy) => continue,
            Err(LoopError::TrainerElsewhere) => {
                tracing::debug!("another process holds the trainer lease; staying idle");
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "training round failed"),
        }
        if *stop.borrow() {
            return;
        }
        last_round = Instant::now();
        baseline = rewarded_count(&store).await.ok();
    }
}

/// The learning loop's operations.
impl LearningLoop {
    /// Runs one training round now, with its gate, and returns what it did. Uses the attached
    /// scheduler's config, else the config's `[learn]` section. Fails with
    /// [`LoopError::RoundBusy`] while another round runs.
    pub async fn train_now(&self) -> Result<RoundReport> {
        self.shared.train(RoundTrigger::Manual).await
    }

    /// Starts the scheduler in the background with `config` (replacing one attached before).
    /// The config is checked first: a bad one is an error now, not at the first round. New
    /// rewarded trajectories are counted from now.
    pub async fn attach_scheduler(&self, config: SchedulerConfig) -> Result<()> {
        config.validate()?;
        std::fs::create_dir_all(&config.adapters_dir).map_err(|e| {
            LoopError::io(
                format!(
                    "cannot create learn.adapters_dir {}",
                    config.adapters_dir.display()
                ),
                e,
            )
        })?;
        // Staged rows without a live round are a dead round's, unless another process is the
        // trainer: then they may be its round in progress, and are left to it.
        if let Ok(_round) = self.shared.round.try_lock()
            && self.shared.hold_trainer_lease().await.is_ok()
        {
            learn::discard_stale_rounds(self.shared.adapters.store(), &config.adapters_dir).await?;
        }
        let baseline = rewarded_count(self.shared.adapters.store()).await?;
        if let Some(old) = self.stop_scheduler() {
            old.abort();
        }
        *lock(&self.shared.config) = Some(config.clone());
        let (stop, receiver) = watch::channel(false);
        let handle = tokio::spawn(scheduler_loop(
            self.shared.clone(),
            config,
            baseline,
            receiver,
        ));
        *lock(&self.shared.scheduler) = Some(SchedulerTask { stop, handle });
        Ok(())
    }

    /// Stops the scheduler (cancelling its running round) and waits for it to end.
    pub async fn detach_scheduler(&self) {
        let handle = self.stop_scheduler();
        self.shared.cancel_round();
        if let Some(handle) = handle {
            // The task only ends by returning; a join error would mean it panicked, which the
            // log already shows.
            let _ = handle.await;
        }
    }

    /// Whether rounds can run: the config has a `[learn]` section, or a scheduler is attached.
    pub fn configured(&self) -> bool {
        lock(&self.shared.config).is_some()
    }

    /// Follows the adapter registry every `every` in the background: a promotion or rollback
    /// another process committed (a fleet's trainer) is loaded here, then swapped in, as
    /// [`AdapterManager::sync`] does. A serving replica without a scheduler calls this; an
    /// attached scheduler follows the registry itself. Calling it again replaces the follower;
    /// it stops when this loop is dropped.
    pub fn follow_registry(&self, every: Duration) {
        let adapters = self.shared.adapters.clone();
        let (stop, mut stopped) = watch::channel(false);
        let handle = tokio::spawn(async move {
            // On PostgreSQL a change wakes the follower at once; the poll catches what a lost
            // listener connection missed.
            let mut listener = match adapters.store().registry_listener().await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for registry changes; polling only");
                    None
                }
            };
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    changed = registry_changed(listener.as_mut()) => {
                        if let Err(e) = changed {
                            // It reconnects on the next wait; until then, poll at the usual pace
                            // rather than spin on a database that is down.
                            tracing::warn!(error = %e, "the registry listener failed; it reconnects");
                            tokio::time::sleep(every).await;
                        }
                    }
                    // A stop, or the sender dropped with this loop.
                    _ = stopped.changed() => return,
                }
                if let Err(e) = adapters.sync().await {
                    tracing::warn!(error = %e, "cannot follow the adapter registry");
                }
            }
        });
        if let Some(old) = lock(&self.shared.follower).replace(SchedulerTask { stop, handle }) {
            let _ = old.stop.send(true);
            old.handle.abort();
        }
    }

    /// Gives up the store's trainer lease, if this process holds it, so another process can
    /// take over training at once (a trainer that dies gives it up when its database session
    /// ends). A later round takes it again if it is free.
    pub async fn release_trainer_lease(&self) -> Result<()> {
        let held = self.shared.lease.lock().await.take();
        if let Some(lease) = held {
            lease.release().await?;
        }
        Ok(())
    }

    /// Whether a scheduler is attached.
    pub fn scheduler_attached(&self) -> bool {
        lock(&self.shared.scheduler).is_some()
    }

    /// Cancels the running round, if any; returns whether one was running.
    pub fn cancel_round(&self) -> bool {
        self.shared.cancel_round()
    }

    /// Replaces the round runner (searchloop-learn's by default).
    pub fn set_round_runner(&self, runner: Arc<dyn RoundRunner>) {
        *lock(&self.shared.runner) = runner;
    }

    /// The learning loop's counters.
    pub fn metrics(&self) -> LoopMetrics {
        let adapters = &self.shared.adapters;
        adapters.counters().snapshot(adapters.serving_version())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_fire_on_count_or_on_time_with_enough_data() {
        let trigger = TriggerConfig {
            new_rewarded: Some(10),
            interval_minutes: Some(5.0),
            min_rewarded: 3,
            poll_seconds: 1.0,
        };
        let minute = Duration::from_secs(60);
        assert_eq!(due(9, minute, &trigger), None);
        assert_eq!(
            due(10, minute, &trigger),
            Some(RoundTrigger::NewData { rewarded: 10 })
        );
        assert_eq!(due(2, 6 * minute, &trigger), None);
        assert!(matches!(
            due(3, 6 * minute, &trigger),
            Some(RoundTrigger::Timer { rewarded: 3, .. })
        ));
    }

    #[test]
    fn zero_or_missing_thresholds_are_refused() {
        let cases = [
            (
                TriggerConfig {
                    new_rewarded: None,
                    interval_minutes: None,
                    ..TriggerConfig::default()
                },
                "needs new_rewarded or interval_minutes",
            ),
            (
                TriggerConfig {
                    new_rewarded: Some(0),
                    ..TriggerConfig::default()
                },
                "new_rewarded must be at least 1",
            ),
            (
                TriggerConfig {
                    interval_minutes: Some(0.0),
                    ..TriggerConfig::default()
                },
                "interval_minutes",
            ),
            (
                TriggerConfig {
                    min_rewarded: 0,
                    ..TriggerConfig::default()
                },
                "min_rewarded",
            ),
        ];
        for (trigger, expected) in cases {
            let err = trigger.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn the_eval_set_must_exist_and_hold_heldout_questions() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SchedulerConfig::default();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("learn.eval.set"), "{err}");
        config.eval.set = dir.path().join("missing.jsonl");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("missing.jsonl"), "{err}");
        let set = dir.path().join("train_only.jsonl");
        std::fs::write(&set, r#"{"question":"q","answers":["a"],"split":"train"}"#).unwrap();
        config.eval.set = set;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("no held-out question"), "{err}");
        let set = dir.path().join("ok.jsonl");
        std::fs::write(
            &set,
            "{\"question\":\"q1\",\"answers\":[\"a\"],\"split\":\"heldout\"}\n\
             {\"question\":\"q2\",\"answers\":[\"b\"]}\n",
        )
        .unwrap();
        config.eval.set = set;
        config.validate().unwrap();
        assert_eq!(config.eval.load_items().unwrap().len(), 2);
    }
}
