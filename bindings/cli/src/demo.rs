//! `searchloop demo`: the main job end to end on the embedded default model. It prepares the
//! retail data set, the catalog index, the inventory database and a config in a work folder,
//! serves the help center on a loopback port, runs the agent on a sample of held-out questions,
//! prints each question with its searches and answer, and scores them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use searchloop_core::Device;
use searchloop_core::{EpisodeRequest, Split, TaskInfo, Trajectory, reward};
use searchloop_demo::help_center::RunningHelpCenter;
use searchloop_demo::retail::{self, GeneratorConfig, Question};
use searchloop_demo::{INVENTORY_CONFIG_TOML, seed_retail_inventory};
use searchloop_runtime::Runtime;

/// Options of `searchloop demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Work folder for the data set, the index, the config and the store.
    #[arg(long, default_value = "searchloop-data")]
    pub workdir: PathBuf,
    /// How many held-out questions to run.
    #[arg(long, default_value_t = 12)]
    pub questions: usize,
    /// Seed of the data set and of sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also print everything the model and the tools wrote.
    #[arg(long)]
    pub verbose: bool,
}

/// The demo's config: every setting not named here keeps its default (see the README).
const DEMO_CONFIG: &str = r#"# searchloop config written by `searchloop demo`. Paths are relative to this file.

# The embedded default model (SmolLM2-135M-Instruct); set `path` to serve another GGUF.
[model]

[[tools]]
kind = "catalog"
name = "catalog"
index = "index"
products = ["data/catalog.jsonl"]

# Stock per store, from the SQLite file the demo seeds from the same data set.
[[tools]]
kind = "sql"
file = "inventory.toml"

# Store addresses and opening hours, from the help center's HTTP search API. The demo serves it
# on a free loopback port and rewrites help.toml with that port on every run, so outside the
# demo this tool's calls fail (as observations) until a help center is served there.
[[tools]]
kind = "http"
file = "help.toml"

[store]
url = "searchloop.db"
"#;

/// Creates the work folder's data set (generated as `data` says) and config when missing, and
/// returns the config path.
pub async fn prepare_workdir(
    workdir: &Path,
    data_set: &GeneratorConfig,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(workdir)
        .with_context(|| format!("cannot create the work folder {}", workdir.display()))?;
    let data = workdir.join("data");
    if !data.join("questions.jsonl").is_file() {
        eprintln!(
            "generating the retail data set (seed {}) in {}",
            data_set.seed,
            data.display()
        );
        let dataset = retail::generate(data_set);
        dataset.write_to(&data)?;
    }
    let inventory = workdir.join("inventory.db");
    if !inventory.is_file() {
        eprintln!("seeding the inventory database {}", inventory.display());
        let url = format!("sqlite://{}", inventory.display());
        if let Err(e) = seed_retail_inventory(&url, &data).await {
            // A half-seeded file would be taken for a good one on the next run.
            let _ = std::fs::remove_file(&inventory);
            return Err(e).context("cannot seed the inventory database");
        }
    }
    let inventory_config = workdir.join("inventory.toml");
    if !inventory_config.is_file() {
        std::fs::write(&inventory_config, INVENTORY_CONFIG_TOML)
            .with_context(|| format!("cannot write {}", inventory_config.display()))?;
    }
    let config_path = workdir.join("searchloop.toml");
    if !config_path.is_file() {
        std::fs::write(&config_path, DEMO_CONFIG)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
    }
    Ok(config_path)
}

/// The task metadata of a generated question.
pub fn task_info(question: &Question) -> TaskInfo {
    TaskInfo {
        task_id: question.id.clone(),
        gold_answers: question.answers.clone(),
        split: match question.split {
            retail::Split::Train => Split::Train,
            retail::Split::Heldout => Split::Heldout,
        },
        kind: question.kind.as_str().to_string(),
        tools: question.tools.clone(),
    }
}

/// Serves the work folder's help center on a free loopback port and points `help.toml` at it;
/// the server stops when the returned handle is dropped.
pub async fn start_help_center(workdir: &Path) -> anyhow::Result<RunningHelpCenter> {
    let stores = retail::read_stores_jsonl(&workdir.join("data").join("stores.jsonl"))?;
    let center = RunningHelpCenter::start(&stores, ([127, 0, 0, 1], 0).into())
        .await
        .context("cannot serve the help center on a loopback port")?;
    let tool_config = workdir.join("help.toml");
    std::fs::write(&tool_config, center.tool_config_toml())
        .with_context(|| format!("cannot write {}", tool_config.display()))?;
    Ok(center)
}

/// Runs the demo.
pub async fn run(args: DemoArgs, device: Option<Device>) -> anyhow::Result<()> {
    let data_set = GeneratorConfig {
        seed: args.seed,
        ..GeneratorConfig::default()
    };
    let config_path = prepare_workdir(&args.workdir, &data_set).await?;
    let _help_center = start_help_center(&args.workdir).await?;
    let config = crate::load_config(&config_path, device)?;
    let questions = retail::read_questions(&args.workdir.join("data").join("questions.jsonl"))?;
    let sample = heldout_sample(&questions, args.questions);
    eprintln!("loading the model…");
    let runtime = Runtime::start(config).await?;
    println!(
        "searchloop demo: {} held-out questions, model {}",
        sample.len(),
        runtime.agent().policy().current().model_id()
    );
    let mut scores = Scores::default();
    for (i, question) in sample.iter().enumerate() {
        let request = EpisodeRequest {
            question: question.question.clone(),
            task: Some(task_info(question)),
            group_id: None,
            seed: Some(args.seed.wrapping_add(i as u64)),
        };
        let trajectory = runtime.run(request).await?;
        print_episode(i + 1, sample.len(), question, &trajectory);
        if args.verbose {
            println!("  ---\n{}\n  ---", trajectory.response_text);
        }
        scores.add(&trajectory, &question.answers);
    }
    scores.print();
    Ok(())
}

/// The first `n` held-out questions, alternating between question kinds so a small sample
/// still shows every kind.
fn heldout_sample(questions: &[Question], n: usize) -> Vec<&Question> {
    let mut by_kind: Vec<Vec<&Question>> = Vec::new();
    for q in questions
        .iter()
        .filter(|q| q.split == retail::Split::Heldout)
    {
        match by_kind.iter_mut().find(|k| k[0].kind == q.kind) {
            Some(kind) => kind.push(q),
            None => by_kind.push(vec![q]),
        }
    }
    let mut sample = Vec::with_capacity(n);
    let mut round = 0;
    while sample.len() < n && by_kind.iter().any(|k| k.len() > round) {
        for kind in &by_kind {
            if let Some(q) = kind.get(round).filter(|_| sample.len() < n) {
                sample.push(*q);
            }
        }
        round += 1;
    }
    sample
}

fn print_episode(i: usize, n: usize, question: &Question, t: &Trajectory) {
    println!(
        "\n[{i}/{n}] {}  ({})",
        question.question,
        question.kind.as_str()
    );
    for call in &t.tool_calls {
        let args = call
            .arguments
            .get("query")
            .and_then(|q| q.as_str())
            .map_or_else(|| call.arguments.to_string(), str::to_string);
        let first = call.observation.lines().next().unwrap_or("");
        println!("  {}: {args}", call.tool);
        println!(
            "    → {}",
            searchloop_core::tool::truncate_chars(first, 110)
        );
    }
    let answer = t.answer.as_deref().unwrap_or("(no answer)");
    let em = reward::exact_match(answer, &question.answers);
    let f1 = reward::f1_score(answer, &question.answers);
    println!(
        "  answer: {answer}   gold: {}   EM {em:.0}  F1 {f1:.2}   ({:.1} s, {} model tokens)",
        question.answers.first().map_or("", String::as_str),
        t.timing.total_ms / 1e3,
        t.loss_mask().iter().filter(|m| **m).count(),
    );
}

#[derive(Default)]
struct Scores {
    n: usize,
    em: f64,
    f1: f64,
    answered: usize,
    model_ms: f64,
    tool_ms: f64,
    total_ms: f64,
    model_tokens: usize,
}

impl Scores {
    fn add(&mut self, t: &Trajectory, golds: &[String]) {
        let answer = t.answer.as_deref().unwrap_or("");
        self.n += 1;
        self.em += reward::exact_match(answer, golds);
        self.f1 += reward::f1_score(answer, golds);
        self.answered += usize::from(t.answer.is_some());
        self.model_ms += t.timing.model_ms;
        self.tool_ms += t.timing.tool_ms;
        self.total_ms += t.timing.total_ms;
        self.model_tokens += t.loss_mask().iter().filter(|m| **m).count();
    }

    fn print(&self) {
        let n = self.n.max(1) as f64;
        println!("\n== {} questions", self.n);
        println!(
            "EM {:.3}   F1 {:.3}   answered {}/{}",
            self.em / n,
            self.f1 / n,
            self.answered,
            self.n
        );
        println!(
            "mean episode {:.2} s: model {:.2} s, tools {:.1} ms, loop {:.1} ms; {:.1} generated tok/s",
            self.total_ms / n / 1e3,
            self.model_ms / n / 1e3,
            self.tool_ms / n,
            (self.total_ms - self.model_ms - self.tool_ms).max(0.0) / n,
            self.model_tokens as f64 / (self.model_ms / 1e3).max(1e-9),
        );
    }
}
