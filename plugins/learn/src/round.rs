//! One training round: gather groups, train a LoRA candidate on a thread budget, write it
//! (PEFT files, merged GGUF, metrics) and register it.
//!
//! A round publishes all or nothing. It writes everything into a hidden temporary folder of
//! `adapters_dir` and syncs it; then the registry reserves its version (a staging row), the
//! folder is renamed to `v<N>` after that version, and only then is the row published as a
//! candidate. A round that fails or is cancelled removes its folder and discards any
//! reservation, so its only trace is its log; one whose process died is cleaned up by the next
//! round ([`discard_stale_rounds`]).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use candle_core::{DType, Device};
use searchloop_core::Agent;
use searchloop_llama::{GgufFile, Llama, LoraAdapter, merge_into_gguf};
use searchloop_store_sql::{AdapterRecord, Cursor, LearningState, NewAdapter, Store};
use searchloop_train_sapo::{
    OldLogprobSource, StepMetrics, TrainError, TrainReport, TrainSequence, Trainer,
};
use tokio::sync::mpsc;

use crate::{
    batch::{BatchBuilder, BatchStats, SequenceLimits},
    config::RoundConfig,
    error::{LearnError, Result},
    fetch::read_adapter_files,
    groups::{Gathering, feedback_groups, replay_agent, replay_groups, warm_start_demonstrations},
    metrics::{METRICS_FILE, MetricsLine, MetricsWriter, RoundSummary, step_line},
    questions::{Question, logged_train_prompts, of_kinds, pick_prompts, read_train_prompts},
};

/// The merged model's file name inside an adapter's folder.
pub const MERGED_FILE: &str = "merged.gguf";

/// What a round works with.
#[derive(Debug, Clone, Copy)]
pub struct RoundContext<'a> {
    /// The serving agent: replay groups are sampled through it (and recorded in its sink).
    pub agent: &'a Agent,
    /// The store: logged feedback, the reward policy, the adapter registry.
    pub store: &'a Store,
    /// The base model's GGUF (the trainer's weights, and the base of the merged model).
    pub base_gguf: &'a Path,
    /// The promoted adapter version the round continues (`None`: a new adapter on the base).
    pub parent: Option<u64>,
    /// The parent adapter's folder (PEFT files); required when `parent` is set.
    pub parent_adapter_dir: Option<&'a Path>,
    /// Where adapter folders (`v<N>`) are written; created when missing.
    pub adapters_dir: &'a Path,
    /// Set to stop the round; it is checked between replay groups and optimizer steps.
    pub cancel: &'a AtomicBool,
}

/// What a successful round produced.
#[derive(Debug, Clone)]
pub struct RoundOutput {
    /// The candidate, registered with status `candidate`.
    pub candidate: AdapterRecord,
    /// The adapter's folder: PEFT files, merged model, metrics.
    pub adapter_dir: PathBuf,
    /// The merged GGUF serving the candidate.
    pub merged_gguf: PathBuf,
    /// The trainer's report.
    pub report: TrainReport,
    /// The per-step metrics file.
    pub metrics_jsonl: PathBuf,
    /// What the round did.
    pub summary: RoundSummary,
    /// Where the next round from this candidate resumes reading feedback.
    pub feedback_cursor: Cursor,
}

/// Progress of a round, for front ends. Every method has a no-op default.
pub trait RoundObserver: Send + Sync {
    /// `done` of `total` replay episodes are sampled.
    fn rollouts(&self, done: usize, total: usize) {
        let _ = (done, total);
    }

    /// Training starts: at most `planned_steps` optimizer steps on `sequences` sequences.
    fn training(&self, planned_steps: usize, sequences: usize) {
        let _ = (planned_steps, sequences);
    }

    /// An optimizer step finished.
    fn step(&self, metrics: &StepMetrics) {
        let _ = metrics;
    }

    /// The adapter and the merged model are being written.
    fn writing(&self) {}
}

/// Observes nothing.
impl RoundObserver for () {}

/// Runs one round (see the module docs).
pub async fn run_round(ctx: &RoundContext<'_>, config: &RoundConfig) -> Result<RoundOutput> {
    run_round_observed(ctx, config, &()).await
}

/// [`run_round`], reporting progress to `observer`.
pub async fn run_round_observed(
    ctx: &RoundContext<'_>,
    config: &RoundConfig,
    observer: &dyn RoundObserver,
) -> Result<RoundOutput> {
    config.validate()?;
    // A round from the base model with a warm start imitates demonstrations (and is trained,
    // and recorded, under the warm start's config).
    let warm_start = config.warm_start > 0 && ctx.parent.is_none() && config.source.replay();
    let warm_config;
    let config = if warm_start {
        warm_config = config.for_warm_start();
        &warm_config
    } else {
        config
    };
    if ctx.parent.is_some() != ctx.parent_adapter_dir.is_some() {
        return Err(LearnError::Config(
            "a parent adapter version needs its folder, and a folder its version".into(),
        ));
    }
    let model_config = GgufFile::open(ctx.base_gguf)?.config()?;
    std::fs::create_dir_all(ctx.adapters_dir).map_err(|e| {
        LearnError::io(
            format!(
                "cannot create the adapters folder {}",
                ctx.adapters_dir.display()
            ),
            e,
        )
    })?;
    let limits = SequenceLimits {
        vocab_size: model_config.vocab_size,
        max_tokens: config.max_sequence_tokens,
    };
    let round = ctx.store.list_adapters().await?.len() as u64;
    let reward_policy = ctx.store.options().reward_policy.clone();

    let mut batch = BatchBuilder::default();
    let mut replay = Default::default();
    if config.source.replay() {
        let prompts = match &config.prompts {
            Some(path) => read_train_prompts(path)?,
            None => logged_train_prompts(ctx.store, usize::MAX).await?,
        };
        let prompts = of_kinds(prompts, &config.prompt_kinds)?;
        let progress = |done, total| observer.rollouts(done, total);
        // Demonstrations too are recorded at the rollout temperature, where the trainer scores
        // them: a greedy serving agent's episodes have no distribution to train.
        let agent = replay_agent(ctx.agent, config)?;
        let mut out = Gathering {
            round,
            reward_policy: &reward_policy,
            limits,
            batch: &mut batch,
            cancel: ctx.cancel,
            progress: &progress,
        };
        replay = if warm_start {
            let solved: Vec<Question> = prompts
                .into_iter()
                .filter(|q| !q.solution.is_empty())
                .collect();
            // The whole walk, so that a solution the protocol cannot play is replaced by the
            // next; a later warm-start round (its parent's was rejected) starts where this
            // one's demonstrations end.
            let mut chosen = pick_prompts(&solved, solved.len(), 0, config.seed);
            if !chosen.is_empty() {
                let len = chosen.len();
                chosen.rotate_left((round as usize).wrapping_mul(config.warm_start) % len);
            }
            warm_start_demonstrations(&agent, &chosen, config, &mut out).await?
        } else {
            let chosen = pick_prompts(&prompts, config.prompt_draws(), round, config.seed);
            if chosen.is_empty() {
                tracing::warn!("no train-split prompts: the round samples no replay groups");
            }
            replay_groups(&agent, &chosen, config, &mut out).await?
        };
    }
    // An adapter registered by hand left no learning state: its rounds start both afresh.
    let parent_state = match ctx.parent {
        Some(v) => ctx.store.learning_state(v).await?.unwrap_or_default(),
        None => LearningState::default(),
    };
    let (since, baselines) = (parent_state.feedback_cursor, parent_state.baselines);
    let (feedback_cursor, baselines) = if config.source.feedback() {
        feedback_groups(
            ctx.store, since, &baselines, config, limits, &mut batch, ctx.cancel,
        )
        .await?
    } else {
        (since, baselines)
    };
    let (sequences, stats) = batch.finish();
    check_trainable(&stats, config)?;
    if ctx.cancel.load(Ordering::SeqCst) {
        return Err(LearnError::Cancelled);
    }

    // The temporary folder is removed when dropped, on every early return below.
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(ctx.adapters_dir)
        .map_err(|e| {
            LearnError::io(
                format!("cannot create a folder in {}", ctx.adapters_dir.display()),
                e,
            )
        })?;
    let behaviours = if config.trainer.old_logprobs == OldLogprobSource::Recompute {
        behaviour_adapters(ctx.store, ctx.parent, &sequences).await?
    } else {
        Vec::new()
    };
    let mut metrics = MetricsWriter::create(&staging.path().join(METRICS_FILE))?;
    let threads = config.thread_budget();
    let trained_tokens =
        config.trainer.ppo_epochs * sequences.iter().map(|s| s.tokens.len()).sum::<usize>();
    let train_started = Instant::now();
    let report = train_in_background(
        TrainJob {
            base_gguf: ctx.base_gguf.to_path_buf(),
            parent_dir: ctx.parent_adapter_dir.map(Path::to_path_buf),
            behaviours,
            config: config.clone(),
            sequences,
            out_dir: staging.path().to_path_buf(),
            threads,
        },
        ctx.cancel,
        &mut |event| match event {
            JobEvent::Started {
                planned_steps,
                sequences,
            } => {
                observer.training(planned_steps, sequences);
                Ok(())
            }
            JobEvent::Step(m) => {
                observer.step(&m);
                metrics.write(&step_line(round, &m, &stats))
            }
            JobEvent::Writing => {
                observer.writing();
                Ok(())
            }
        },
    )
    .await?;
    let summary = RoundSummary {
        round,
        parent: ctx.parent,
        batch: stats,
        steps: report.steps.len(),
        trained_sequences: report.trained_sequences,
        logprob_gap: report.logprob_gap,
        logprob_gap_max: report.logprob_gap_max,
        rollout_episodes: replay.episodes,
        rollout_tokens: replay.generated_tokens,
        rollout_seconds: replay.seconds,
        rollout_prompts: replay.prompts,
        informative_groups: replay.informative_groups,
        train_seconds: train_started.elapsed().as_secs_f64(),
        trained_tokens,
        threads,
    };
    metrics.write(&MetricsLine::Round(&summary))?;
    metrics.finish()?;
    sync_files(staging.path())?;
    if ctx.cancel.load(Ordering::SeqCst) {
        return Err(LearnError::Cancelled);
    }

    let files = read_adapter_files(staging.path())?;
    let content_hash = files.content_hash();
    let state = LearningState {
        feedback_cursor,
        baselines,
    };
    let new_adapter = |path: &Path| -> Result<NewAdapter> {
        Ok(NewAdapter {
            content_hash: content_hash.clone(),
            parent_version: ctx.parent,
            path: path.to_string_lossy().into_owned(),
            training_config: serde_json::to_value(config).map_err(|e| {
                LearnError::Config(format!("the round config cannot be recorded as JSON: {e}"))
            })?,
            metrics_summary: serde_json::to_value(&summary).map_err(|e| {
                LearnError::Config(format!("the round summary cannot be recorded as JSON: {e}"))
            })?,
            created_at: None,
        })
    };
    // The registry assigns the version (a staging row) before the folder is named after it;
    // the row becomes a candidate only once the folder is complete under that name.
    let version = ctx.store.stage_adapter(ctx.parent).await?;
    let final_dir = ctx.adapters_dir.join(format!("v{version}"));
    let published = match publish(staging, &final_dir) {
        Ok(()) => match new_adapter(&final_dir) {
            Ok(adapter) => ctx
                .store
                .publish_adapter(version, adapter, &files, Some(&state))
                .await
                .map_err(LearnError::from),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let candidate = match published {
        Ok(record) => record,
        Err(e) => {
            remove_quietly(&final_dir);
            if let Err(discard) = ctx.store.discard_staged(version).await {
                tracing::warn!(version, error = %discard, "cannot discard a reserved version");
            }
            return Err(e);
        }
    };
    tracing::info!(
        version = candidate.version,
        steps = summary.steps,
        sequences = summary.batch.sequences,
        "registered a candidate adapter"
    );
    Ok(RoundOutput {
        candidate,
        merged_gguf: final_dir.join(MERGED_FILE),
        metrics_jsonl: final_dir.join(METRICS_FILE),
        adapter_dir: final_dir,
        report,
        summary,
        feedback_cursor,
    })
}

/// Refuses a batch that cannot move the adapter: empty, or every group without spread.
fn check_trainable(stats: &BatchStats, config: &RoundConfig) -> Result<()> {
    if stats.sequences == 0 {
        let skipped: usize = stats.skipped.values().sum();
        return Err(LearnError::NoData(format!(
            "no usable episodes (source {:?}; {skipped} left out: {:?})",
            config.source, stats.skipped
        )));
    }
    if stats.zero_std_groups == stats.groups && config.trainer.advantages.skip_zero_std_groups {
        return Err(LearnError::NoData(format!(
            "all {} groups ({} episodes) have equal rewards, so no advantage is non-zero",
            stats.groups, stats.sequences
        )));
    }
    Ok(())
}

/// The adapter folders of the versions that sampled `sequences`, except `parent` (the trainer
/// starts from it, so it scores those itself). A version missing from the registry is left
/// out, with a warning: its sequences are then scored under the parent.
async fn behaviour_adapters(
    store: &Store,
    parent: Option<u64>,
    sequences: &[TrainSequence],
) -> Result<Vec<(Option<u64>, Option<PathBuf>)>> {
    let versions: std::collections::BTreeSet<Option<u64>> = sequences
        .iter()
        .map(|s| s.adapter_version)
        .filter(|v| *v != parent)
        .collect();
    let mut out = Vec::with_capacity(versions.len());
    for version in versions {
        match version {
            None => out.push((None, None)),
            Some(v) => match store.get_adapter(v).await? {
                Some(record) => out.push((Some(v), Some(PathBuf::from(record.path)))),
                None => tracing::warn!(
                    version = v,
                    "episodes name an adapter version the registry does not hold; their \
                     logp_old is recomputed under the parent adapter"
                ),
            },
        }
    }
    Ok(out)
}

/// Renames the complete staging folder to `final_dir`, replacing a folder already there. For a
/// round, whose version the registry reserved, such a folder was left by a process that died
/// before publishing it; for a fetch ([`crate::fetch`]), it holds the same adapter merged by an
/// earlier fetch.
pub(crate) fn publish(staging: tempfile::TempDir, final_dir: &Path) -> Result<()> {
    if final_dir.exists() {
        tracing::warn!(path = %final_dir.display(), "replacing an unpublished adapter folder");
        std::fs::remove_dir_all(final_dir)
            .map_err(|e| LearnError::io(format!("cannot remove {}", final_dir.display()), e))?;
    }
    let path = staging.keep();
    std::fs::rename(&path, final_dir).map_err(|e| {
        remove_quietly(&path);
        LearnError::io(
            format!(
                "cannot rename {} to {}",
                path.display(),
                final_dir.display()
            ),
            e,
        )
    })?;
    // The rename is durable once the parent folder's entry is synced.
    if let Some(parent) = final_dir.parent()
        && let Ok(dir) = std::fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The prefix of a round's hidden staging folder in `adapters_dir`.
pub const STAGING_PREFIX: &str = ".round-";

/// Cleans up after rounds whose process died: discards every version still staged in the
/// registry and removes its folder, and removes the hidden staging folders left in
/// `adapters_dir`. Only the process that trains may call it, and only while none of its own
/// rounds runs: every reservation and staging folder is then stale. Returns the discarded
/// versions.
pub async fn discard_stale_rounds(store: &Store, adapters_dir: &Path) -> Result<Vec<u64>> {
    let staged = store.staged_adapters().await?;
    for &version in &staged {
        let folder = adapters_dir.join(format!("v{version}"));
        if folder.exists() {
            std::fs::remove_dir_all(&folder)
                .map_err(|e| LearnError::io(format!("cannot remove {}", folder.display()), e))?;
        }
        store.discard_staged(version).await?;
        tracing::warn!(version, "discarded a killed round's reserved version");
    }
    if let Ok(entries) = std::fs::read_dir(adapters_dir) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
            {
                let path = entry.path();
                std::fs::remove_dir_all(&path)
                    .map_err(|e| LearnError::io(format!("cannot remove {}", path.display()), e))?;
                tracing::warn!(path = %path.display(), "removed a killed round's folder");
            }
        }
    }
    Ok(staged)
}

/// Syncs every file of `dir`, so the folder is complete on disk before it is published.
pub(crate) fn sync_files(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LearnError::io(format!("cannot list {}", dir.display()), e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| LearnError::io(format!("cannot list {}", dir.display()), e))?
            .path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| LearnError::io(format!("cannot sync {}", path.display()), e))?;
    }
    Ok(())
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a round's folder");
    }
}

/// Everything the training thread owns.
struct TrainJob {
    base_gguf: PathBuf,
    parent_dir: Option<PathBuf>,
    /// The adapters that sampled the batch, other than the parent: by version (`None`: the base
    /// model), the folder of that version's adapter (`None`: score without one).
    behaviours: Vec<(Option<u64>, Option<PathBuf>)>,
    config: RoundConfig,
    sequences: Vec<TrainSequence>,
    out_dir: PathBuf,
    threads: usize,
}

/// What the training thread reports while it runs.
enum JobEvent {
    Started {
        planned_steps: usize,
        sequences: usize,
    },
    Step(Box<StepMetrics>),
    Writing,
}

/// Sets the job's stop flag when the round's future is dropped mid-training, so the thread
/// stops at its next step instead of training for nobody.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `job` on a blocking thread, forwarding its events to `on_event` and the caller's
/// `cancel` flag to the thread. An error from `on_event` stops the job.
async fn train_in_background(
    job: TrainJob,
    cancel: &AtomicBool,
    on_event: &mut (dyn FnMut(JobEvent) -> Result<()> + Send),
) -> Result<TrainReport> {
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let thread_stop = Arc::clone(&stop);
    let mut handle = tokio::task::spawn_blocking(move || run_job(job, &thread_stop, &tx));
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut failure = None;
    let joined = loop {
        tokio::select! {
            joined = &mut handle => break joined,
            Some(event) = rx.recv() => {
                if let Err(e) = on_event(event) {
                    stop.store(true, Ordering::SeqCst);
                    failure.get_or_insert(e);
                }
            }
            _ = poll.tick() => {
                if cancel.load(Ordering::SeqCst) {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        }
    };
    while let Ok(event) = rx.try_recv() {
        if failure.is_none()
            && let Err(e) = on_event(event)
        {
            failure = Some(e);
        }
    }
    let result = joined.map_err(|e| LearnError::Thread(e.to_string()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    if cancel.load(Ordering::SeqCst) {
        return Err(LearnError::Cancelled);
    }
    result
}

/// The training thread: load, train, write the PEFT adapter and the merged model.
fn run_job(
    job: TrainJob,
    stop: &AtomicBool,
    events: &mpsc::UnboundedSender<JobEvent>,
) -> Result<TrainReport> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(job.threads)
        .thread_name(|i| format!("searchloop-train-{i}"))
        .build()
        .map_err(|e| LearnError::Thread(format!("cannot start the trainer's threads: {e}")))?;
    // candle's CPU kernels run their parallel loops on the current rayon pool, so installing
    // this pool keeps the trainer on its budget and off the pool serving uses.
    pool.install(|| {
        let wanted = job.config.device.unwrap_or_default();
        let device = match wanted {
            searchloop_core::Device::Cpu => Device::Cpu,
            searchloop_core::Device::Cuda(ordinal) => {
                Device::new_cuda(ordinal).map_err(|source| LearnError::Device {
                    device: wanted,
                    source,
                })?
            }
        };
        let started = Instant::now();
        let model = Llama::load(&job.base_gguf, &device, DType::F32)?;
        let adapter = match &job.parent_dir {
            Some(dir) => LoraAdapter::load_peft(dir, model.config(), &device, DType::F32)?,
            None => LoraAdapter::new(job.config.lora.clone(), model.config(), &device, DType::F32)?,
        };
        let mut behaviours = Vec::with_capacity(job.behaviours.len());
        for (version, dir) in &job.behaviours {
            let adapter = match dir {
                Some(dir) => Some(LoraAdapter::load_peft(
                    dir,
                    model.config(),
                    &device,
                    DType::F32,
                )?),
                None => None,
            };
            behaviours.push((*version, adapter));
        }
        let mut trainer = Trainer::new(model, adapter, job.config.trainer.clone())?;
        for (version, adapter) in behaviours {
            trainer.add_behaviour_adapter(version, adapter)?;
        }
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "trainer loaded");
        let started = Instant::now();
        // A send fails only when the round's future is gone; the stop flag handles that.
        let _ = events.send(JobEvent::Started {
            planned_steps: trainer.planned_steps(&job.sequences),
            sequences: job.sequences.len(),
        });
        let report = trainer
            .train_with(&job.sequences, &mut |m| {
                let _ = events.send(JobEvent::Step(Box::new(m.clone())));
                !stop.load(Ordering::SeqCst)
            })
            .map_err(|e| match e {
                TrainError::Cancelled => LearnError::Cancelled,
                other => other.into(),
            })?;
        if stop.load(Ordering::SeqCst) {
            return Err(LearnError::Cancelled);
        }
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            steps = report.steps.len(),
            "trained"
        );
        let _ = events.send(JobEvent::Writing);
        let started = Instant::now();
        let (_, adapter) = trainer.into_parts();
        adapter.save_peft(&job.out_dir, &job.config.base_model_name)?;
        if stop.load(Ordering::SeqCst) {
            return Err(LearnError::Cancelled);
        }
        merge_into_gguf(
            &job.base_gguf,
            &adapter,
            job.out_dir.join(MERGED_FILE),
            job.config.merged_weights.encoding(),
        )?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "adapter and merged model written"
        );
        Ok(report)
    })
}
