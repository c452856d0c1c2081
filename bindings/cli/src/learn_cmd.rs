//! `searchloop learn`: the agent improving from its own traffic, shown. Closed-loop rounds on
//! the demo's retail data set (replay groups, training, the eval gate, promotion) for every arm
//! (a policy loss) and seed, with the served model's held-out scores per question kind printed
//! after each round, a second catalog of unseen product names and cities evaluated before and
//! after, and a report (JSON, markdown) and a learning-curve plot with a band over seeds.
//!
//! Every run keeps its own store and adapters under `WORKDIR/runs/<arm>-seed<N>`, and appends
//! one line per round to `rounds.jsonl` there once the round's verdict is in the registry. A
//! killed command started again skips the rounds those files record and goes on from the
//! registry's promoted adapter; a round killed half-way is cleaned up by the next one.
//!
//! Each run is a process of its own (this program again, with the hidden `--only-run`), and the
//! command writes the report from the runs' records once they are done. In one process the
//! resident memory grew by about 3.5 GB a run (serving engines, the gate's engines and the
//! trainer come and go each run) until a six-run benchmark was killed for memory; a process per
//! run hands everything back to the system when the run ends.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, bail};
use searchloop_core::{Agent, Device, PolicySlot, ProtocolConfig};
use searchloop_demo::{
    plot::{Panel, Series, draw_panels},
    retail::{GeneratorConfig, Vocabulary},
};
use searchloop_learn::{
    EVAL_CONCURRENCY, EvalReport, GroupSource, LearnError, Question, evaluate_observed,
    read_eval_items,
};
use searchloop_loop::{
    EvalConfig, GateVerdict, LoopError, RoundReport, SchedulerConfig, gate::ISDD_ALARM,
};
use searchloop_runtime::{AppConfig, Runtime, RuntimeError, service};
use serde::{Deserialize, Serialize};

use crate::demo::{prepare_workdir, start_help_center};

/// Share of each question kind held out. The demo's quarter leaves 121 held-out questions; a
/// learning curve wants at least 128 scored per point, so that one question moves EM by under
/// one percentage point.
const HELDOUT_FRACTION: f64 = 0.3;

/// Options of `searchloop learn`.
#[derive(Debug, clap::Args)]
pub struct LearnArgs {
    /// Work folder: the data sets, and one run folder per arm and seed.
    #[arg(long, default_value = "searchloop-learn")]
    pub workdir: PathBuf,
    /// Rounds per run.
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// Start no round after this many minutes of a run (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    pub minutes: f64,
    /// Policy losses to compare, comma-separated: grpo (plain GRPO), sapo (GRPO + SAPO),
    /// sapo-tis (SAPO with truncated importance sampling against the sampler), gspo, cispo, llds.
    #[arg(long, value_delimiter = ',', default_value = "sapo,grpo")]
    pub arms: Vec<String>,
    /// Runs per arm, seeded 1, 2, ...
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Held-out questions the gate and the curves score (greedy, fixed seeds).
    #[arg(long, default_value_t = 128)]
    pub eval: usize,
    /// Questions of the second catalog (unseen product names and cities), scored before the
    /// first round and after the last (0: none).
    #[arg(long, default_value_t = 64)]
    pub generalization: usize,
    /// Replay prompts per round.
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// Episodes per replay prompt (G).
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// PPO epochs over each round's batch.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// A curriculum by question kind: replay prompts only of these kinds, comma-separated
    /// (single_hop, multi_hop, inventory, store_info; empty: every kind).
    #[arg(long, value_delimiter = ',')]
    pub prompt_kinds: Vec<String>,
    /// Sampling temperature of replay episodes (serving and evaluation are greedy).
    #[arg(long, default_value_t = 1.0)]
    pub rollout_temperature: f32,
    /// Refill groups whose episodes all earn the same reward from further prompts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dynamic_sampling: bool,
    /// Add a teacher's demonstration of a question's worked solution to each replay group
    /// that found no answer as good (see `[learn.round] demonstrations`).
    #[arg(long)]
    pub demonstrations: bool,
    /// Start each run by imitating this many worked solutions (a warm-start round of teacher
    /// episodes under CISPO, gated like any round) before the replay rounds; 0: none (see
    /// `[learn.round] warm_start`).
    #[arg(long, default_value_t = 0)]
    pub warm_start: usize,
    /// Weight of the reward for calling the tools a question needs (0: none).
    #[arg(long, default_value_t = 0.1)]
    pub tool_reward: f64,
    /// Text written at the start of the turn after a tool's observation (the protocol's
    /// `after_observation_prefill`); empty lets the model choose its next action, another
    /// search or a tool call included. Unset: the protocol's default, `<answer>`.
    #[arg(long)]
    pub after_observation_prefill: Option<String>,
    /// The resident memory a run may reach, in MiB, before its round is stopped: the serving
    /// engine's cached prefixes, the gate's two evaluation engines and the trainer live in one
    /// process (a CPU round of 8 × 4 episodes reached 8 GiB).
    #[arg(long, default_value_t = 16_384)]
    pub memory_cap_mb: u64,
    /// CPU threads of the trainer (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where the report and the plot go; default `WORKDIR/report`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Runs only this arm and seed (`ARM:SEED`) and writes no report: how the command runs each
    /// of its runs in a process of its own.
    #[arg(long, hide = true)]
    pub only_run: Option<String>,
}

/// One round of one run, as `rounds.jsonl` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundLine {
    round: usize,
    /// The held-out scores of the model served after the round.
    served: Option<EvalReport>,
    /// The candidate's version and the gate's decision; `None` when the round had no data.
    candidate: Option<u64>,
    promoted: bool,
    reason: Option<String>,
    seconds: f64,
    rollout_seconds: f64,
    train_seconds: f64,
    informative_groups: usize,
    rollout_prompts: usize,
}

/// What one run (an arm and a seed) measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunReport {
    arm: String,
    seed: u64,
    /// The base model's held-out scores (round 0).
    base: Option<EvalReport>,
    rounds: Vec<RoundLine>,
    /// The second catalog, before the first round and after the last.
    generalization_before: Option<EvalReport>,
    generalization_after: Option<EvalReport>,
    device: String,
}

/// `searchloop learn`.
pub async fn run(args: LearnArgs, device: Option<Device>) -> anyhow::Result<()> {
    if args.rounds == 0 || args.seeds == 0 || args.eval == 0 {
        bail!("--rounds, --seeds and --eval must be at least 1");
    }
    for arm in &args.arms {
        arm_settings(arm)?;
    }
    let Some(only_run) = &args.only_run else {
        return run_each_in_a_process(&args).await;
    };
    let (arm, seed) = only_run
        .split_once(':')
        .and_then(|(arm, seed)| Some((arm, seed.parse::<u64>().ok()?)))
        .with_context(|| format!("--only-run takes ARM:SEED, not {only_run:?}"))?;
    arm_settings(arm)?;
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("cannot create {}", args.workdir.display()))?;
    let data = args.workdir.join("retail");
    let data_set = GeneratorConfig {
        heldout_fraction: HELDOUT_FRACTION,
        ..GeneratorConfig::default()
    };
    let config_path = prepare_workdir(&data, &data_set).await?;
    let heldout = read_eval_items(&data.join("data/questions.jsonl"), usize::MAX)?.len();
    if heldout < args.eval {
        eprintln!(
            "note: the data set holds {heldout} held-out questions, fewer than --eval {}; \
             every point scores those {heldout}",
            args.eval
        );
    }
    let _help = start_help_center(&data).await?;
    let mut base = crate::load_config(&config_path, device)?;
    // Serving and evaluation are greedy, so every held-out score is the model's own answer.
    base.agent.sampling.temperature = 0.0;
    base.agent.rewards.tool_choice = args.tool_reward;
    if let Some(prefill) = &args.after_observation_prefill {
        base.agent.protocol.after_observation_prefill =
            Some(prefill.clone()).filter(|p| !p.is_empty());
    }
    let unseen = if args.generalization > 0 {
        let dir = args.workdir.join("unseen");
        let path = prepare_workdir(
            &dir,
            &GeneratorConfig {
                seed: 4242,
                vocabulary: Vocabulary::Alternate,
                ..data_set
            },
        )
        .await?;
        let help = start_help_center(&dir).await?;
        let config = crate::load_config(&path, device)?;
        let items = read_eval_items(&dir.join("data/questions.jsonl"), args.generalization)?;
        Some((config, items, help))
    } else {
        None
    };
    run_one(&args, &base, arm, seed, &data, unseen.as_ref()).await
}

/// A run's process ended with an error, which it printed as its own one line: the command
/// fails with it and adds none.
#[derive(Debug)]
pub struct RunFailed;

impl std::fmt::Display for RunFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a run failed, and its process said why")
    }
}

impl std::error::Error for RunFailed {}

/// Runs every arm and seed, one after another, each in a process of its own, then writes the
/// report from their records.
async fn run_each_in_a_process(args: &LearnArgs) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("cannot find this program to start a run")?;
    let started = Instant::now();
    let mut reports = Vec::new();
    for arm in &args.arms {
        for seed in 1..=args.seeds {
            let status = tokio::process::Command::new(&program)
                .args(std::env::args_os().skip(1))
                .arg("--only-run")
                .arg(format!("{arm}:{seed}"))
                .kill_on_drop(true)
                .status()
                .await
                .with_context(|| format!("cannot start the run of {arm}, seed {seed}"))?;
            if !status.success() {
                if status.code().is_some() {
                    // The run's process printed its error line itself.
                    return Err(RunFailed.into());
                }
                bail!(
                    "the run of {arm}, seed {seed} was stopped ({status}); the rounds it \
                     finished are kept, and the same command goes on from them"
                );
            }
            let report = read_run(&run_dir(args, arm, seed), args.rounds)?
                .with_context(|| format!("the run of {arm}, seed {seed} left no record"))?;
            reports.push(report);
        }
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.workdir.join("report"));
    write_report(&reports, args, &out)?;
    println!(
        "\n{} runs in {:.1} min; report and plot in {}",
        reports.len(),
        started.elapsed().as_secs_f64() / 60.0,
        out.display()
    );
    Ok(())
}

/// The arms `learn` knows: one per policy loss, plus SAPO with the sampler correction.
const ARMS: &str = "grpo, sapo, sapo-tis, gspo, cispo, llds";

/// Sets `round` up for arm `name`. Every arm starts from the same defaults, so arms differ only
/// in their loss; SAPO's parameters are the design's (w 0.1, t 0.8).
fn arm_settings(name: &str) -> anyhow::Result<fn(&mut searchloop_learn::RoundConfig)> {
    use searchloop_train_sapo::{IsCorrection, LossKind, OldLogprobSource};
    Ok(match name {
        "grpo" => |r| {
            r.trainer.loss.kind = LossKind::Grpo;
            r.trainer.loss.sapo_weight = 0.0;
        },
        "sapo" => |r| {
            r.trainer.loss.kind = LossKind::Sapo;
            r.trainer.loss.sapo_weight = 0.1;
            r.trainer.loss.sapo_threshold = 0.8;
        },
        "sapo-tis" => |r| {
            r.trainer.loss.kind = LossKind::Sapo;
            r.trainer.loss.sapo_weight = 0.1;
            r.trainer.loss.sapo_threshold = 0.8;
            r.trainer.loss.is_correction = IsCorrection::Tis;
            r.trainer.old_logprobs = OldLogprobSource::Recompute;
        },
        "gspo" => |r| {
            r.trainer.loss.kind = LossKind::Gspo;
            r.trainer.loss.sapo_weight = 0.0;
        },
        "cispo" => |r| {
            r.trainer.loss.kind = LossKind::Cispo;
            r.trainer.loss.sapo_weight = 0.0;
        },
        "llds" => |r| {
            r.trainer.loss.kind = LossKind::Llds;
            r.trainer.loss.sapo_weight = 0.0;
        },
        other => bail!("unknown arm '{other}' (known: {ARMS})"),
    })
}

/// The app config of one run: the shared data set's tools, the run's own store and adapters,
/// and a `[learn]` section for the arm and seed.
fn run_config(
    args: &LearnArgs,
    base: &AppConfig,
    arm: &str,
    seed: u64,
    data: &Path,
    dir: &Path,
) -> anyhow::Result<AppConfig> {
    let mut config = base.clone();
    config.store.url = dir.join("searchloop.db").display().to_string();
    let mut learn = SchedulerConfig {
        adapters_dir: dir.join("adapters"),
        eval: EvalConfig {
            set: data.join("data/questions.jsonl"),
            questions: args.eval,
            seed: 0,
        },
        ..SchedulerConfig::default()
    };
    let round = &mut learn.round;
    round.source = GroupSource::Replay;
    round.prompts = Some(data.join("data/questions.jsonl"));
    round.prompts_per_round = args.prompts;
    round.group_size = args.group_size;
    round.rollout_temperature = Some(args.rollout_temperature);
    round.prompt_kinds = args.prompt_kinds.clone();
    round.dynamic_sampling = args.dynamic_sampling;
    round.demonstrations = args.demonstrations;
    round.warm_start = args.warm_start;
    round.seed = seed;
    round.lora.seed = seed;
    round.threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    round.trainer.learning_rate = args.lr;
    round.trainer.ppo_epochs = args.epochs;
    round.trainer.seed = seed;
    round.device = Some(config.trainer_device());
    arm_settings(arm)?(round);
    learn.memory_cap_mb = args.memory_cap_mb;
    // Rounds start when this command says, never on the scheduler's own triggers.
    learn.trigger.new_rewarded = None;
    learn.trigger.interval_minutes = Some(f64::MAX);
    config.learn = Some(learn);
    config.validate()?;
    Ok(config)
}

/// The folder of the run of `arm` with `seed`.
fn run_dir(args: &LearnArgs, arm: &str, seed: u64) -> PathBuf {
    args.workdir.join("runs").join(format!("{arm}-seed{seed}"))
}

/// The record of the run in `dir` with its first `rounds` rounds (a run that went further under
/// an earlier command is reported up to this command's rounds); `None` before the run wrote one.
fn read_run(dir: &Path, rounds: usize) -> anyhow::Result<Option<RunReport>> {
    let path = dir.join("run.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut report: RunReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a run record", path.display()))?;
    report.rounds = recorded_rounds(dir, rounds)?;
    Ok(Some(report))
}

/// The first `rounds` rounds that `rounds.jsonl` in the run folder `dir` records.
fn recorded_rounds(dir: &Path, rounds: usize) -> anyhow::Result<Vec<RoundLine>> {
    let mut recorded = read_rounds(&dir.join("rounds.jsonl"))?;
    recorded.truncate(rounds);
    Ok(recorded)
}

/// Runs the rounds of one arm and seed that its records do not hold yet.
async fn run_one(
    args: &LearnArgs,
    base: &AppConfig,
    arm: &str,
    seed: u64,
    data: &Path,
    unseen: Option<&(
        AppConfig,
        Vec<Question>,
        searchloop_demo::help_center::RunningHelpCenter,
    )>,
) -> anyhow::Result<()> {
    let dir = run_dir(args, arm, seed);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = run_config(args, base, arm, seed, data, &dir)?;
    let progress_path = dir.join("rounds.jsonl");
    let mut report = match read_run(&dir, args.rounds)? {
        Some(report) => report,
        None => RunReport {
            arm: arm.to_string(),
            seed,
            base: None,
            // Rounds recorded before the run's first record was written (a kill between the
            // two writes).
            rounds: recorded_rounds(&dir, args.rounds)?,
            generalization_before: None,
            generalization_after: None,
            device: config.model.device.to_string(),
        },
    };
    println!(
        "\n== {arm}, seed {seed}: {} of {} rounds done ({})",
        report.rounds.len(),
        args.rounds,
        dir.display()
    );
    if report.rounds.len() >= args.rounds
        && (unseen.is_none() || report.generalization_after.is_some())
    {
        return save_run(&dir, &report);
    }
    let runtime = Runtime::start(config.clone()).await?;
    if let Some(unseen) = unseen
        && report.generalization_before.is_none()
    {
        let scores = evaluate_unseen(&runtime, unseen).await?;
        print_scores("second catalog, base model", &scores);
        report.generalization_before = Some(scores);
        save_run(&dir, &report)?;
    }
    let started = Instant::now();
    while report.rounds.len() < args.rounds {
        if args.minutes > 0.0 && started.elapsed().as_secs_f64() > args.minutes * 60.0 {
            println!("  time budget of {} min spent", args.minutes);
            break;
        }
        let round = report.rounds.len() + 1;
        let round_started = Instant::now();
        let line = match runtime.train_now().await {
            Ok(outcome) => {
                if report.base.is_none() && outcome.incumbent.is_none() {
                    report.base = outcome.incumbent_eval.clone();
                    if let Some(base) = &report.base {
                        print_scores("held-out, base model", base);
                    }
                }
                round_line(round, &outcome, round_started)
            }
            Err(RuntimeError::Loop(LoopError::Learn(LearnError::NoData(reason)))) => RoundLine {
                round,
                served: report.rounds.last().and_then(|l| l.served.clone()),
                candidate: None,
                promoted: false,
                reason: Some(reason),
                seconds: round_started.elapsed().as_secs_f64(),
                rollout_seconds: 0.0,
                train_seconds: 0.0,
                informative_groups: 0,
                rollout_prompts: 0,
            },
            Err(e) => return Err(e).context(format!("round {round} of {arm}, seed {seed}")),
        };
        print_round(&line);
        append_round(&progress_path, &line)?;
        report.rounds.push(line);
        save_run(&dir, &report)?;
    }
    if let Some(unseen) = unseen {
        let scores = evaluate_unseen(&runtime, unseen).await?;
        print_scores("second catalog, served model", &scores);
        report.generalization_after = Some(scores);
        save_run(&dir, &report)?;
    }
    runtime.store().close().await;
    save_run(&dir, &report)
}

/// The served model's held-out scores after a round: the candidate's when it was promoted,
/// else the incumbent's (the gate measured both on the same questions and seeds).
fn round_line(round: usize, outcome: &RoundReport, started: Instant) -> RoundLine {
    let promoted = outcome.verdict == GateVerdict::Promote;
    let served = if promoted {
        outcome.candidate_eval.clone()
    } else {
        outcome.incumbent_eval.clone()
    };
    let summary = outcome.summary.as_ref();
    RoundLine {
        round,
        served,
        candidate: Some(outcome.candidate),
        promoted,
        reason: match &outcome.verdict {
            GateVerdict::Reject { reason } => Some(reason.clone()),
            GateVerdict::Promote => None,
        },
        seconds: started.elapsed().as_secs_f64(),
        rollout_seconds: summary.map_or(0.0, |s| s.rollout_seconds),
        train_seconds: summary.map_or(0.0, |s| s.train_seconds),
        informative_groups: summary.map_or(0, |s| s.informative_groups),
        rollout_prompts: summary.map_or(0, |s| s.rollout_prompts),
    }
}

/// The served model on the second catalog's tools and questions.
async fn evaluate_unseen(
    runtime: &Runtime,
    unseen: &(
        AppConfig,
        Vec<Question>,
        searchloop_demo::help_center::RunningHelpCenter,
    ),
) -> anyhow::Result<EvalReport> {
    let (config, items, _) = unseen;
    let tools = Arc::new(service::build_tools(config).await?);
    let agent = Agent::new(
        Arc::new(PolicySlot::new(runtime.agent().policy().current())),
        tools,
        runtime.agent().config().clone(),
    )?;
    Ok(evaluate_observed(&agent, items, 0, EVAL_CONCURRENCY, &|_, _| {}).await?)
}

fn read_rounds(path: &Path) -> anyhow::Result<Vec<RoundLine>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: line {} is not a round", path.display(), i + 1))
        })
        .collect()
}

fn append_round(path: &Path, line: &RoundLine) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(file, "{}", serde_json::to_string(line)?)?;
    file.sync_all()?;
    Ok(())
}

fn save_run(dir: &Path, report: &RunReport) -> anyhow::Result<()> {
    let path = dir.join("run.json");
    let temporary = dir.join(".run.json.tmp");
    std::fs::write(&temporary, serde_json::to_string_pretty(report)?)?;
    std::fs::rename(&temporary, &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn print_scores(what: &str, r: &EvalReport) {
    let tools = r
        .right_tools
        .map(|t| format!(", right tools {t:.2}"))
        .unwrap_or_default();
    println!(
        "  {what}: EM {:.3}  F1 {:.3}  ({} questions{tools})",
        r.em, r.f1, r.n
    );
    for (kind, k) in &r.by_kind {
        let tools = k
            .right_tools
            .map(|t| format!(", right tools {t:.2}"))
            .unwrap_or_default();
        println!(
            "    {kind:<12} EM {:.3}  F1 {:.3}  ({}{tools})",
            k.em, k.f1, k.n
        );
    }
}

fn print_round(line: &RoundLine) {
    let verdict = match (line.candidate, line.promoted) {
        (None, _) => "no candidate".to_string(),
        (Some(v), true) => format!("v{v} promoted"),
        (Some(v), false) => format!("v{v} rejected"),
    };
    println!(
        "  round {}: {verdict} in {:.0} s (sampling {:.0} s, {} of {} groups informative)",
        line.round,
        line.seconds,
        line.rollout_seconds,
        line.informative_groups,
        line.rollout_prompts
    );
    if let Some(reason) = &line.reason {
        println!("    {reason}");
    }
    if let Some(served) = &line.served {
        print_scores("held-out, served model", served);
    }
}

/// Mean, minimum and maximum of `values`.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((mean, lo, hi))
}

/// Held-out EM of a run after round `r` (0: the base model), carried forward past the last.
fn em_at(run: &RunReport, r: usize) -> Option<f64> {
    if r == 0 {
        return run.base.as_ref().map(|b| b.em);
    }
    run.rounds
        .iter()
        .take(r)
        .filter_map(|l| l.served.as_ref())
        .next_back()
        .map(|s| s.em)
        .or_else(|| run.base.as_ref().map(|b| b.em))
}

fn write_report(reports: &[RunReport], args: &LearnArgs, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(
        out.join("learning.json"),
        serde_json::to_string_pretty(reports)?,
    )?;
    let mut arms: Vec<&str> = Vec::new();
    for r in reports {
        if !arms.contains(&r.arm.as_str()) {
            arms.push(&r.arm);
        }
    }
    let mut md = format!(
        "Held-out EM of the served model after each round: mean over seeds (min–max). \
         lr {}, {} PPO epochs, {} prompts × {} episodes a round, rollout temperature {}, \
         tool reward {}, dynamic sampling {}, demonstrations {}, warm start {}, after an \
         observation the turn starts with {:?}, replay prompts of kinds {}.\n\n",
        args.lr,
        args.epochs,
        args.prompts,
        args.group_size,
        args.rollout_temperature,
        args.tool_reward,
        args.dynamic_sampling,
        args.demonstrations,
        args.warm_start,
        args.after_observation_prefill
            .clone()
            .or(ProtocolConfig::default().after_observation_prefill)
            .unwrap_or_default(),
        if args.prompt_kinds.is_empty() {
            "all".to_string()
        } else {
            args.prompt_kinds.join(", ")
        }
    );
    md.push_str("| arm | seeds | round 0 (base) |");
    for r in 1..=args.rounds {
        md.push_str(&format!(" round {r} |"));
    }
    md.push_str(
        " second catalog before → after | right tools before → after | candidates rejected \
         (by the ISDD alarm) |\n|---|---|---|",
    );
    md.push_str(&"---|".repeat(args.rounds + 3));
    md.push('\n');
    let mut series = Vec::new();
    for arm in &arms {
        let runs: Vec<&RunReport> = reports.iter().filter(|r| r.arm == *arm).collect();
        md.push_str(&format!("| {arm} | {} |", runs.len()));
        let mut points = Vec::new();
        let mut band = Vec::new();
        for round in 0..=args.rounds {
            let values: Vec<f64> = runs.iter().filter_map(|r| em_at(r, round)).collect();
            match spread(&values) {
                Some((mean, lo, hi)) => {
                    md.push_str(&format!(" {mean:.3} ({lo:.3}–{hi:.3}) |"));
                    points.push((round as f64, mean));
                    band.push((round as f64, lo, hi));
                }
                None => md.push_str(" – |"),
            }
        }
        let mean_of = |f: &dyn Fn(&RunReport) -> Option<f64>| {
            spread(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
                .map_or_else(|| "–".to_string(), |(m, _, _)| format!("{m:.3}"))
        };
        let candidates = runs
            .iter()
            .flat_map(|r| &r.rounds)
            .filter(|l| l.candidate.is_some());
        let rejected: Vec<&RoundLine> = candidates.clone().filter(|l| !l.promoted).collect();
        let alarms = rejected
            .iter()
            .filter(|l| {
                l.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with(ISDD_ALARM))
            })
            .count();
        md.push_str(&format!(
            " {} → {} | {} → {} | {} of {} ({alarms}) |\n",
            mean_of(&|r| r.generalization_before.as_ref().map(|g| g.em)),
            mean_of(&|r| r.generalization_after.as_ref().map(|g| g.em)),
            mean_of(&|r| r.base.as_ref().and_then(|b| b.right_tools)),
            mean_of(&|r| {
                r.rounds
                    .iter()
                    .filter_map(|l| l.served.as_ref())
                    .next_back()
                    .and_then(|s| s.right_tools)
            }),
            rejected.len(),
            candidates.count(),
        ));
        series.push(Series {
            label: (*arm).to_string(),
            points,
            band,
        });
    }
    md.push_str("\nHeld-out EM per question kind after the last round (mean over seeds):\n\n");
    let mut kinds: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for r in reports {
        let last = r
            .rounds
            .iter()
            .filter_map(|l| l.served.as_ref())
            .next_back()
            .or(r.base.as_ref());
        for (kind, k) in last.map(|s| s.by_kind.iter()).into_iter().flatten() {
            kinds
                .entry(kind.clone())
                .or_default()
                .entry(r.arm.clone())
                .or_default()
                .push(k.em);
        }
    }
    md.push_str("| kind |");
    for arm in &arms {
        md.push_str(&format!(" {arm} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(arms.len()));
    md.push('\n');
    for (kind, by_arm) in &kinds {
        md.push_str(&format!("| {kind} |"));
        for arm in &arms {
            let value = by_arm
                .get(*arm)
                .and_then(|v| spread(v))
                .map_or_else(|| "–".to_string(), |(m, _, _)| format!("{m:.3}"));
            md.push_str(&format!(" {value} |"));
        }
        md.push('\n');
    }
    std::fs::write(out.join("learning.md"), &md)?;
    let panel = Panel {
        // Short enough for the 500-pixel panel at the caption's font size.
        title: "held-out EM (mean; band: min–max over seeds)".into(),
        x_label: "round".into(),
        series,
    };
    for name in ["learning.svg", "learning.png"] {
        draw_panels(
            std::slice::from_ref(&panel),
            (1, 1),
            args.rounds.max(1) as f64,
            &out.join(name),
        )?;
    }
    println!("\n{md}");
    Ok(())
}
