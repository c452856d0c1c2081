//! The application config (`searchloop.toml`): the model, the agent, the tools, the store. Read
//! from TOML or JSON; relative paths are resolved against the config file's folder.
//!
//! A config file is untrusted input: unknown keys are refused (`deny_unknown_fields`), every
//! section is validated at start-up, and errors name the file and the field.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use searchloop_core::{AgentConfig, Device, RewardPolicy, ToolLimits};
use searchloop_llama::WeightsEncoding;
use searchloop_model_candle::CandleConfig;
use searchloop_model_mistralrs::MistralRsConfig;
use searchloop_store_sql::{SqliteSync, StoreOptions};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use searchloop_loop::{LoopError, SchedulerConfig};

/// The whole application config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// The served model.
    pub model: ModelSection,
    /// The agent loop: protocol, sampling, episode rewards.
    pub agent: AgentConfig,
    /// The tools, in registration order; the first is the default `<search>` tool unless
    /// `default_tool` names another.
    pub tools: Vec<ToolSection>,
    /// The tool `<search>` calls.
    pub default_tool: Option<String>,
    /// Per-call limits of every tool.
    pub tool_limits: ToolLimits,
    /// Where trajectories, rewards and adapters are stored.
    pub store: StoreSection,
    /// The learning loop (training rounds, the eval gate, the scheduler, the live monitor);
    /// absent means this process does not train.
    pub learn: Option<SchedulerConfig>,
    /// This process's name in a fleet of replicas on one store, recorded with every
    /// trajectory it serves and reported by its `/healthz` and `/metrics`.
    pub replica_id: Option<String>,
}

/// Longest replica id.
const MAX_REPLICA_ID_CHARS: usize = 128;

/// Which engine serves the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// searchloop's own engine on candle (`searchloop-model-candle`): many sequences per step,
    /// shared-prefix reuse, cancellation, the trainer's numerics. Byte-level BPE models.
    #[default]
    Candle,
    /// mistral.rs: any GGUF architecture and tokenizer it supports; one sequence at a time on
    /// the CPU (its batched CPU decoding is wrong in 0.8.1), batched on a GPU.
    #[serde(rename = "mistralrs")]
    MistralRs,
}

/// The `[model]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file; absent means the embedded default model (fetched and cached on first use).
    pub path: Option<PathBuf>,
    /// Where the model serves: `"cpu"` (the default) or `"cuda:N"`, which needs a build with
    /// the `cuda` feature. Training rounds run there too unless `[learn.round] device` says
    /// otherwise.
    pub device: Device,
    /// The serving engine: `candle` (the default) or `mistralrs`.
    pub engine: Engine,
    /// In-memory encoding of the weights: `f32` (the default), `original`, `q8_0` or `q4_0`.
    pub weights: WeightsEncoding,
    /// Most sequences decoded at once; later requests wait for room. Absent: 16 on the CPU,
    /// 64 on a GPU.
    pub max_concurrent_sequences: Option<usize>,
    /// Longest prompt plus completion; absent uses the model's own (the candle engine caps it
    /// at 4,096).
    pub context_length: Option<usize>,
    /// A Jinja chat template replacing the GGUF's.
    pub chat_template: Option<String>,
    /// Candle engine: most tokens one step computes (running sequences' next tokens, then
    /// prompt chunks).
    pub max_step_tokens: usize,
    /// Candle engine: finished sequences kept for their keys and values, so prompts sharing
    /// their beginning skip computing it.
    pub prefix_cache_entries: usize,
    /// Candle engine on the CPU: most tokens in the key/value cache at once.
    pub kv_budget_tokens: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        let candle = CandleConfig::default();
        Self {
            path: None,
            device: Device::Cpu,
            engine: Engine::Candle,
            // An episode is mostly prompt processing, and candle's quantized prompt path is a
            // loop of row products: f32 weights run a whole retail episode faster than Q8_0 and
            // the shipped Q4_1 on a CPU, and their log-probs are the trainer's to 1e-4
            // (BENCHMARKS.md). For a much larger model, `q8_0` saves the memory.
            weights: WeightsEncoding::F32,
            max_concurrent_sequences: None,
            context_length: None,
            chat_template: None,
            max_step_tokens: candle.max_step_tokens,
            prefix_cache_entries: candle.prefix_cache_entries,
            kv_budget_tokens: candle.kv_budget_tokens,
        }
    }
}

/// Sequences decoded at once on the CPU unless configured. A step's time grows with every
/// sequence on two cores (92 ms for 8, 330 ms for 32 on the embedded model), so past about 16
/// more sequences add latency to all of them and little throughput: under an overload, a cap
/// lets the first askers finish inside their timeouts instead of all of them timing out.
const CPU_CONCURRENT_SEQUENCES: usize = 16;

impl ModelSection {
    /// Sequences decoded at once: the configured number, else the device's default.
    pub fn concurrent_sequences(&self) -> usize {
        self.max_concurrent_sequences.unwrap_or(match self.device {
            Device::Cpu => CPU_CONCURRENT_SEQUENCES,
            Device::Cuda(_) => CandleConfig::default().max_sequences,
        })
    }

    /// The candle engine's config for the GGUF at `path`, stamped with adapter `version`.
    pub fn candle(&self, path: PathBuf, version: Option<u64>) -> CandleConfig {
        CandleConfig {
            model_path: path,
            device: self.device,
            weights: self.weights,
            adapter_version: version,
            context_length: self.context_length,
            chat_template: self.chat_template.clone(),
            max_sequences: self.concurrent_sequences(),
            max_step_tokens: self.max_step_tokens,
            prefix_cache_entries: self.prefix_cache_entries,
            kv_budget_tokens: self.kv_budget_tokens,
        }
    }

    /// mistral.rs's config for the GGUF at `path`, stamped with adapter `version`.
    pub fn mistralrs(&self, path: PathBuf, version: Option<u64>) -> MistralRsConfig {
        let mut engine = MistralRsConfig::new(path);
        engine.adapter_version = version;
        engine.cuda_device = match self.device {
            Device::Cpu => None,
            Device::Cuda(ordinal) => Some(ordinal),
        };
        engine.weights = self.weights;
        engine.max_concurrent_sequences = self.concurrent_sequences();
        engine.context_length = self.context_length;
        engine.chat_template = self.chat_template.clone();
        engine
    }
}

/// One `[[tools]]` entry; `kind` selects the plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolSection {
    /// The tantivy product catalog.
    Catalog(CatalogSection),
    /// The read-only SQL inventory; its named queries live in their own file.
    Sql(ToolFile),
    /// An HTTP JSON search API; its request and result mapping live in their own file.
    Http(ToolFile),
}

/// A tool whose plugin reads its own config file (the SQL and HTTP plugins' formats are
/// documented with them; see the demo's `bindings/demo/configs/inventory.toml` and
/// `plugins/search-http/configs/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolFile {
    /// The plugin's TOML config file.
    pub file: PathBuf,
}

/// A catalog tool: an index folder, and catalog files to index when the index is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSection {
    /// The tool's name.
    #[serde(default = "default_catalog_name")]
    pub name: String,
    /// The index folder (created if missing).
    pub index: PathBuf,
    /// JSONL or CSV catalog files indexed when the index is empty.
    #[serde(default)]
    pub products: Vec<PathBuf>,
    /// Results per search when the model asks for no `limit`.
    #[serde(default = "default_catalog_limit")]
    pub default_limit: usize,
    /// Run searches on tokio's blocking pool instead of inline, for an index on a slow disk.
    #[serde(default)]
    pub blocking_pool: bool,
}

fn default_catalog_name() -> String {
    "catalog".into()
}

fn default_catalog_limit() -> usize {
    3
}

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// A SQLite file path (or `sqlite://` URL), or a `postgres://` URL.
    pub url: String,
    /// Smallest host feedback value accepted.
    pub feedback_min: f64,
    /// Largest host feedback value accepted.
    pub feedback_max: f64,
    /// SQLite durability: `full` (fsync per commit, the default) or `normal`.
    pub sqlite_sync: SqliteSync,
    /// Per-source weights of the training reward (the latest value per source, weighted and
    /// summed); a source not named here uses the weight recorded with it.
    pub reward_weights: BTreeMap<String, f64>,
    /// On PostgreSQL (a fleet's shared store): the folder where adapters this process did not
    /// train are kept once fetched from the registry and merged into the local base model.
    pub adapter_cache: PathBuf,
    /// Most pooled connections this process opens to the store (PostgreSQL, and SQLite's
    /// readers); a PostgreSQL trainer and a registry listener each hold one more.
    pub max_connections: u32,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            url: "searchloop.db".into(),
            feedback_min: -1.0,
            feedback_max: 1.0,
            sqlite_sync: SqliteSync::Full,
            reward_weights: BTreeMap::new(),
            adapter_cache: PathBuf::from("adapter-cache"),
            max_connections: StoreOptions::default().max_connections,
        }
    }
}

impl StoreSection {
    /// The store's options.
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            feedback_range: self.feedback_min..=self.feedback_max,
            reward_policy: RewardPolicy {
                weights: self.reward_weights.clone(),
            },
            sqlite_sync: self.sqlite_sync,
            max_connections: self.max_connections,
            ..StoreOptions::default()
        }
    }
}

/// Checks a replica id: 1 to 128 characters, none of them a control character or space at
/// either end, so that it reads the same in a trajectory, a log line and a metric label.
pub fn check_replica_id(replica: &str) -> Result<()> {
    let chars = replica.chars().count();
    if chars == 0
        || chars > MAX_REPLICA_ID_CHARS
        || replica.chars().any(char::is_control)
        || replica.trim() != replica
    {
        return Err(RuntimeError::Config(format!(
            "replica_id {replica:?} must be 1 to {MAX_REPLICA_ID_CHARS} characters, without \
             control characters or surrounding spaces"
        )));
    }
    Ok(())
}

/// Refuses a GPU in a build that cannot use one: the error says how to get a build that can,
/// and nothing falls back to the CPU in its place.
pub fn check_device(key: &str, device: Device) -> Result<()> {
    if device.is_gpu() && !cfg!(feature = "cuda") {
        return Err(RuntimeError::Config(format!(
            "{key} = \"{device}\" needs searchloop built with its `cuda` feature \
             (scripts/build-cuda.sh builds one); this build runs on the CPU only"
        )));
    }
    Ok(())
}

impl AppConfig {
    /// The device training rounds run on: `[learn.round] device`, else the model's.
    pub fn trainer_device(&self) -> Device {
        self.learn
            .as_ref()
            .and_then(|l| l.round.device)
            .unwrap_or(self.model.device)
    }

    /// Reads a TOML (or, by extension, JSON) config file and resolves its relative paths
    /// against the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RuntimeError::io(format!("cannot read config file {}", path.display()), e)
        })?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        let mut config: AppConfig = if is_json {
            serde_json::from_str(&text)
                .map_err(|e| RuntimeError::Config(format!("{}: {e}", path.display())))?
        } else {
            toml::from_str(&text)
                .map_err(|e| RuntimeError::Config(format!("{}: {e}", path.display())))?
        };
        // Relative paths are the config file's, wherever the process runs: the file's own
        // path is made absolute first, since a bare file name has an empty parent.
        let absolute = std::path::absolute(path).map_err(|e| {
            RuntimeError::io(
                format!("cannot resolve the config path {}", path.display()),
                e,
            )
        })?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        config.resolve_paths(base);
        // Name the file once in front of the validation's own message.
        config.validate().map_err(|e| match e {
            RuntimeError::Config(message) => {
                RuntimeError::Config(format!("{}: {message}", path.display()))
            }
            other => RuntimeError::Config(format!("{}: {other}", path.display())),
        })?;
        Ok(config)
    }

    /// Writes the config as TOML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| RuntimeError::Config(format!("cannot encode config: {e}")))?;
        std::fs::write(path, text)
            .map_err(|e| RuntimeError::io(format!("cannot write {}", path.display()), e))
    }

    /// Makes every relative path absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.model.path.as_mut() {
            resolve(p);
        }
        for tool in &mut self.tools {
            match tool {
                ToolSection::Catalog(c) => {
                    resolve(&mut c.index);
                    c.products.iter_mut().for_each(resolve);
                }
                ToolSection::Sql(f) | ToolSection::Http(f) => resolve(&mut f.file),
            }
        }
        if let Some(learn) = self.learn.as_mut() {
            learn.resolve_paths(base);
        }
        resolve(&mut self.store.adapter_cache);
        if !self.store.url.contains("://") {
            let mut p = PathBuf::from(&self.store.url);
            resolve(&mut p);
            self.store.url = p.to_string_lossy().into_owned();
        }
    }

    /// Checks everything that can be checked before loading anything.
    pub fn validate(&self) -> Result<()> {
        self.agent.validate()?;
        if let Some(replica) = &self.replica_id {
            check_replica_id(replica)?;
        }
        if self.tools.is_empty() {
            return Err(RuntimeError::Config(
                "at least one [[tools]] entry is needed".into(),
            ));
        }
        if self.store.max_connections == 0 {
            return Err(RuntimeError::Config(
                "store.max_connections must be at least 1".into(),
            ));
        }
        if self.model.max_concurrent_sequences == Some(0) {
            return Err(RuntimeError::Config(
                "model.max_concurrent_sequences must be at least 1".into(),
            ));
        }
        if self.tool_limits.timeout_ms == 0 || self.tool_limits.max_observation_chars == 0 {
            return Err(RuntimeError::Config(
                "tool_limits.timeout_ms and tool_limits.max_observation_chars must be positive"
                    .into(),
            ));
        }
        if self.store.url.trim().is_empty() {
            return Err(RuntimeError::Config("store.url must not be empty".into()));
        }
        let (lo, hi) = (self.store.feedback_min, self.store.feedback_max);
        if !lo.is_finite() || !hi.is_finite() || lo > hi {
            return Err(RuntimeError::Config(format!(
                "store.feedback_min ({lo}) and store.feedback_max ({hi}) must be finite with min <= max"
            )));
        }
        if let Some((source, w)) = self
            .store
            .reward_weights
            .iter()
            .find(|(_, w)| !w.is_finite())
        {
            return Err(RuntimeError::Config(format!(
                "store.reward_weights.{source} must be finite, got {w}"
            )));
        }
        check_device("model.device", self.model.device)?;
        if let Some(device) = self.learn.as_ref().and_then(|l| l.round.device) {
            check_device("learn.round.device", device)?;
        }
        if let Some(learn) = &self.learn {
            // A bad section is a bad config like any other, so it reads as one.
            learn.validate().map_err(|e| match e {
                LoopError::Config(message) => RuntimeError::Config(message),
                other => other.into(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_gets_defaults_and_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("searchloop.toml");
        std::fs::write(
            &path,
            "[[tools]]\nkind = \"catalog\"\nindex = \"index\"\nproducts = [\"catalog.jsonl\"]\n",
        )
        .unwrap();
        let config = AppConfig::load(&path).unwrap();
        assert_eq!(config.model.path, None);
        let ToolSection::Catalog(catalog) = &config.tools[0] else {
            panic!("the first tool is the catalog");
        };
        assert_eq!(catalog.name, "catalog");
        assert_eq!(catalog.index, dir.path().join("index"));
        assert_eq!(catalog.products, vec![dir.path().join("catalog.jsonl")]);
        assert_eq!(
            PathBuf::from(&config.store.url),
            dir.path().join("searchloop.db")
        );
        // A saved config loads back to the same value.
        let copy = dir.path().join("copy.toml");
        config.save(&copy).unwrap();
        assert_eq!(AppConfig::load(&copy).unwrap(), config);
    }

    #[test]
    fn every_path_key_is_taken_relative_to_the_config_file() {
        // A folder under the working directory, named by a relative path: the way a user
        // passes `--config searchloop-data/searchloop.toml`.
        let cwd = std::env::current_dir().unwrap();
        let dir = tempfile::tempdir_in(&cwd).unwrap();
        let relative_dir = dir.path().strip_prefix(&cwd).unwrap().to_path_buf();
        let file = relative_dir.join("searchloop.toml");
        std::fs::write(
            dir.path().join("searchloop.toml"),
            r#"
[model]
path = "models/my-model.gguf"

[[tools]]
kind = "catalog"
index = "index"
products = ["data/catalog.jsonl", "/elsewhere/more.csv"]

[[tools]]
kind = "sql"
file = "inventory.toml"

[[tools]]
kind = "http"
file = "../shared/help.toml"

[store]
url = "store/searchloop.db"
adapter_cache = "cache/adapters"

[learn]
adapters_dir = "adapters"
[learn.eval]
set = "data/questions.jsonl"
[learn.round]
prompts = "data/train.jsonl"
"#,
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("data/questions.jsonl"),
            "{\"question\":\"q\",\"answers\":[\"a\"]}\n",
        )
        .unwrap();
        assert!(file.is_relative());
        let config = AppConfig::load(&file).unwrap();
        let base = dir.path();
        assert_eq!(config.model.path, Some(base.join("models/my-model.gguf")));
        let ToolSection::Catalog(catalog) = &config.tools[0] else {
            panic!("the first tool is the catalog");
        };
        assert_eq!(catalog.index, base.join("index"));
        assert_eq!(
            catalog.products,
            [
                base.join("data/catalog.jsonl"),
                PathBuf::from("/elsewhere/more.csv")
            ]
        );
        let (ToolSection::Sql(sql), ToolSection::Http(http)) = (&config.tools[1], &config.tools[2])
        else {
            panic!("then the SQL and HTTP tools");
        };
        assert_eq!(sql.file, base.join("inventory.toml"));
        assert_eq!(http.file, base.join("../shared/help.toml"));
        assert_eq!(
            PathBuf::from(&config.store.url),
            base.join("store/searchloop.db")
        );
        assert_eq!(config.store.adapter_cache, base.join("cache/adapters"));
        let learn = config.learn.as_ref().unwrap();
        assert_eq!(learn.adapters_dir, base.join("adapters"));
        assert_eq!(learn.eval.set, base.join("data/questions.jsonl"));
        assert_eq!(learn.round.prompts, Some(base.join("data/train.jsonl")));
    }

    #[test]
    fn the_device_is_parsed_and_a_gpu_needs_the_cuda_build() {
        let dir = tempfile::tempdir().unwrap();
        let load = |model: &str, round: &str| {
            let path = dir.path().join("device.toml");
            std::fs::write(
                &path,
                format!("[model]\n{model}\n[[tools]]\nkind = \"catalog\"\nindex = \"x\"\n{round}"),
            )
            .unwrap();
            AppConfig::load(&path)
        };
        let config = load("device = \"cpu\"", "").unwrap();
        assert_eq!(config.model.device, Device::Cpu);
        assert_eq!(config.trainer_device(), Device::Cpu);
        assert_eq!(load("", "").unwrap().model.device, Device::Cpu);
        let err = load("device = \"gpu\"", "").unwrap_err().to_string();
        assert!(err.contains("not a device"), "{err}");
        let on_gpu = load("device = \"cuda:1\"", "");
        let round_on_gpu = load("", "[learn.round]\ndevice = \"cuda\"");
        if cfg!(feature = "cuda") {
            assert_eq!(on_gpu.unwrap().trainer_device(), Device::Cuda(1));
        } else {
            for (result, key) in [
                (on_gpu, "model.device"),
                (round_on_gpu, "learn.round.device"),
            ] {
                let err = result.unwrap_err().to_string();
                assert!(err.contains(key), "{err}");
                assert!(err.contains("`cuda` feature"), "{err}");
                assert!(err.contains("scripts/build-cuda.sh"), "{err}");
            }
        }
    }

    #[test]
    fn the_policy_loss_is_chosen_in_its_own_table() {
        let dir = tempfile::tempdir().unwrap();
        // A [learn] section is checked whole, eval set included.
        std::fs::write(
            dir.path().join("q.jsonl"),
            "{\"question\":\"q\",\"answers\":[\"a\"]}\n",
        )
        .unwrap();
        let load = |trainer: &str| {
            let path = dir.path().join("loss.toml");
            std::fs::write(
                &path,
                format!(
                    "[[tools]]\nkind = \"catalog\"\nindex = \"x\"\n[learn.eval]\nset = \
                     \"q.jsonl\"\n{trainer}"
                ),
            )
            .unwrap();
            AppConfig::load(&path)
        };
        let config = load(
            r#"
[learn.round.trainer]
old_logprobs = "recompute"

[learn.round.trainer.loss]
kind = "llds"
llds_lambda = 0.3
clip_eps_high = 0.28
is_correction = "tis"
is_max = 3.0
"#,
        )
        .unwrap();
        let loss = &config.learn.as_ref().unwrap().round.trainer.loss;
        assert_eq!(
            (loss.kind.name(), loss.is_correction.name()),
            ("llds", "tis")
        );
        assert_eq!((loss.llds_lambda, loss.clip_eps_high), (0.3, Some(0.28)));
        assert_eq!(loss.is_band(), Some((0.0, 3.0)));
        // A correction compares two log-probs, so it needs the recomputed one.
        let err = load("[learn.round.trainer.loss]\nis_correction = \"icepop\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("old_logprobs = \"recompute\""), "{err}");
        let err = load("[learn.round.trainer.loss]\nkind = \"ppo\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ppo"), "{err}");
    }

    #[test]
    fn bad_files_give_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("unknown.toml", "[model]\nweigths = \"q8_0\"\n", "weigths"),
            ("notoml.toml", "this is not toml", "notoml.toml"),
            ("notools.toml", "[model]\n", "at least one [[tools]]"),
            (
                "sqlwithoutfile.toml",
                "[[tools]]\nkind = \"sql\"\ndatabase = \"x\"\n",
                "database",
            ),
            (
                "badkind.toml",
                "[[tools]]\nkind = \"teleport\"\nindex = \"x\"\n",
                "teleport",
            ),
            (
                "badtemp.toml",
                "[agent.sampling]\ntemperature = -1.0\n[[tools]]\nkind = \"catalog\"\nindex = \"x\"\n",
                "temperature",
            ),
        ];
        for (name, text, expected) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = AppConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
        let err = AppConfig::load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
