//! The running application: a model in a swappable slot, the tool registry, the agent, and the
//! operations every front end exposes (ask, and later feedback, train, adapters).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use searchloop_core::{
    Agent, DynTool, EpisodeRequest, Policy, PolicySlot, ToolRegistry, Trajectory,
};
use searchloop_loop::{
    AdapterLocator, AdapterManager, BaseModel, FleetCache, LearningLoop, LoopError, LoopMetrics,
    PolicyLoader, RoundReport, SchedulerConfig, SwapReport, scheduler::RoundRunner,
};
use searchloop_model_candle::CandlePolicy;
use searchloop_model_mistralrs::MistralRsPolicy;
use searchloop_search_http::{HttpSearchConfig, HttpSearchTool};
use searchloop_search_sql::{InventoryConfig, InventoryTool};
use searchloop_search_tantivy::{
    CatalogIndex, CatalogSearchTool, CatalogSource, CatalogToolConfig, IndexReport, Progress,
};
use searchloop_store_sql::{AdapterRecord, BackendKind, Store};

use crate::{
    config::{AppConfig, CatalogSection, Engine, ModelSection, ToolSection},
    default_model,
    error::{Result, RuntimeError},
};

/// A started searchloop application.
pub struct Runtime {
    config: AppConfig,
    agent: Arc<Agent>,
    store: Arc<Store>,
    /// Promotion, rollback and registry follow-up of the served adapter.
    adapters: Arc<AdapterManager>,
    /// Training rounds, their gate, and the scheduler.
    learning: LearningLoop,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("agent", &self.agent)
            .finish()
    }
}

impl Runtime {
    /// Loads the model, opens the tools and builds the agent described by `config`.
    ///
    /// The model is the adapter the store's registry names as promoted (the base model when
    /// none is), so a restarted process serves exactly what was promoted before it stopped.
    pub async fn start(config: AppConfig) -> Result<Self> {
        Self::start_with_tools(config, Vec::new()).await
    }

    /// Like [`Runtime::start`], with `extra` tools (a host application's own, through the FFI
    /// bindings) registered after the configured ones, under the same limits;
    /// `config.default_tool` may name one of them.
    pub async fn start_with_tools(config: AppConfig, extra: Vec<Arc<dyn DynTool>>) -> Result<Self> {
        let loader = Arc::new(ModelLoader::new(config.model.clone()));
        Self::start_with(config, extra, loader).await
    }

    /// Like [`Runtime::start_with_tools`], with every model (the one served first, and those
    /// promotions and rollbacks swap in) built by `loader`.
    pub async fn start_with(
        mut config: AppConfig,
        extra: Vec<Arc<dyn DynTool>>,
        loader: Arc<dyn PolicyLoader>,
    ) -> Result<Self> {
        config.validate()?;
        // Rounds train where the model serves unless the round names its own device.
        let trainer_device = config.trainer_device();
        if let Some(learn) = config.learn.as_mut() {
            learn.round.device = Some(trainer_device);
        }
        let store = Arc::new(open_store(&config).await?);
        let tools = Arc::new(build_registry(&config, extra).await?);
        let locator = adapter_locator(&config, store.clone());
        let policy = locator.load_promoted(loader.as_ref()).await?;
        let slot = Arc::new(PolicySlot::new(policy));
        let mut agent =
            Agent::new(slot.clone(), tools, config.agent.clone())?.with_sink(store.clone());
        if let Some(replica) = &config.replica_id {
            agent = agent.with_replica_id(replica.clone());
        }
        let agent = Arc::new(agent);
        let adapters = Arc::new(AdapterManager::serving(locator, loader, slot));
        let base_model = base_model(&config);
        let learning = LearningLoop::new(
            agent.clone(),
            adapters.clone(),
            base_model,
            config.learn.clone(),
        );
        Ok(Self {
            config,
            agent,
            store,
            adapters,
            learning,
        })
    }

    /// The trajectory store every episode is recorded in.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The config the runtime was started with.
    pub fn config(&self) -> &AppConfig {
        &self.config
    }

    /// The agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Answers one question.
    pub async fn ask(&self, question: &str) -> Result<Trajectory> {
        self.run(EpisodeRequest::new(question)).await
    }

    /// Runs one episode.
    pub async fn run(&self, request: EpisodeRequest) -> Result<Trajectory> {
        if request.question.trim().is_empty() {
            return Err(RuntimeError::Config("the question is empty".into()));
        }
        Ok(self.agent.run(request).await?)
    }

    /// Every registered adapter, oldest first.
    pub async fn adapters(&self) -> Result<Vec<AdapterRecord>> {
        Ok(self.adapters.list().await?)
    }

    /// Promotes adapter `version` and serves it (see [`AdapterManager::promote`]).
    pub async fn promote(&self, version: u64) -> Result<SwapReport> {
        Ok(self.adapters.promote(version).await?)
    }

    /// Rolls back to `to`, or to the previously promoted adapter (see
    /// [`AdapterManager::rollback`]).
    pub async fn rollback(&self, to: Option<u64>) -> Result<SwapReport> {
        Ok(self.adapters.rollback(to, "manual rollback").await?)
    }

    /// Serves the registry's promoted adapter if another process changed it.
    pub async fn sync_adapters(&self) -> Result<Option<SwapReport>> {
        Ok(self.adapters.sync().await?)
    }

    /// The adapter manager, for hosts that need reasons or their own loaders.
    pub fn adapter_manager(&self) -> &Arc<AdapterManager> {
        &self.adapters
    }

    /// The learning loop: rounds, the gate, the scheduler, their counters.
    pub fn learning(&self) -> &LearningLoop {
        &self.learning
    }

    /// Runs one training round now, with its gate (see [`LearningLoop::train_now`]).
    pub async fn train_now(&self) -> Result<RoundReport> {
        Ok(self.learning.train_now().await?)
    }

    /// Starts the scheduler with `config` (see [`LearningLoop::attach_scheduler`]).
    /// A round without a device of its own trains where the model serves.
    pub async fn attach_scheduler(&self, mut config: SchedulerConfig) -> Result<()> {
        let device = *config.round.device.get_or_insert(self.config.model.device);
        crate::config::check_device("learn.round.device", device)?;
        Ok(self.learning.attach_scheduler(config).await?)
    }

    /// Stops the scheduler and its running round, and waits for it to end.
    pub async fn detach_scheduler(&self) {
        self.learning.detach_scheduler().await;
    }

    /// Whether rounds can run: the config has a `[learn]` section, or a scheduler is attached.
    pub fn learning_configured(&self) -> bool {
        self.learning.configured()
    }

    /// Whether a scheduler is attached.
    pub fn scheduler_attached(&self) -> bool {
        self.learning.scheduler_attached()
    }

    /// Cancels the running round, if any; returns whether one was running.
    pub fn cancel_round(&self) -> bool {
        self.learning.cancel_round()
    }

    /// Replaces the round runner (searchloop-learn's by default).
    pub fn set_round_runner(&self, runner: Arc<dyn RoundRunner>) {
        self.learning.set_round_runner(runner);
    }

    /// The learning loop's counters.
    pub fn loop_metrics(&self) -> LoopMetrics {
        self.learning.metrics()
    }
}

/// The runtime's loader: the serving engine with the `[model]` section's settings.
#[derive(Debug, Clone)]
pub struct ModelLoader {
    section: ModelSection,
}

impl ModelLoader {
    /// A loader serving with `section`'s settings.
    pub fn new(section: ModelSection) -> Self {
        Self { section }
    }
}

#[async_trait]
impl PolicyLoader for ModelLoader {
    async fn load(
        &self,
        merged: Option<&Path>,
        version: Option<u64>,
    ) -> searchloop_loop::Result<Arc<dyn Policy>> {
        load_policy(&self.section, merged, version)
            .await
            .map_err(|e| LoopError::Load(Box::new(e)))
    }
}

/// Opens (creating if needed) the store the config names.
pub async fn open_store(config: &AppConfig) -> Result<Store> {
    Ok(Store::open_with(&config.store.url, config.store.options()).await?)
}

/// The base model's GGUF: the configured file, or the embedded default (fetched on first use).
fn base_model(config: &AppConfig) -> BaseModel {
    let base_path = config.model.path.clone();
    Arc::new(move || match &base_path {
        Some(path) => Ok(path.clone()),
        None => default_model::ensure().map_err(|e| LoopError::Load(Box::new(e))),
    })
}

/// Where this process finds adapters' folders. A SQLite store is one machine's, so the
/// registry's paths are the folders; on PostgreSQL a process is one of a fleet sharing the
/// store but not a disk, and adapters it did not train come from the registry's copy of their
/// files into `[store] adapter_cache`.
pub fn adapter_locator(config: &AppConfig, store: Arc<Store>) -> AdapterLocator {
    match store.backend_kind() {
        BackendKind::Sqlite => AdapterLocator::local(store),
        BackendKind::Postgres => AdapterLocator::fleet(
            store,
            FleetCache {
                own_dir: config.learn.as_ref().map(|l| l.adapters_dir.clone()),
                cache_dir: config.store.adapter_cache.clone(),
                base_model: base_model(config),
            },
        ),
    }
}

/// Loads the served model: the configured GGUF (or the embedded default), or `merged`, a GGUF
/// with adapter `version` merged in.
pub async fn load_policy(
    section: &ModelSection,
    merged: Option<&Path>,
    version: Option<u64>,
) -> Result<Arc<dyn Policy>> {
    let path = match (merged, &section.path) {
        (Some(path), _) => path.to_path_buf(),
        (None, Some(path)) => path.clone(),
        (None, None) => default_model::ensure()?,
    };
    let policy: Arc<dyn Policy> = match section.engine {
        Engine::Candle => Arc::new(
            CandlePolicy::load(&section.candle(path, version))
                .await
                .map_err(|e| RuntimeError::Model(e.to_string()))?,
        ),
        Engine::MistralRs => Arc::new(
            MistralRsPolicy::load(&section.mistralrs(path, version))
                .await
                .map_err(|e| RuntimeError::Model(e.to_string()))?,
        ),
    };
    Ok(policy)
}

/// Opens every configured tool and registers it.
pub async fn build_tools(config: &AppConfig) -> Result<ToolRegistry> {
    build_registry(config, Vec::new()).await
}

/// Opens every configured tool and registers it, then `extra`; the default tool is chosen
/// last, so it may be any of them.
async fn build_registry(config: &AppConfig, extra: Vec<Arc<dyn DynTool>>) -> Result<ToolRegistry> {
    let mut registry = ToolRegistry::new().with_limits(config.tool_limits.clone());
    for section in &config.tools {
        let tool: Arc<dyn DynTool> = match section {
            ToolSection::Catalog(c) => Arc::new(open_catalog(c)?),
            ToolSection::Sql(f) => Arc::new(open_inventory(&f.file).await?),
            ToolSection::Http(f) => Arc::new(open_http(&f.file)?),
        };
        registry.register(tool)?;
    }
    for tool in extra {
        registry.register(tool)?;
    }
    if let Some(name) = &config.default_tool {
        registry.set_default(name)?;
    }
    Ok(registry)
}

/// Connects the SQL inventory tool described by the file at `path`. A relative SQLite path in
/// its `database` URL is taken relative to that file, like every path in a config.
pub async fn open_inventory(path: &Path) -> Result<InventoryTool> {
    let tool_error = |message: String| RuntimeError::Tool {
        tool: format!("sql ({})", path.display()),
        message,
    };
    let mut config =
        InventoryConfig::from_toml_file(path).map_err(|e| tool_error(e.to_string()))?;
    if let Some(file) = config.database.strip_prefix("sqlite://") {
        let file = Path::new(file);
        if file.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            config.database = format!("sqlite://{}", base.join(file).display());
        }
    }
    InventoryTool::connect(config)
        .await
        .map_err(|e| tool_error(e.to_string()))
}

/// Builds the HTTP search tool described by the file at `path`.
pub fn open_http(path: &Path) -> Result<HttpSearchTool> {
    let tool_error = |message: String| RuntimeError::Tool {
        tool: format!("http ({})", path.display()),
        message,
    };
    let config = HttpSearchConfig::from_toml_file(path).map_err(|e| tool_error(e.to_string()))?;
    HttpSearchTool::new(config).map_err(|e| tool_error(e.to_string()))
}

/// Opens a catalog index, indexing its product files first when it is empty.
pub fn open_catalog(section: &CatalogSection) -> Result<CatalogSearchTool> {
    let index = open_catalog_index(section)?;
    if index.num_products() == 0 && !section.products.is_empty() {
        index_into(section, &index, &section.products, true)?;
    }
    let config = CatalogToolConfig {
        name: section.name.clone(),
        default_limit: section.default_limit,
        blocking_pool: section.blocking_pool,
        ..CatalogToolConfig::default()
    };
    Ok(CatalogSearchTool::with_config(Arc::new(index), config))
}

/// Indexes `files` (JSONL or CSV) into the catalog's index: a rebuild from scratch, or an update
/// by SKU.
pub fn index_catalog(
    section: &CatalogSection,
    files: &[PathBuf],
    rebuild: bool,
) -> Result<IndexReport> {
    let index = open_catalog_index(section)?;
    index_into(section, &index, files, rebuild)
}

fn open_catalog_index(section: &CatalogSection) -> Result<CatalogIndex> {
    Ok(CatalogIndex::create_or_open(&section.index)
        .map_err(|e| catalog_error(section, e))?
        .with_progress(Progress::Auto))
}

fn index_into(
    section: &CatalogSection,
    index: &CatalogIndex,
    files: &[PathBuf],
    rebuild: bool,
) -> Result<IndexReport> {
    let sources = files
        .iter()
        .map(|p| CatalogSource::from_path(p.clone()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| catalog_error(section, e))?;
    if rebuild {
        return index
            .rebuild(&sources)
            .map_err(|e| catalog_error(section, e));
    }
    let mut last = None;
    for source in &sources {
        let report = match source {
            CatalogSource::Jsonl(path) => index.index_jsonl(path),
            CatalogSource::Csv(path) => index.index_csv(path),
        }
        .map_err(|e| catalog_error(section, e))?;
        last = Some(report);
    }
    last.ok_or_else(|| {
        RuntimeError::Config(format!("no files to index for tool '{}'", section.name))
    })
}

fn catalog_error(
    section: &CatalogSection,
    e: searchloop_search_tantivy::CatalogError,
) -> RuntimeError {
    RuntimeError::Tool {
        tool: section.name.clone(),
        message: e.to_string(),
    }
}
