//! `searchloop feedback`, `trajectories list|show|export` and `store stats`: the store, without
//! loading the model.

use std::{io::Write, path::PathBuf};

use anyhow::Context;
use searchloop_core::Split;
use searchloop_runtime::{AppConfig, service::open_store};
use searchloop_store_sql::{FeedbackInput, FeedbackOutcome, Page, PageToken, TrajectoryFilter};

/// Options of `searchloop feedback`.
#[derive(Debug, clap::Args)]
pub struct FeedbackArgs {
    /// The trajectory the feedback is about.
    pub trajectory_id: String,
    /// The feedback kind (`purchase`, `resolved`, `thumbs`, ...).
    pub source: String,
    /// The value, inside the store's configured range (default -1 to 1).
    #[arg(allow_negative_numbers = true)]
    pub value: f64,
    /// Weight in the training reward.
    #[arg(long, default_value_t = 1.0)]
    pub weight: f64,
    /// Deliveries with the same key count once.
    #[arg(long)]
    pub key: Option<String>,
}

/// `searchloop trajectories ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TrajectoriesCommand {
    /// List stored trajectories, newest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Continue after this page token (printed at the end of a page).
        #[arg(long)]
        page: Option<String>,
    },
    /// Show one trajectory: its question, turns, tool calls and rewards.
    Show {
        /// The trajectory id.
        id: String,
        /// Print the whole trajectory as JSON (token ids and log-probs included).
        #[arg(long)]
        json: bool,
    },
    /// Export trajectories as JSONL for a Python RL stack (schema: plugins/store-sql/EXPORT.md).
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        /// Output file (standard output when absent).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

/// `searchloop store ...`.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Counts by adapter version, split and reward source, and the store's size.
    Stats,
}

/// Filters shared by listing and export.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// Only this split (`train` or `heldout`).
    #[arg(long, value_parser = parse_split)]
    pub split: Option<Split>,
    /// Only episodes served by this adapter version (`base` for the base model).
    #[arg(long, value_parser = parse_version)]
    pub adapter: Option<Option<u64>>,
    /// Only episodes with at least one reward.
    #[arg(long)]
    pub rewarded: bool,
}

impl FilterArgs {
    fn filter(&self) -> TrajectoryFilter {
        TrajectoryFilter {
            split: self.split,
            adapter_version: self.adapter,
            rewarded_only: self.rewarded,
            ..TrajectoryFilter::default()
        }
    }
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "heldout" => Ok(Split::Heldout),
        other => Err(format!(
            "unknown split {other:?}: expected train or heldout"
        )),
    }
}

/// An adapter version, or `base` for the base model.
pub fn parse_version(s: &str) -> Result<Option<u64>, String> {
    if s == "base" {
        return Ok(None);
    }
    s.parse::<u64>()
        .map(Some)
        .map_err(|_| format!("invalid adapter version {s:?}: expected a number or base"))
}

/// Runs `searchloop feedback`.
pub async fn feedback(config: &AppConfig, args: FeedbackArgs) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let input = FeedbackInput {
        weight: args.weight,
        idempotency_key: args.key,
        ..FeedbackInput::new(args.source, args.value)
    };
    let outcome = store.add_feedback(&args.trajectory_id, input).await?;
    store.close().await;
    match outcome {
        FeedbackOutcome::Recorded => println!("recorded"),
        FeedbackOutcome::Duplicate => println!("duplicate (already recorded; nothing changed)"),
    }
    Ok(())
}

/// Runs `searchloop trajectories ...`.
pub async fn trajectories(config: &AppConfig, command: TrajectoriesCommand) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    match command {
        TrajectoriesCommand::List {
            filter,
            limit,
            page,
        } => {
            let after = page
                .map(|p| p.parse::<PageToken>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("invalid page token: {e}"))?;
            let page = store
                .list_trajectories(&filter.filter(), &Page { after, limit })
                .await?;
            for t in &page.items {
                let reward = t.reward.map_or("-".to_string(), |r| format!("{r:.2}"));
                let adapter = t
                    .adapter_version
                    .map_or("base".to_string(), |v| format!("v{v}"));
                println!(
                    "{}  {}  {adapter:>5}  reward {reward:>5}  {}  →  {}",
                    t.id,
                    t.created_at.format("%Y-%m-%d %H:%M:%S"),
                    searchloop_core::tool::truncate_chars(&t.question, 60),
                    t.answer.as_deref().unwrap_or("(no answer)"),
                );
            }
            if let Some(next) = page.next {
                println!("next page: --page {next}");
            }
        }
        TrajectoriesCommand::Show { id, json } => {
            let t = store
                .get_trajectory(&id)
                .await?
                .with_context(|| format!("no trajectory with id {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("id:        {}", t.id);
                println!("created:   {}", t.created_at);
                println!("question:  {}", t.question);
                println!(
                    "answer:    {}",
                    t.answer.as_deref().unwrap_or("(no answer)")
                );
                println!(
                    "model:     {} (adapter {:?})",
                    t.model_id, t.adapter_version
                );
                println!(
                    "tokens:    {} ({} trained), {} turns, {:.0} ms",
                    t.tokens.len(),
                    t.loss_mask().iter().filter(|m| **m).count(),
                    t.turns,
                    t.timing.total_ms
                );
                for call in &t.tool_calls {
                    println!(
                        "tool:      {} {} → {}",
                        call.tool, call.arguments, call.observation
                    );
                }
                for r in &t.rewards {
                    println!(
                        "reward:    {} = {} (weight {}) at {}",
                        r.source, r.value, r.weight, r.at
                    );
                }
                println!("--- response\n{}", t.response_text);
            }
        }
        TrajectoriesCommand::Export { filter, out } => {
            let count = match out {
                Some(path) => {
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut writer = std::io::BufWriter::new(file);
                    let n = store.export_jsonl(&mut writer, &filter.filter()).await?;
                    writer.flush()?;
                    n
                }
                None => {
                    let mut stdout = std::io::BufWriter::new(std::io::stdout());
                    let n = store.export_jsonl(&mut stdout, &filter.filter()).await?;
                    stdout.flush()?;
                    n
                }
            };
            eprintln!("exported {count} trajectories");
        }
    }
    store.close().await;
    Ok(())
}

/// Runs `searchloop store stats`.
pub async fn store(config: &AppConfig, command: StoreCommand) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    match command {
        StoreCommand::Stats => {
            let stats = store.stats().await?;
            println!("backend:      {:?} ({})", stats.backend, store.location());
            println!(
                "trajectories: {} ({} rewarded, {} groups)",
                stats.trajectories, stats.rewarded_trajectories, stats.groups
            );
            println!(
                "rewards:      {} entries ({} host feedback)",
                stats.reward_entries, stats.feedback_entries
            );
            for v in &stats.by_adapter_version {
                let name = v
                    .adapter_version
                    .map_or("base".to_string(), |v| format!("v{v}"));
                println!("  served by {name:>5}: {}", v.trajectories);
            }
            for s in &stats.by_split {
                let name = match s.split {
                    Some(Split::Train) => "train",
                    Some(Split::Heldout) => "heldout",
                    None => "no split",
                };
                println!("  {name:>9}: {}", s.trajectories);
            }
            for c in store.reward_counts_by_source().await? {
                println!(
                    "  source {:<12} {} entries on {} trajectories, mean {:.3}",
                    c.source, c.entries, c.trajectories, c.mean_value
                );
            }
            println!(
                "adapters:     {} registered, promoted: {}",
                stats.adapters,
                stats
                    .promoted_adapter
                    .map_or("none (base model)".to_string(), |v| format!("v{v}"))
            );
            println!("size:         {} bytes", stats.size_bytes);
        }
    }
    store.close().await;
    Ok(())
}
