//! Shared pieces of the runtime's integration tests: a small retail workspace (data set,
//! catalog, config, store), the embedded model, candidate adapters written as real merged
//! GGUFs, and a scripted loader whose model of each version answers in a recognisable way.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use searchloop_core::{EpisodeRequest, Policy, Split, TaskInfo, scripted::ScriptedPolicy};
use searchloop_demo::retail::{self, GeneratorConfig, Question};
use searchloop_llama::{GgufFile, LoraAdapter, LoraConfig, MergeEncoding, merge_into_gguf};
use searchloop_loop::{RoundCandidate, RoundJob, RoundRunner};
use searchloop_runtime::{
    AppConfig, PolicyLoader, SchedulerConfig,
    config::{CatalogSection, ToolSection},
};
use searchloop_store_sql::{AdapterRecord, NewAdapter, Store};
use searchloop_train_sapo::{StepMetrics, TrainReport};

/// The embedded default model: `$SEARCHLOOP_MODEL`, else the cache the project's test script
/// fills. Fails the test with a clear message when it is missing.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("SEARCHLOOP_MODEL")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| searchloop_runtime::default_model::cached_path().ok())
        .expect("no cache directory: set SEARCHLOOP_MODEL or HOME");
    assert!(
        path.is_file(),
        "the default model is missing at {}: run `searchloop model fetch` (or the project's test \
         script) first, or set SEARCHLOOP_MODEL",
        path.display()
    );
    path
}

/// A temporary retail workspace: data set, catalog index, store, and a config serving the real
/// model.
pub struct Workspace {
    /// Holds everything; removed on drop.
    pub dir: tempfile::TempDir,
    /// The config (absolute paths).
    pub config: AppConfig,
    /// The data set's questions.
    pub questions: Vec<Question>,
}

impl Workspace {
    /// A workspace with `products` products (seed 42) and the real model.
    pub fn new(products: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let dataset = retail::generate(&GeneratorConfig {
            seed: 42,
            products,
            ..GeneratorConfig::default()
        });
        let files = dataset.write_to(&data).unwrap();
        let mut config = AppConfig::default();
        config.model.path = Some(model_path());
        config.tools = vec![ToolSection::Catalog(CatalogSection {
            name: "catalog".into(),
            index: dir.path().join("index"),
            products: vec![files.catalog_jsonl],
            default_limit: 3,
            blocking_pool: false,
        })];
        config.store.url = dir.path().join("store.db").display().to_string();
        Self {
            dir,
            config,
            questions: dataset.questions,
        }
    }

    /// The data set's questions file.
    pub fn questions_file(&self) -> PathBuf {
        self.dir.path().join("data").join("questions.jsonl")
    }

    /// Where rounds and crafted candidates put adapters.
    pub fn adapters_dir(&self) -> PathBuf {
        self.dir.path().join("adapters")
    }

    /// A `[learn]` section over this workspace: `questions` held-out questions, count trigger
    /// only, polling every 100 ms.
    pub fn learn_config(&self, questions: usize) -> SchedulerConfig {
        let mut learn = SchedulerConfig {
            adapters_dir: self.adapters_dir(),
            ..SchedulerConfig::default()
        };
        learn.eval.set = self.questions_file();
        learn.eval.questions = questions;
        learn.trigger.new_rewarded = Some(1_000_000);
        learn.trigger.interval_minutes = None;
        learn.trigger.poll_seconds = 0.1;
        learn
    }

    /// An episode for question `q` with its gold answers (so it is rewarded).
    pub fn request(&self, q: &Question, seed: u64) -> EpisodeRequest {
        EpisodeRequest {
            question: q.question.clone(),
            task: Some(TaskInfo {
                task_id: q.id.clone(),
                gold_answers: q.answers.clone(),
                split: match q.split {
                    retail::Split::Train => Split::Train,
                    retail::Split::Heldout => Split::Heldout,
                },
                kind: q.kind.as_str().to_string(),
                tools: q.tools.clone(),
            }),
            group_id: None,
            seed: Some(seed),
        }
    }
}

/// Writes a candidate adapter's folder (the PEFT files and `merged.gguf`, the layout the
/// registry and searchloop-learn share) by merging a LoRA into the base model. `damage` sets
/// every `B` factor to normal noise of that standard deviation (a wrecked model); `None` keeps
/// `B` at zero, so the merged model computes exactly what the base does.
pub fn write_candidate(base: &Path, folder: &Path, damage: Option<f32>) -> PathBuf {
    std::fs::create_dir_all(folder).unwrap();
    let config = GgufFile::open(base).unwrap().config().unwrap();
    let adapter =
        LoraAdapter::new(LoraConfig::default(), &config, &Device::Cpu, DType::F32).unwrap();
    if let Some(std) = damage {
        for (_, pair) in adapter.pairs() {
            let noise = Tensor::randn(0f32, std, pair.b.as_tensor().shape(), &Device::Cpu).unwrap();
            pair.b.set(&noise).unwrap();
        }
    }
    // A complete adapter folder: the PEFT files a round trains on from it, and the merged model
    // that serves it.
    adapter
        .save_peft(folder, "HuggingFaceTB/SmolLM2-135M-Instruct")
        .unwrap();
    let merged = folder.join(searchloop_loop::adapters::MERGED_FILE);
    merge_into_gguf(base, &adapter, &merged, MergeEncoding::F32).unwrap();
    merged
}

/// Registers `folder` as a candidate adapter.
pub async fn register(store: &Store, folder: &Path, parent: Option<u64>) -> AdapterRecord {
    store
        .register_adapter(NewAdapter {
            content_hash: format!("test-{}", folder.display()),
            parent_version: parent,
            path: folder.display().to_string(),
            training_config: serde_json::json!({}),
            metrics_summary: serde_json::json!({}),
            created_at: None,
        })
        .await
        .unwrap()
}

/// What a scripted model of a given adapter version answers to a question.
pub type Answerer = dyn Fn(Option<u64>, &str) -> String + Send + Sync;

/// Loads scripted policies: the model of version `v` searches for the question, then answers
/// what `answer(v, question)` says. Loading takes `load_delay`, sampling `sample_delay` per
/// turn, so swaps and episodes overlap like real ones.
pub struct ScriptedLoader {
    answer: Arc<Answerer>,
    load_delay: Duration,
    sample_delay: Duration,
    /// Models loaded so far.
    pub loads: AtomicUsize,
}

impl ScriptedLoader {
    /// A loader whose models answer `answer(version, question)`.
    pub fn new(answer: impl Fn(Option<u64>, &str) -> String + Send + Sync + 'static) -> Self {
        Self {
            answer: Arc::new(answer),
            load_delay: Duration::ZERO,
            sample_delay: Duration::ZERO,
            loads: AtomicUsize::new(0),
        }
    }

    /// A loader whose models answer with their version (`base`, `v1`, ...).
    pub fn naming_versions() -> Self {
        Self::new(|version, _| version_name(version))
    }

    /// Sets the time a load and a model turn take.
    pub fn with_delays(mut self, load: Duration, sample: Duration) -> Self {
        self.load_delay = load;
        self.sample_delay = sample;
        self
    }
}

/// `base` or `v<N>`.
pub fn version_name(version: Option<u64>) -> String {
    version.map_or_else(|| "base".to_string(), |v| format!("v{v}"))
}

#[async_trait]
impl PolicyLoader for ScriptedLoader {
    async fn load(
        &self,
        merged: Option<&Path>,
        version: Option<u64>,
    ) -> searchloop_loop::Result<Arc<dyn Policy>> {
        if let Some(path) = merged {
            assert!(path.is_file(), "{} is not a file", path.display());
        }
        tokio::time::sleep(self.load_delay).await;
        self.loads.fetch_add(1, Ordering::SeqCst);
        let answer = self.answer.clone();
        let policy = ScriptedPolicy::new(move |context: &str| {
            if context.ends_with("<search>") {
                return "product</search>".to_string();
            }
            // The question is the user message of the scripted chat rendering.
            let question = context
                .split("<user>")
                .nth(1)
                .and_then(|rest| rest.split("</user>").next())
                .unwrap_or("");
            format!("{}</answer>", answer(version, question))
        })
        .with_adapter_version(version)
        .with_delay(self.sample_delay);
        Ok(Arc::new(policy))
    }
}

/// Writes an empty stand-in for a merged model: enough for a [`ScriptedLoader`].
pub fn write_stub_candidate(folder: &Path) {
    std::fs::create_dir_all(folder).unwrap();
    std::fs::write(folder.join(searchloop_loop::adapters::MERGED_FILE), b"GGUF").unwrap();
}

/// One optimizer step's metrics with the given ratio mean, fraction of positive-advantage tokens
/// below ratio 0.1, and entropy.
pub fn step(step: usize, ratio_mean: f64, collapsed: f64, entropy: f64) -> StepMetrics {
    let loss = serde_json::json!({
        "loss": 0.1, "pg_loss": 0.1, "sapo_loss": 0.0, "kl_ref_loss": 0.0,
        "tokens": 100, "positive_tokens": 60, "negative_tokens": 40,
        "ratio_mean": ratio_mean, "ratio_min": 0.0, "ratio_max": 2.0,
        "ratio_below_t_pos": collapsed, "ratio_below_t_neg": 0.0,
        "ratio_below_half_pos": collapsed, "ratio_below_half_neg": 0.0,
        "ratio_below_tenth_pos": collapsed, "ratio_below_tenth_neg": 0.0,
        "sapo_active_frac": 0.0, "clip_frac": 0.0, "approx_kl_k1": 0.0,
        "approx_kl_k3": 0.0, "kl_ref_k3": 0.0, "entropy_mean": entropy,
    });
    serde_json::from_value(serde_json::json!({
        "step": step, "epoch": 0, "learning_rate": 1e-5, "grad_norm": 0.1,
        "sequences": 8, "loss": loss,
    }))
    .unwrap()
}

/// A training report holding `steps`.
pub fn train_report(steps: Vec<StepMetrics>) -> TrainReport {
    TrainReport {
        steps,
        sequences: 8,
        trained_sequences: 8,
        groups: 2,
        zero_std_groups: 0,
        reward_mean: 0.5,
        reward_std: 0.3,
        response_len_mean: 20.0,
        logprob_gap: None,
        logprob_gap_max: None,
    }
}

/// What a [`CraftedRound`] writes as its candidate.
#[derive(Debug, Clone, Copy)]
pub enum Craft {
    /// A real merged GGUF from a zero LoRA (serves exactly like the base model).
    Good,
    /// A real merged GGUF from a LoRA with noise of this standard deviation in `B`.
    Damaged(f32),
    /// A placeholder file, for scripted loaders.
    Stub,
}

/// A stand-in for a training round: writes a crafted candidate, registers it, and reports
/// `steps`. Optionally waits for cancellation instead of finishing, or holds memory.
pub struct CraftedRound {
    /// The base model (for real merges).
    pub base: PathBuf,
    /// What to write.
    pub craft: Craft,
    /// The steps reported.
    pub steps: Vec<StepMetrics>,
    /// Wait until cancelled, then fail as a cancelled round does.
    pub wait_for_cancel: bool,
    /// Bytes to allocate and touch while waiting.
    pub hold_bytes: usize,
    /// Rounds run so far.
    pub runs: AtomicUsize,
    /// The round summary reported.
    pub summary: Option<searchloop_learn::RoundSummary>,
}

impl CraftedRound {
    /// A round writing `craft` with healthy steps.
    pub fn new(craft: Craft) -> Self {
        Self {
            base: match craft {
                Craft::Stub => PathBuf::new(),
                _ => model_path(),
            },
            craft,
            steps: vec![step(1, 1.0, 0.0, 1.0), step(2, 0.99, 0.01, 1.05)],
            wait_for_cancel: false,
            hold_bytes: 0,
            runs: AtomicUsize::new(0),
            summary: None,
        }
    }
}

#[async_trait]
impl RoundRunner for CraftedRound {
    async fn run(&self, job: &RoundJob) -> searchloop_loop::Result<RoundCandidate> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.wait_for_cancel {
            let held = vec![1u8; self.hold_bytes];
            while !job.cancel.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                held.iter().map(|b| *b as usize).sum::<usize>(),
                self.hold_bytes
            );
            return Err(searchloop_loop::LoopError::RoundCancelled);
        }
        let n = job.store.list_adapters().await?.len() + 1;
        let folder = job.adapters_dir.join(format!("crafted-{n}"));
        match self.craft {
            Craft::Good => drop(write_candidate(&self.base, &folder, None)),
            Craft::Damaged(std) => drop(write_candidate(&self.base, &folder, Some(std))),
            Craft::Stub => write_stub_candidate(&folder),
        }
        let record = register(&job.store, &folder, job.parent.as_ref().map(|p| p.version)).await;
        Ok(RoundCandidate {
            record,
            train: train_report(self.steps.clone()),
            summary: self.summary.clone(),
        })
    }
}
