//! The learning-efficacy benchmark: GRPO (`w = 0`) against SAPO on the retail task, with the
//! embedded model, through the product's own closed loop.
//!
//! Every arm starts from the base model in a fresh workspace (the same data set, questions and
//! seeds) and runs K rounds. A round is what a deployment does: serve `--traffic` train-split
//! questions and deliver host feedback on them (a `purchase` reward of 1 when the answer was
//! right), then [`Runtime::train_now`]: replay groups sampled with the serving adapter plus the
//! logged feedback groups (their behaviour log-probs come from the adapter that served them, so
//! after the first round they are stale), `--epochs` PPO epochs over the batch, the eval gate on
//! held-out questions, and promotion when the gate passes. Several epochs and stale feedback
//! make the importance-sampling drift real, which is what the SAPO term is for.
//!
//! Writes `efficacy.md` (a table per round and arm), `efficacy.svg` and `efficacy.png` (held-out
//! EM and F1, reward, positive-token ratio tails, SAPO-active fraction and entropy by round) and
//! `efficacy.json` into `--out`, and prints the markdown.
//!
//! ```text
//! cargo bench -p searchloop-runtime --bench efficacy -- [--rounds 3] [--arms grpo,sapo,...] \
//!     [--traffic 8] [--group-size 4] [--prompts 2] [--epochs 2] [--lr 5e-5] [--eval 12] \
//!     [--threads 1] [--out DIR]
//! ```
//!
//! Arms: `grpo` (w = 0), `sapo` (w = 0.1, t = 0.8, the defaults), `sapo-w0.3`, `sapo-t0.6`.
//! `--tag TAG` labels this run's arms (`sapo, TAG`); `--render A/efficacy.json B/efficacy.json`
//! tabulates and draws earlier runs together without running anything (a process holds every
//! round's allocations, so on a 24 GiB machine long runs are best split one arm per process).

// A benchmark reports by panicking on a broken setup, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use common::Workspace;
use searchloop_demo::plot::{Panel, Series, draw_panels};
use searchloop_demo::retail::{self, Split};
use searchloop_learn::GroupSource;
use searchloop_loop::GateVerdict;
use searchloop_runtime::{RoundReport, Runtime};
use searchloop_store_sql::FeedbackInput;
use serde::{Deserialize, Serialize};

/// One configuration of the loss.
#[derive(Debug, Clone, Copy, Serialize)]
struct Arm {
    name: &'static str,
    /// SAPO weight `w`; 0 is plain GRPO.
    w: f64,
    /// SAPO threshold `t`.
    t: f64,
}

const ARMS: [Arm; 4] = [
    Arm {
        name: "grpo",
        w: 0.0,
        t: 0.8,
    },
    Arm {
        name: "sapo",
        w: 0.1,
        t: 0.8,
    },
    Arm {
        name: "sapo-w0.3",
        w: 0.3,
        t: 0.8,
    },
    Arm {
        name: "sapo-t0.6",
        w: 0.1,
        t: 0.6,
    },
];

struct Args {
    rounds: usize,
    arms: Vec<Arm>,
    traffic: usize,
    group_size: usize,
    prompts: usize,
    epochs: usize,
    /// Peak learning rate; absent keeps the round's default.
    learning_rate: Option<f64>,
    eval: usize,
    threads: usize,
    out: PathBuf,
    /// Appended to each arm's name in the report, e.g. the learning rate of this run.
    tag: Option<String>,
    /// Earlier runs' `efficacy.json` files to draw and tabulate together instead of running.
    render: Vec<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        rounds: 3,
        arms: ARMS[..2].to_vec(),
        traffic: 8,
        group_size: 4,
        prompts: 2,
        epochs: 2,
        learning_rate: None,
        eval: 12,
        threads: 1,
        out: PathBuf::from("target/efficacy"),
        tag: None,
        render: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let number = |v: String| -> usize {
            v.parse()
                .unwrap_or_else(|_| panic!("{v} is not a whole number"))
        };
        match flag.as_str() {
            "--rounds" => args.rounds = number(value()),
            "--traffic" => args.traffic = number(value()),
            "--group-size" => args.group_size = number(value()),
            "--prompts" => args.prompts = number(value()),
            "--epochs" => args.epochs = number(value()),
            "--lr" => {
                let v = value();
                let lr: f64 = v
                    .parse()
                    .unwrap_or_else(|_| panic!("{v} is not a learning rate"));
                assert!(
                    lr.is_finite() && lr > 0.0,
                    "the learning rate must be positive"
                );
                args.learning_rate = Some(lr);
            }
            "--eval" => args.eval = number(value()),
            "--threads" => args.threads = number(value()),
            "--out" => args.out = PathBuf::from(value()),
            "--tag" => args.tag = Some(value()),
            "--render" => args.render.push(PathBuf::from(value())),
            "--arms" => {
                args.arms = value()
                    .split(',')
                    .map(|name| {
                        *ARMS.iter().find(|a| a.name == name).unwrap_or_else(|| {
                            panic!(
                                "unknown arm {name}; the arms are {:?}",
                                ARMS.map(|a| a.name)
                            )
                        })
                    })
                    .collect();
            }
            // cargo bench passes --bench.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !args.render.is_empty() || (args.rounds > 0 && !args.arms.is_empty()),
        "nothing to run"
    );
    args
}

/// What one round of one arm measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundRow {
    /// The arm's name, after `--tag` when one was given.
    arm: String,
    round: usize,
    /// Right answers among the round's served traffic (before training).
    traffic_em: f64,
    candidate: u64,
    incumbent: Option<u64>,
    candidate_em: Option<f64>,
    candidate_f1: Option<f64>,
    incumbent_em: Option<f64>,
    incumbent_f1: Option<f64>,
    promoted: bool,
    rejection: Option<String>,
    /// Mean training reward of the batch.
    reward_mean: f64,
    sequences: usize,
    zero_std_groups: usize,
    steps: usize,
    /// Token-weighted over the round's steps.
    ratio_mean: f64,
    ratio_min: f64,
    below_t_pos: f64,
    below_half_pos: f64,
    below_tenth_pos: f64,
    sapo_active: f64,
    clip_frac: f64,
    entropy: f64,
    logprob_gap: Option<f64>,
    round_seconds: f64,
}

fn row(arm: String, round: usize, traffic_em: f64, report: &RoundReport, seconds: f64) -> RoundRow {
    let steps = &report.train.steps;
    // Means over steps weighted by each step's token count (the positive fractions by its
    // positive tokens), so a small last mini-batch counts for what it holds.
    let weighted = |value: fn(&searchloop_train_sapo::LossMetrics) -> f64,
                    weight: fn(&searchloop_train_sapo::LossMetrics) -> usize| {
        let (sum, n) = steps
            .iter()
            .map(|s| (value(&s.loss), weight(&s.loss) as f64))
            .filter(|(v, n)| v.is_finite() && *n > 0.0)
            .fold((0.0, 0.0), |(sum, total), (v, n)| (sum + v * n, total + n));
        if n > 0.0 { sum / n } else { f64::NAN }
    };
    let (promoted, rejection) = match &report.verdict {
        GateVerdict::Promote => (true, None),
        GateVerdict::Reject { reason } => (false, Some(reason.clone())),
    };
    RoundRow {
        arm,
        round,
        traffic_em,
        candidate: report.candidate,
        incumbent: report.incumbent,
        candidate_em: report.candidate_eval.as_ref().map(|e| e.em),
        candidate_f1: report.candidate_eval.as_ref().map(|e| e.f1),
        incumbent_em: report.incumbent_eval.as_ref().map(|e| e.em),
        incumbent_f1: report.incumbent_eval.as_ref().map(|e| e.f1),
        promoted,
        rejection,
        reward_mean: report.train.reward_mean,
        sequences: report.train.trained_sequences,
        zero_std_groups: report.train.zero_std_groups,
        steps: steps.len(),
        ratio_mean: weighted(|l| l.ratio_mean, |l| l.tokens),
        ratio_min: steps
            .iter()
            .map(|s| s.loss.ratio_min)
            .filter(|r| r.is_finite())
            .fold(f64::NAN, f64::min),
        below_t_pos: weighted(|l| l.ratio_below_t_pos, |l| l.positive_tokens),
        below_half_pos: weighted(|l| l.ratio_below_half_pos, |l| l.positive_tokens),
        below_tenth_pos: weighted(|l| l.ratio_below_tenth_pos, |l| l.positive_tokens),
        sapo_active: weighted(|l| l.sapo_active_frac, |l| l.tokens),
        clip_frac: weighted(|l| l.clip_frac, |l| l.tokens),
        entropy: weighted(|l| l.entropy_mean, |l| l.tokens),
        logprob_gap: report.train.logprob_gap,
        round_seconds: seconds,
    }
}

/// Serves `count` train-split catalog questions (from `offset` on) and delivers a `purchase`
/// feedback on each: 1 when the answer matched the gold answer, else 0. Returns the fraction
/// that matched.
async fn serve_traffic(runtime: &Runtime, ws: &Workspace, offset: usize, count: usize) -> f64 {
    let train: Vec<_> = ws
        .questions
        .iter()
        .filter(|q| q.split == Split::Train && q.kind.tools() == [retail::TOOL_CATALOG])
        .collect();
    let mut right = 0usize;
    for i in 0..count {
        let q = train[(offset + i) % train.len()];
        let trajectory = runtime
            .run(ws.request(q, (offset + i) as u64))
            .await
            .unwrap();
        let em = trajectory
            .rewards
            .iter()
            .find(|r| r.source == "exact_match")
            .map_or(0.0, |r| r.value);
        right += usize::from(em > 0.5);
        runtime
            .store()
            .add_feedback(&trajectory.id, FeedbackInput::new("purchase", em))
            .await
            .unwrap();
    }
    right as f64 / count.max(1) as f64
}

async fn run_arm(args: &Args, arm: Arm) -> Vec<RoundRow> {
    let mut ws = Workspace::new(600);
    // The workspace serves the catalog tool alone, so replay and evaluation use the catalog
    // questions (both splits; each side reads its own).
    let questions = ws.dir.path().join("catalog-questions.jsonl");
    let lines: Vec<String> = ws
        .questions
        .iter()
        .filter(|q| q.kind.tools() == [retail::TOOL_CATALOG])
        .map(|q| serde_json::to_string(q).unwrap())
        .collect();
    std::fs::write(&questions, lines.join("\n")).unwrap();
    let mut learn = ws.learn_config(args.eval);
    learn.eval.set = questions.clone();
    learn.round.source = GroupSource::Both;
    learn.round.prompts = Some(questions);
    learn.round.group_size = args.group_size;
    learn.round.prompts_per_round = args.prompts;
    learn.round.threads = args.threads;
    learn.round.trainer.ppo_epochs = args.epochs;
    learn.round.trainer.mini_batch_size = 4;
    learn.round.trainer.micro_batch_size = 1;
    // One sequence per micro-batch, as when these figures were first recorded.
    learn.round.trainer.micro_batch_tokens = 0;
    if let Some(lr) = args.learning_rate {
        learn.round.trainer.learning_rate = lr;
    }
    learn.round.trainer.loss.sapo_weight = arm.w;
    learn.round.trainer.loss.sapo_threshold = arm.t;
    learn.memory_cap_mb = 16_000;
    ws.config.learn = Some(learn);
    let runtime = Arc::new(Runtime::start(ws.config.clone()).await.unwrap());
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        let started = Instant::now();
        let traffic_em =
            serve_traffic(&runtime, &ws, (round - 1) * args.traffic, args.traffic).await;
        let report = runtime.train_now().await.unwrap();
        let label = match &args.tag {
            Some(tag) => format!("{}, {tag}", arm.name),
            None => arm.name.to_string(),
        };
        let r = row(
            label,
            round,
            traffic_em,
            &report,
            started.elapsed().as_secs_f64(),
        );
        eprintln!("{}", serde_json::to_string(&r).unwrap());
        rows.push(r);
    }
    runtime.store().close().await;
    rows
}

fn cell(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.3}"))
}

/// What every round of this run did, as a sentence.
fn settings(args: &Args) -> String {
    format!(
        "{} rounds per arm; each round: {} served train questions with purchase feedback, \
         replay groups of {} for {} prompts, {} PPO epochs (mini-batches of 4) at learning rate \
         {}, the eval gate on {} held-out questions.\n\n",
        args.rounds,
        args.traffic,
        args.group_size,
        args.prompts,
        args.epochs,
        args.learning_rate
            .map_or_else(|| "5e-5 (the default)".to_string(), |lr| format!("{lr:e}")),
        args.eval
    )
}

/// The rounds as a markdown table, then the gate's rejections.
fn table(rows: &[RoundRow]) -> String {
    let mut md = String::from(
        "| arm | round | traffic EM | candidate EM / F1 | incumbent EM / F1 | gate | batch reward \
         | seqs (zero-std groups) | steps | ratio mean / min | r<t, A≥0 | r<0.5, A≥0 | r<0.1, A≥0 \
         | SAPO active | clipped | entropy | round s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let gate = if r.promoted {
            format!("promoted v{}", r.candidate)
        } else {
            format!("rejected v{}", r.candidate)
        };
        md.push_str(&format!(
            "| {} | {} | {:.2} | {} / {} | {} / {} | {} | {:.3} | {} ({}) | {} | {:.3} / {:.3} | \
             {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} |\n",
            r.arm,
            r.round,
            r.traffic_em,
            cell(r.candidate_em),
            cell(r.candidate_f1),
            cell(r.incumbent_em),
            cell(r.incumbent_f1),
            gate,
            r.reward_mean,
            r.sequences,
            r.zero_std_groups,
            r.steps,
            r.ratio_mean,
            r.ratio_min,
            r.below_t_pos,
            r.below_half_pos,
            r.below_tenth_pos,
            r.sapo_active,
            r.clip_frac,
            r.entropy,
            r.round_seconds,
        ));
    }
    let rejected: Vec<_> = rows
        .iter()
        .filter_map(|r| {
            Some(format!(
                "{} round {}: {}",
                r.arm,
                r.round,
                r.rejection.as_ref()?
            ))
        })
        .collect();
    if !rejected.is_empty() {
        md.push_str("\nGate rejections:\n");
        for line in rejected {
            md.push_str(&format!("- {line}\n"));
        }
    }
    md
}

/// Draws one curve per arm (in order of first appearance) against the round.
fn plot(rows: &[RoundRow], out: &Path) {
    let mut arms: Vec<&str> = Vec::new();
    for r in rows {
        if !arms.contains(&r.arm.as_str()) {
            arms.push(&r.arm);
        }
    }
    let by_arm = |value: fn(&RoundRow) -> Option<f64>| -> Vec<Series> {
        arms.iter()
            .map(|arm| Series {
                label: arm.to_string(),
                points: rows
                    .iter()
                    .filter(|r| r.arm == *arm)
                    .filter_map(|r| Some((r.round as f64, value(r)?)))
                    .filter(|(_, y)| y.is_finite())
                    .collect(),
                band: Vec::new(),
            })
            .collect()
    };
    let panel = |title: &str, series| Panel {
        title: title.to_string(),
        x_label: "round".to_string(),
        series,
    };
    let panels = [
        panel("held-out EM of the candidate", by_arm(|r| r.candidate_em)),
        panel("held-out F1 of the candidate", by_arm(|r| r.candidate_f1)),
        panel("batch reward", by_arm(|r| Some(r.reward_mean))),
        panel(
            "r < 0.1 on A >= 0 tokens",
            by_arm(|r| Some(r.below_tenth_pos)),
        ),
        panel("r < t on A >= 0 tokens", by_arm(|r| Some(r.below_t_pos))),
        panel("SAPO-active fraction", by_arm(|r| Some(r.sapo_active))),
        panel("ratio mean", by_arm(|r| Some(r.ratio_mean))),
        panel("clip fraction", by_arm(|r| Some(r.clip_frac))),
        panel("entropy (nats)", by_arm(|r| Some(r.entropy))),
    ];
    let rounds = rows.iter().map(|r| r.round).max().unwrap_or(1);
    for name in ["efficacy.svg", "efficacy.png"] {
        draw_panels(&panels, (3, 3), rounds as f64, &out.join(name)).unwrap();
    }
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.out).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut rows = Vec::new();
    let md = if args.render.is_empty() {
        for arm in &args.arms {
            eprintln!("arm {} (w = {}, t = {})", arm.name, arm.w, arm.t);
            rows.extend(runtime.block_on(run_arm(&args, *arm)));
        }
        settings(&args) + &table(&rows)
    } else {
        #[derive(Deserialize)]
        struct Run {
            rounds: Vec<RoundRow>,
        }
        for path in &args.render {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let run: Run = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not an efficacy.json: {e}", path.display()));
            rows.extend(run.rounds);
        }
        table(&rows)
    };
    std::fs::write(args.out.join("efficacy.md"), &md).unwrap();
    // A rendering runs no arm; its rows carry their own names.
    let arms_run: &[Arm] = if args.render.is_empty() {
        &args.arms
    } else {
        &[]
    };
    std::fs::write(
        args.out.join("efficacy.json"),
        serde_json::to_string_pretty(&serde_json::json!({"arms": arms_run, "rounds": rows}))
            .unwrap(),
    )
    .unwrap();
    plot(&rows, &args.out);
    println!("{md}");
    println!(
        "{:.0} s in all; plots and data in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
}
