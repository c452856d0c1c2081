//! `searchloop train`, `searchloop eval` and `searchloop plot`: one training round from the
//! store into the adapter registry, held-out evaluation of the base model or an adapter, and
//! the training curves of rounds' metrics files.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use searchloop_core::{Agent, PolicySlot};
use searchloop_learn::{
    EVAL_CONCURRENCY, GroupSource, MERGED_FILE, RoundConfig, RoundContext, RoundObserver,
    evaluate_observed, read_eval_items, run_round_observed,
};
use searchloop_runtime::{AppConfig, Runtime, service};
use searchloop_store_sql::Store;
use searchloop_train_sapo::{IsCorrection, LossKind, OldLogprobSource, StepMetrics};

/// Options of `searchloop train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Run one round now and exit (the serving process runs rounds on its own schedule).
    #[arg(long, required = true)]
    pub once: bool,
    /// Optimizer steps: the expected batch (group size × prompts) is split into this many
    /// mini-batches, in more PPO epochs when it has fewer sequences than steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// The policy loss: grpo, sapo, gspo, cispo or llds (`[learn.round.trainer.loss] kind`).
    #[arg(long, value_parser = config_name::<LossKind>)]
    pub loss: Option<LossKind>,
    /// SAPO weight w (0 is plain GRPO).
    #[arg(long)]
    pub w: Option<f64>,
    /// SAPO ratio threshold t.
    #[arg(long)]
    pub t: Option<f64>,
    /// LLDS weight λ.
    #[arg(long)]
    pub llds_lambda: Option<f64>,
    /// The PPO clip range above 1 when it differs from the one below (DAPO's clip-higher).
    #[arg(long)]
    pub clip_eps_high: Option<f64>,
    /// Sampler→behaviour correction: none, tis, mis, icepop or geo. Any but none needs
    /// recomputed behaviour log-probs (`--old-logprobs recompute`).
    #[arg(long, value_parser = config_name::<IsCorrection>)]
    pub is_correction: Option<IsCorrection>,
    /// Lower bound of the correction's band on π_old / π_sampler.
    #[arg(long)]
    pub is_min: Option<f64>,
    /// Upper bound of the correction's band on π_old / π_sampler.
    #[arg(long)]
    pub is_max: Option<f64>,
    /// Where the behaviour log-probs come from: behaviour (the sampler's record) or recompute
    /// (the trainer's recomputation, keeping the record for a correction).
    #[arg(long, value_parser = config_name::<OldLogprobSource>)]
    pub old_logprobs: Option<OldLogprobSource>,
    /// Episodes per replay prompt (G).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Replay prompts this round.
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Where groups come from.
    #[arg(long, value_enum)]
    pub source: Option<SourceArg>,
    /// CPU threads for the trainer (0: all cores but one).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Replay questions (JSONL, the retail data set's format); default: the config's, else
    /// `data/questions.jsonl` beside the config when present, else logged train questions.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Train a new adapter on the base model even when one is promoted.
    #[arg(long)]
    pub from_base: bool,
    /// Where adapter folders go; default: the config's `learn.adapters_dir`, else `adapters`
    /// beside the config.
    #[arg(long)]
    pub adapters_dir: Option<PathBuf>,
}

/// `--source`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SourceArg {
    /// Fresh groups sampled now on train questions.
    Replay,
    /// Logged episodes with host feedback.
    Feedback,
    /// Both.
    Both,
}

/// Parses a value by the name config files give it, so that the command line and the config
/// accept the same words.
fn config_name<T: serde::de::DeserializeOwned>(name: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|e| e.to_string())
}

/// Options of `searchloop eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The adapter version to evaluate (its merged model); default: the base model.
    #[arg(long)]
    pub adapter: Option<u64>,
    /// How many held-out questions.
    #[arg(long, default_value_t = 16)]
    pub questions: usize,
    /// The question file; default: the config's `learn.eval.set`, else `data/questions.jsonl`
    /// beside the config.
    #[arg(long)]
    pub set: Option<PathBuf>,
    /// Seed of the episodes (question `i` uses `seed + i`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Options of `searchloop plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// Metrics files (`metrics.jsonl` of one or more rounds, drawn in order on one step axis).
    #[arg(required = true)]
    pub metrics: Vec<PathBuf>,
    /// The image to write: `.svg` or `.png`.
    #[arg(long)]
    pub out: PathBuf,
}

/// The folder of the config file, against which default paths are taken.
fn config_dir(config_path: &Path) -> PathBuf {
    config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The round settings of the config's `[learn.round]`, or the defaults, on the trainer's
/// device (the round's own, else the model's).
fn configured_round(config: &AppConfig) -> RoundConfig {
    let mut round = config
        .learn
        .as_ref()
        .map(|learn| learn.round.clone())
        .unwrap_or_default();
    round.device = Some(config.trainer_device());
    round
}

/// Applies the command-line overrides to `round`.
fn apply_overrides(round: &mut RoundConfig, args: &TrainArgs) {
    let loss = &mut round.trainer.loss;
    if let Some(kind) = args.loss {
        loss.kind = kind;
    }
    if let Some(w) = args.w {
        loss.sapo_weight = w;
    }
    if let Some(t) = args.t {
        loss.sapo_threshold = t;
    }
    if let Some(lambda) = args.llds_lambda {
        loss.llds_lambda = lambda;
    }
    if let Some(high) = args.clip_eps_high {
        loss.clip_eps_high = Some(high);
    }
    if let Some(correction) = args.is_correction {
        loss.is_correction = correction;
    }
    if let Some(min) = args.is_min {
        loss.is_min = Some(min);
    }
    if let Some(max) = args.is_max {
        loss.is_max = Some(max);
    }
    if let Some(source) = args.old_logprobs {
        round.trainer.old_logprobs = source;
    }
    if let Some(g) = args.group_size {
        round.group_size = g;
    }
    if let Some(p) = args.prompts {
        round.prompts_per_round = p;
    }
    if let Some(lr) = args.lr {
        round.trainer.learning_rate = lr;
    }
    if let Some(threads) = args.threads {
        round.threads = threads;
    }
    if let Some(source) = args.source {
        round.source = match source {
            SourceArg::Replay => GroupSource::Replay,
            SourceArg::Feedback => GroupSource::Feedback,
            SourceArg::Both => GroupSource::Both,
        };
    }
    if let Some(steps) = args.steps.filter(|&s| s > 0) {
        let expected = (round.group_size * round.prompts_per_round).max(1);
        let mini = expected.div_ceil(steps.min(expected));
        round.trainer.mini_batch_size = mini;
        round.trainer.micro_batch_size = round.trainer.micro_batch_size.min(mini);
        round.trainer.ppo_epochs = steps.div_ceil(expected.div_ceil(mini));
    }
}

/// Shows a round's progress on one bar: episodes while sampling, then optimizer steps.
struct RoundBar(ProgressBar);

impl RoundBar {
    fn new() -> anyhow::Result<Self> {
        let bar = ProgressBar::new(0);
        bar.set_style(ProgressStyle::with_template(
            "{prefix:>9} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )?);
        bar.set_prefix("starting");
        Ok(Self(bar))
    }
}

impl RoundObserver for RoundBar {
    fn rollouts(&self, done: usize, total: usize) {
        self.0.set_prefix("sampling");
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }

    fn training(&self, planned_steps: usize, sequences: usize) {
        self.0.set_prefix("training");
        self.0.set_length(planned_steps as u64);
        self.0.set_position(0);
        self.0.set_message(format!("{sequences} sequences"));
    }

    fn step(&self, m: &StepMetrics) {
        self.0.inc(1);
        self.0.set_message(format!(
            "loss {:+.4}  ratio {:.3}  clip {:.3}  sapo {:.3}  |g| {:.3}",
            m.loss.loss, m.loss.ratio_mean, m.loss.clip_frac, m.loss.sapo_active_frac, m.grad_norm
        ));
    }

    fn writing(&self) {
        self.0.set_prefix("writing");
        self.0.set_message("PEFT adapter and merged GGUF");
    }
}

/// `searchloop train --once`.
pub async fn train(config: &AppConfig, config_path: &Path, args: TrainArgs) -> anyhow::Result<()> {
    let config = config.clone();
    let dir = config_dir(config_path);
    let mut round = configured_round(&config);
    apply_overrides(&mut round, &args);
    if let Some(q) = &args.questions {
        round.prompts = Some(q.clone());
    } else if round.prompts.is_none() && dir.join("data/questions.jsonl").is_file() {
        round.prompts = Some(dir.join("data/questions.jsonl"));
    }
    round.validate()?;
    let adapters_dir = match (&args.adapters_dir, &config.learn) {
        (Some(d), _) => d.clone(),
        (None, Some(learn)) => learn.adapters_dir.clone(),
        (None, None) => dir.join("adapters"),
    };
    let base = match &config.model.path {
        Some(p) => p.clone(),
        None => searchloop_runtime::default_model::ensure()?,
    };
    eprintln!("loading the model…");
    let runtime = Runtime::start(config.clone()).await?;
    let store = runtime.store();
    let parent = match store.promoted().await? {
        Some(record) if !args.from_base => Some(record),
        _ => None,
    };
    if let Some(p) = &parent {
        // Replay episodes are sampled by the promoted model, the one the adapter continues.
        let merged = Path::new(&p.path).join(MERGED_FILE);
        let policy = service::load_policy(&config.model, Some(&merged), Some(p.version)).await?;
        runtime.agent().policy().swap(policy);
        eprintln!("training from promoted adapter v{}", p.version);
    }
    let cancel = AtomicBool::new(false);
    let parent_dir = parent.as_ref().map(|p| PathBuf::from(&p.path));
    let ctx = RoundContext {
        agent: runtime.agent(),
        store,
        base_gguf: &base,
        parent: parent.as_ref().map(|p| p.version),
        parent_adapter_dir: parent_dir.as_deref(),
        adapters_dir: &adapters_dir,
        cancel: &cancel,
    };
    let bar = RoundBar::new()?;
    let result = run_round_observed(&ctx, &round, &bar).await;
    bar.0.finish_and_clear();
    let out = result?;
    let s = &out.summary;
    println!("candidate adapter v{}", out.candidate.version);
    println!("  folder   {}", out.adapter_dir.display());
    println!("  merged   {}", out.merged_gguf.display());
    println!("  metrics  {}", out.metrics_jsonl.display());
    println!(
        "  batch    {} episodes ({} replay, {} feedback, {} of them against a running \
         baseline) in {} groups, {} with equal rewards; reward {:.3} ± {:.3}",
        s.batch.sequences,
        s.batch.replay_sequences,
        s.batch.feedback_sequences,
        s.batch.baselined_sequences,
        s.batch.groups,
        s.batch.zero_std_groups,
        s.batch.reward_mean,
        s.batch.reward_std
    );
    println!(
        "  training {} steps on {} sequences, {:.1} s ({:.0} tokens/s); sampling {:.1} s",
        s.steps,
        s.trained_sequences,
        s.train_seconds,
        s.trained_tokens as f64 / s.train_seconds.max(1e-9),
        s.rollout_seconds
    );
    if let (Some(gap), Some(max)) = (s.logprob_gap, s.logprob_gap_max) {
        println!("  sampler/trainer |log-prob gap|: mean {gap:.2e}, max {max:.2e}");
    }
    store.close().await;
    Ok(())
}

/// `searchloop eval`.
pub async fn eval(config: &AppConfig, config_path: &Path, args: EvalArgs) -> anyhow::Result<()> {
    let set = match (&args.set, &config.learn) {
        (Some(s), _) => s.clone(),
        (None, Some(learn)) if !learn.eval.set.as_os_str().is_empty() => learn.eval.set.clone(),
        _ => config_dir(config_path).join("data/questions.jsonl"),
    };
    if args.questions == 0 {
        bail!("--questions must be at least 1");
    }
    let items = read_eval_items(&set, args.questions)?;
    let merged = match args.adapter {
        Some(v) => {
            let store = Store::open_with(&config.store.url, config.store.options()).await?;
            let record = store.get_adapter(v).await?;
            store.close().await;
            let record = record.with_context(|| format!("adapter v{v} is not registered"))?;
            Some(Path::new(&record.path).join(MERGED_FILE))
        }
        None => None,
    };
    eprintln!("loading the model…");
    let policy = service::load_policy(&config.model, merged.as_deref(), args.adapter).await?;
    let tools = Arc::new(service::build_tools(config).await?);
    // No sink: evaluation episodes are not training data.
    let agent = Agent::new(
        Arc::new(PolicySlot::new(policy)),
        tools,
        config.agent.clone(),
    )?;
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(ProgressStyle::with_template(
        "evaluating [{elapsed_precise}] {bar:30} {pos}/{len}",
    )?);
    let report = evaluate_observed(&agent, &items, args.seed, EVAL_CONCURRENCY, &|_, _| {
        bar.inc(1)
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    let model = match args.adapter {
        Some(v) => format!("adapter v{v}"),
        None => "base model".to_string(),
    };
    println!(
        "{model}: EM {:.3}  F1 {:.3}  mean reward {:.3}  ({} held-out questions from {}, seed {})",
        report.em,
        report.f1,
        report.mean_reward,
        report.n,
        set.display(),
        args.seed
    );
    if let Some(right) = report.right_tools {
        println!("  right tools called: {right:.3}");
    }
    for (kind, k) in &report.by_kind {
        let kind = if kind.is_empty() { "(no kind)" } else { kind };
        let tools = k
            .right_tools
            .map(|r| format!("  right tools {r:.3}"))
            .unwrap_or_default();
        println!(
            "  {kind}: EM {:.3}  F1 {:.3}  ({} questions){tools}",
            k.em, k.f1, k.n
        );
    }
    Ok(())
}

/// `searchloop plot`.
pub fn plot(args: PlotArgs) -> anyhow::Result<()> {
    let curves = searchloop_demo::plot::plot_metrics(&args.metrics, &args.out)?;
    println!(
        "{} optimizer steps from {} file(s) drawn to {}",
        curves.steps(),
        args.metrics.len(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(steps: Option<usize>) -> TrainArgs {
        TrainArgs {
            once: true,
            steps,
            loss: None,
            w: Some(0.0),
            t: Some(0.7),
            llds_lambda: None,
            clip_eps_high: None,
            is_correction: None,
            is_min: None,
            is_max: None,
            old_logprobs: None,
            group_size: Some(8),
            prompts: Some(4),
            lr: None,
            source: Some(SourceArg::Replay),
            threads: Some(2),
            questions: None,
            from_base: false,
            adapters_dir: None,
        }
    }

    #[test]
    fn steps_split_the_expected_batch() {
        for (steps, mini, epochs) in [(4, 8, 1), (8, 4, 1), (3, 11, 1), (64, 1, 2), (32, 1, 1)] {
            let mut round = RoundConfig::default();
            apply_overrides(&mut round, &args(Some(steps)));
            let t = &round.trainer;
            assert_eq!((t.mini_batch_size, t.ppo_epochs), (mini, epochs), "{steps}");
            assert!(t.micro_batch_size <= t.mini_batch_size);
            let per_epoch = 32usize.div_ceil(t.mini_batch_size);
            assert!(per_epoch * t.ppo_epochs >= steps);
        }
        let mut round = RoundConfig::default();
        apply_overrides(&mut round, &args(None));
        assert_eq!(round.trainer.loss.sapo_weight, 0.0);
        assert_eq!(round.trainer.loss.sapo_threshold, 0.7);
        assert_eq!(round.source, GroupSource::Replay);
        assert_eq!(round.threads, 2);
        round.validate().unwrap();
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    #[test]
    fn loss_flags_choose_the_loss_and_its_correction() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "train",
            "--once",
            "--loss",
            "llds",
            "--llds-lambda",
            "0.3",
            "--clip-eps-high",
            "0.28",
            "--is-correction",
            "tis",
            "--is-max",
            "3",
            "--old-logprobs",
            "recompute",
        ])
        .unwrap();
        let mut round = RoundConfig::default();
        apply_overrides(&mut round, &cli.train);
        let loss = &round.trainer.loss;
        assert_eq!(loss.kind, LossKind::Llds);
        assert_eq!(loss.llds_lambda, 0.3);
        assert_eq!(loss.clip_eps_high, Some(0.28));
        assert_eq!(loss.is_correction, IsCorrection::Tis);
        assert_eq!(loss.is_band(), Some((0.0, 3.0)));
        assert_eq!(round.trainer.old_logprobs, OldLogprobSource::Recompute);
        round.validate().unwrap();
        // Without recomputed log-probs the correction is refused before any work.
        let cli = Cli::try_parse_from(["train", "--once", "--is-correction", "mis"]).unwrap();
        let mut round = RoundConfig::default();
        apply_overrides(&mut round, &cli.train);
        let err = round.validate().unwrap_err().to_string();
        assert!(err.contains("old_logprobs"), "{err}");
        // Unknown names are refused by the parser, and the defaults stay without flags.
        assert!(Cli::try_parse_from(["train", "--once", "--loss", "ppo"]).is_err());
        let cli = Cli::try_parse_from(["train", "--once"]).unwrap();
        let mut round = RoundConfig::default();
        apply_overrides(&mut round, &cli.train);
        assert_eq!(round, RoundConfig::default());
    }
}
