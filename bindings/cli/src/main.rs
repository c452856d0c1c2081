//! The `searchloop` command-line tool: the demo, indexing, asking, the store, and the model.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use searchloop_core::Device;
use searchloop_runtime::{AppConfig, Runtime};

mod adapters_cmd;
mod demo;
mod learn_cmd;
mod serve_cmd;
mod store_cmd;
mod train_cmd;

/// searchloop: a search agent that learns from its own traffic.
#[derive(Debug, Parser)]
#[command(name = "searchloop", version, about, long_about = None)]
struct Cli {
    /// The config file (TOML or JSON). `searchloop demo` writes one in its work folder.
    #[arg(
        long,
        global = true,
        env = "SEARCHLOOP_CONFIG",
        default_value = "searchloop-data/searchloop.toml"
    )]
    config: PathBuf,
    /// Serve (and train) on this device instead of the config's `[model] device`: `cpu` or
    /// `cuda:N` (which needs a build with the `cuda` feature, see scripts/build-cuda.sh).
    #[arg(long, global = true, env = "SEARCHLOOP_DEVICE")]
    device: Option<Device>,
    #[command(subcommand)]
    command: Command,
}

/// Reads the config at `path`, with the command line's device in place of its own.
pub fn load_config(path: &Path, device: Option<Device>) -> anyhow::Result<AppConfig> {
    let mut config = AppConfig::load(path)?;
    if let Some(device) = device {
        config.model.device = device;
        config
            .validate()
            .with_context(|| format!("{} with --device {device}", path.display()))?;
    }
    Ok(config)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: prepare the retail data set and catalog, run the agent on held-out
    /// questions with the embedded default model, print its searches and answers, and score
    /// them (EM/F1).
    Demo(demo::DemoArgs),
    /// Show the agent learning: closed-loop rounds (replay groups, training, the eval gate,
    /// promotion) on the demo's data set for each policy loss and seed, with the served
    /// model's held-out scores per question kind after each round, a catalog it never saw
    /// evaluated before and after, and a report with learning curves. Resumes after a kill.
    Learn(learn_cmd::LearnArgs),
    /// Build or update the catalog index of every catalog tool in the config.
    Index {
        /// Index these JSONL or CSV files (upsert by SKU) instead of the configured ones.
        files: Vec<PathBuf>,
        /// Rebuild from scratch instead of updating.
        #[arg(long)]
        rebuild: bool,
    },
    /// Ask the agent one question and print its answer, searches and trajectory id.
    Ask {
        /// The question.
        question: String,
    },
    /// Attach host feedback (a reward) to a stored trajectory.
    Feedback(store_cmd::FeedbackArgs),
    /// Inspect and export stored trajectories.
    #[command(subcommand)]
    Trajectories(store_cmd::TrajectoriesCommand),
    /// The trajectory store.
    #[command(subcommand)]
    Store(store_cmd::StoreCommand),
    /// Manage the embedded default model.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Run one training round: sample replay groups and read logged feedback, train a LoRA
    /// candidate with GRPO + SAPO, and register it with its merged model.
    Train(train_cmd::TrainArgs),
    /// Score the base model or an adapter on held-out questions (EM/F1).
    Eval(train_cmd::EvalArgs),
    /// Draw training curves from rounds' metrics files.
    Plot(train_cmd::PlotArgs),
    /// The adapter registry: list, show, promote, roll back.
    #[command(subcommand)]
    Adapters(adapters_cmd::AdaptersCommand),
    /// Serve the agent over HTTP (ask, feedback, trajectories, health, Prometheus metrics) until
    /// Ctrl-C or SIGTERM; the episodes in flight finish before it exits.
    Serve(serve_cmd::ServeArgs),
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Fetch and verify the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) if it is not
    /// cached yet, and print its path.
    Fetch,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEARCHLOOP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One clear line: the error and its causes, no backtrace (a `learn` run's process
            // has printed its own).
            if error.downcast_ref::<learn_cmd::RunFailed>().is_none() {
                eprintln!("error: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let device = cli.device;
    let config = || load_config(&cli.config, device);
    match cli.command {
        Command::Model(ModelCommand::Fetch) => {
            let path = searchloop_runtime::default_model::ensure()?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Demo(args) => tokio_runtime()?.block_on(demo::run(args, device)),
        Command::Learn(args) => tokio_runtime()?.block_on(learn_cmd::run(args, device)),
        Command::Index { files, rebuild } => index(&config()?, &files, rebuild),
        Command::Ask { question } => tokio_runtime()?.block_on(ask(config()?, &question)),
        Command::Feedback(args) => tokio_runtime()?.block_on(store_cmd::feedback(&config()?, args)),
        Command::Trajectories(command) => {
            tokio_runtime()?.block_on(store_cmd::trajectories(&config()?, command))
        }
        Command::Store(command) => tokio_runtime()?.block_on(store_cmd::store(&config()?, command)),
        Command::Train(args) => {
            tokio_runtime()?.block_on(train_cmd::train(&config()?, &cli.config, args))
        }
        Command::Eval(args) => {
            tokio_runtime()?.block_on(train_cmd::eval(&config()?, &cli.config, args))
        }
        Command::Plot(args) => train_cmd::plot(args),
        Command::Serve(args) => tokio_runtime()?.block_on(serve_cmd::run(config()?, args)),
        Command::Adapters(command) => {
            tokio_runtime()?.block_on(adapters_cmd::run(&config()?, command))
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn index(config: &AppConfig, files: &[PathBuf], rebuild: bool) -> anyhow::Result<()> {
    let catalogs: Vec<_> = config
        .tools
        .iter()
        .filter_map(|t| match t {
            searchloop_runtime::config::ToolSection::Catalog(c) => Some(c),
            _ => None,
        })
        .collect();
    anyhow::ensure!(
        !catalogs.is_empty(),
        "the config has no catalog tool to index"
    );
    for catalog in catalogs {
        let sources: Vec<PathBuf> = if files.is_empty() {
            catalog.products.clone()
        } else {
            files.to_vec()
        };
        let report = searchloop_runtime::service::index_catalog(catalog, &sources, rebuild)
            .with_context(|| format!("indexing the catalog tool '{}'", catalog.name))?;
        println!(
            "{}: {} records indexed, {} products in {} ({:.1} s)",
            catalog.name,
            report.records,
            report.products,
            catalog.index.display(),
            report.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

async fn ask(config: AppConfig, question: &str) -> anyhow::Result<()> {
    let runtime = Runtime::start(config).await?;
    let t = runtime.ask(question).await?;
    for call in &t.tool_calls {
        println!("{}: {}", call.tool, call.arguments);
        println!(
            "  → {}",
            searchloop_core::tool::truncate_chars(&call.observation, 200)
        );
    }
    println!("answer: {}", t.answer.as_deref().unwrap_or("(no answer)"));
    println!("trajectory: {}  ({:.1} s)", t.id, t.timing.total_ms / 1e3);
    runtime.store().close().await;
    Ok(())
}
