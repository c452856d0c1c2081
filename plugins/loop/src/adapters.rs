//! Serving adapters: promotion, rollback and restart, as blue/green swaps of the served model.
//!
//! mistral.rs cannot swap an adapter in place, so every change of the served adapter loads a
//! whole model from the adapter's merged GGUF and swaps it into the agent's
//! [`PolicySlot`]: new episodes go to the new model, episodes in flight finish on the old one
//! (each holds its own `Arc`), and the old model is dropped when the last of them ends. Every
//! trajectory records the adapter version of the model that served it, because the policy
//! stamps its own version and an episode keeps one policy from start to end.
//!
//! # Crash-safe order
//!
//! The registry (the store's `adapters` table) is the truth; the process follows it. A change
//! runs in this order, one change at a time:
//!
//! 1. load the target model (slow; nothing has changed yet, so a failure or a crash here leaves
//!    the registry and the served model as they were);
//! 2. commit the change to the registry in one transaction (exactly one adapter promoted, or none
//!    for the base model);
//! 3. swap the loaded model in (it cannot fail).
//!
//! A crash between 2 and 3 leaves a registry that names the new adapter while the dead process
//! was still serving the old one; on restart [`load_promoted`] serves what the registry names,
//! so the process always comes back to exactly the registry's promoted adapter. The reverse
//! order (swap, then write) could leave a process serving an adapter the registry does not know
//! as promoted, with nothing to repair it. Between 2 and 3 new episodes still start on the old
//! model for a moment; they record the old version, which is the one that served them.
//!
//! Other processes (the `searchloop adapters` command, another replica on a shared PostgreSQL
//! store) change the registry too; [`AdapterManager::sync`] makes a serving process follow it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use async_trait::async_trait;
use searchloop_core::{Policy, PolicySlot};
use searchloop_learn as learn;
pub use searchloop_learn::MERGED_FILE;
use searchloop_store_sql::{AdapterRecord, AdapterStatus, Store};
use serde::{Deserialize, Serialize};

use crate::{
    error::{LoopError, Result},
    metrics::{LoopCounters, bump},
    scheduler::BaseModel,
};

/// Builds a servable model: the base model, or a merged GGUF stamped with its adapter version.
///
/// searchloop-runtime's loader builds the configured serving engine; tests and embedders may
/// serve other policies.
#[async_trait]
pub trait PolicyLoader: Send + Sync {
    /// Loads the base model (`merged` is `None`) or the GGUF at `merged`, whose trajectories
    /// record `version`.
    async fn load(&self, merged: Option<&Path>, version: Option<u64>) -> Result<Arc<dyn Policy>>;
}

/// The merged GGUF inside adapter folder `folder` (searchloop-learn's layout).
pub fn merged_model_path(folder: &Path) -> PathBuf {
    folder.join(MERGED_FILE)
}

/// Where a fleet's replica keeps the adapters it fetches from the registry.
#[derive(Clone)]
pub struct FleetCache {
    /// The folder this process's own rounds write (`[learn] adapters_dir`): an adapter the
    /// registry places there is read from there.
    pub own_dir: Option<PathBuf>,
    /// Where adapters fetched from the registry are kept, merged, by content hash.
    pub cache_dir: PathBuf,
    /// The base model every fetched adapter is merged into.
    pub base_model: BaseModel,
}

impl std::fmt::Debug for FleetCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCache")
            .field("own_dir", &self.own_dir)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// Finds the folder (PEFT files and merged GGUF) of a registered adapter on this machine.
///
/// On one machine the registry's path is the folder. A fleet's processes share the store but
/// not a disk: with a [`FleetCache`], an adapter is read from the registry's path only when it
/// lies in this process's own adapters folder (it trained it); every other adapter comes from
/// the registry's copy of its files, checked against its content hash and merged into the local
/// base model, once per adapter. An adapter registered by path alone (no files in the
/// registry) is read from its path when this machine holds it.
#[derive(Debug, Clone)]
pub struct AdapterLocator {
    store: Arc<Store>,
    fleet: Option<FleetCache>,
    /// The base model's content hash, read at the first fetch and kept: the base model does
    /// not change while a process runs.
    base_hash: Arc<tokio::sync::OnceCell<String>>,
}

impl AdapterLocator {
    /// Registry paths as they are: one machine.
    pub fn local(store: Arc<Store>) -> Self {
        Self {
            store,
            fleet: None,
            base_hash: Arc::default(),
        }
    }

    /// A fleet's replica: adapters it did not train come from the registry into `cache`.
    pub fn fleet(store: Arc<Store>, cache: FleetCache) -> Self {
        Self {
            store,
            fleet: Some(cache),
            base_hash: Arc::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The folder of adapter `record` on this machine, fetched from the registry when needed.
    pub async fn folder(&self, record: &AdapterRecord) -> Result<PathBuf> {
        let registered = PathBuf::from(&record.path);
        let Some(fleet) = &self.fleet else {
            return Ok(registered);
        };
        if merged_model_path(&registered).is_file()
            && fleet
                .own_dir
                .as_ref()
                .is_some_and(|own| registered.starts_with(own))
        {
            return Ok(registered);
        }
        let base = (fleet.base_model)()?;
        let fetched = async {
            let base_hash = self
                .base_hash
                .get_or_try_init(|| learn::base_model_hash(&base))
                .await?;
            learn::fetch_adapter(&self.store, record, &base, base_hash, &fleet.cache_dir).await
        }
        .await;
        match fetched {
            Ok(Some(folder)) => Ok(folder),
            // Registered by path alone: its path is the only place it can be.
            Ok(None) => Ok(registered),
            Err(e) => Err(LoopError::Adapter(format!(
                "adapter v{} cannot be fetched from the registry: {e}",
                record.version
            ))),
        }
    }

    /// Loads the model of `record`, or the base model for `None`.
    pub async fn load(
        &self,
        loader: &dyn PolicyLoader,
        record: Option<&AdapterRecord>,
    ) -> Result<Arc<dyn Policy>> {
        let Some(record) = record else {
            return loader.load(None, None).await;
        };
        let path = merged_model_path(&self.folder(record).await?);
        if !path.is_file() {
            return Err(LoopError::Adapter(format!(
                "adapter v{}: its merged model {} is missing",
                record.version,
                path.display()
            )));
        }
        loader
            .load(Some(&path), Some(record.version))
            .await
            .map_err(|e| {
                LoopError::Adapter(format!("adapter v{} does not load: {e}", record.version))
            })
    }

    /// The model a (re)starting process must serve: the registry's promoted adapter, or the
    /// base model when none is promoted. A promoted adapter that does not load is an error
    /// naming it, never a silent fall-back to another model.
    pub async fn load_promoted(&self, loader: &dyn PolicyLoader) -> Result<Arc<dyn Policy>> {
        let promoted = self.store.promoted().await?;
        self.load(loader, promoted.as_ref())
            .await
            .map_err(|e| match promoted {
                Some(record) => LoopError::Adapter(format!(
                    "the registry's promoted adapter v{} cannot be served ({e}); roll it back \
                     with `searchloop adapters rollback`",
                    record.version
                )),
                None => e,
            })
    }
}

/// What a change of the served adapter did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapReport {
    /// The version served before (`None`: the base model).
    pub from: Option<u64>,
    /// The version served now.
    pub to: Option<u64>,
    /// Time spent loading the new model, in milliseconds (0 when nothing was loaded).
    pub load_ms: u64,
}

/// Promotes and rolls back adapters in the registry and, when it serves, in this process.
pub struct AdapterManager {
    locator: AdapterLocator,
    loader: Arc<dyn PolicyLoader>,
    slot: Option<Arc<PolicySlot>>,
    /// One registry change at a time, so the registry's order and the swaps' order agree.
    change: tokio::sync::Mutex<()>,
    counters: Arc<LoopCounters>,
}

impl std::fmt::Debug for AdapterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterManager")
            .field("store", &self.locator.store().location())
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl AdapterManager {
    /// A manager that swaps the models it promotes into `slot`.
    pub fn serving(
        locator: AdapterLocator,
        loader: Arc<dyn PolicyLoader>,
        slot: Arc<PolicySlot>,
    ) -> Self {
        Self {
            locator,
            loader,
            slot: Some(slot),
            change: tokio::sync::Mutex::new(()),
            counters: Arc::default(),
        }
    }

    /// A manager for a process that serves nothing (the `searchloop adapters` command): it still
    /// loads every target to prove it servable before writing the registry, then drops it. A
    /// serving process picks the change up with [`AdapterManager::sync`].
    pub fn registry_only(locator: AdapterLocator, loader: Arc<dyn PolicyLoader>) -> Self {
        Self {
            locator,
            loader,
            slot: None,
            change: tokio::sync::Mutex::new(()),
            counters: Arc::default(),
        }
    }

    /// The version serving new episodes (`None`: the base model, or nothing served here).
    pub fn serving_version(&self) -> Option<u64> {
        self.slot
            .as_ref()
            .and_then(|s| s.current().adapter_version())
    }

    /// Every registered adapter, oldest first.
    pub async fn list(&self) -> Result<Vec<AdapterRecord>> {
        Ok(self.store().list_adapters().await?)
    }

    /// Adapter `version`, or an error naming it.
    pub async fn get(&self, version: u64) -> Result<AdapterRecord> {
        self.store()
            .get_adapter(version)
            .await?
            .ok_or(LoopError::UnknownAdapter(version))
    }

    /// Promotes adapter `version` (a candidate, or a superseded one) and serves it.
    pub async fn promote(&self, version: u64) -> Result<SwapReport> {
        let _change = self.change.lock().await;
        let record = self.get(version).await?;
        if !matches!(
            record.status,
            AdapterStatus::Candidate | AdapterStatus::Superseded | AdapterStatus::Promoted
        ) {
            return Err(LoopError::Adapter(format!(
                "adapter v{version} is {} and cannot be promoted",
                record.status
            )));
        }
        if record.status == AdapterStatus::Promoted && self.serves(Some(version)) {
            return Ok(SwapReport {
                from: Some(version),
                to: Some(version),
                load_ms: 0,
            });
        }
        let started = Instant::now();
        let policy = self
            .locator
            .load(self.loader.as_ref(), Some(&record))
            .await?;
        self.commit_promotion(version, policy, started).await
    }

    /// Promotes `version`, whose model the caller has already loaded (the eval gate has).
    pub(crate) async fn promote_loaded(
        &self,
        version: u64,
        policy: Arc<dyn Policy>,
    ) -> Result<SwapReport> {
        let _change = self.change.lock().await;
        self.commit_promotion(version, policy, Instant::now()).await
    }

    async fn commit_promotion(
        &self,
        version: u64,
        policy: Arc<dyn Policy>,
        started: Instant,
    ) -> Result<SwapReport> {
        let load_ms = started.elapsed().as_millis() as u64;
        let before = self.store().promoted().await?.map(|r| r.version);
        self.store().promote(version).await?;
        bump(&self.counters.promotions);
        Ok(self.swap_in(policy, before, load_ms))
    }

    /// Rolls the promoted adapter back to `to` (a superseded adapter) or, by default, to the
    /// most recently promoted adapter that is still superseded, or to the base model when there
    /// is none; `reason` is recorded.
    pub async fn rollback(&self, to: Option<u64>, reason: &str) -> Result<SwapReport> {
        let _change = self.change.lock().await;
        let Some(current) = self.store().promoted().await? else {
            return Err(LoopError::Adapter(
                "nothing is promoted, so there is nothing to roll back".into(),
            ));
        };
        let target = match to {
            Some(version) => {
                let record = self.get(version).await?;
                if record.status != AdapterStatus::Superseded {
                    return Err(LoopError::Adapter(format!(
                        "adapter v{version} is {}; only a formerly promoted (superseded) adapter \
                         can be rolled back to",
                        record.status
                    )));
                }
                Some(record)
            }
            None => self.default_rollback_target().await?,
        };
        let started = Instant::now();
        let mut policy = self
            .locator
            .load(self.loader.as_ref(), target.as_ref())
            .await?;
        let promoted = self
            .store()
            .rollback(target.as_ref().map(|r| r.version), reason)
            .await?;
        // Without an explicit target the store chooses inside its transaction; another process
        // may have changed the registry since the target was read, and the registry wins.
        if promoted.as_ref().map(|r| r.version) != target.as_ref().map(|r| r.version) {
            policy = self
                .locator
                .load(self.loader.as_ref(), promoted.as_ref())
                .await?;
        }
        let load_ms = started.elapsed().as_millis() as u64;
        bump(&self.counters.rollbacks);
        Ok(self.swap_in(policy, Some(current.version), load_ms))
    }

    /// The adapter [`Store::rollback`] returns to when given no target.
    async fn default_rollback_target(&self) -> Result<Option<AdapterRecord>> {
        let mut adapters: HashMap<u64, AdapterRecord> = self
            .store()
            .list_adapters()
            .await?
            .into_iter()
            .map(|a| (a.version, a))
            .collect();
        let history = self.store().promotion_history().await?;
        let target = history
            .iter()
            .rev()
            .filter_map(|event| event.version)
            .find(|v| {
                adapters
                    .get(v)
                    .is_some_and(|a| a.status == AdapterStatus::Superseded)
            });
        Ok(target.and_then(|v| adapters.remove(&v)))
    }

    /// Makes this process serve the registry's promoted adapter if it serves another (a change
    /// made by another process). Returns the swap, if one was needed.
    pub async fn sync(&self) -> Result<Option<SwapReport>> {
        if self.slot.is_none() {
            return Ok(None);
        }
        let _change = self.change.lock().await;
        let promoted = self.store().promoted().await?;
        if self.serves(promoted.as_ref().map(|r| r.version)) {
            self.counters.clear_sync_failure();
            return Ok(None);
        }
        let started = Instant::now();
        // A replica that cannot load the registry's choice keeps serving what it has, and says
        // so in its metrics until a later attempt succeeds.
        let policy = match self
            .locator
            .load(self.loader.as_ref(), promoted.as_ref())
            .await
        {
            Ok(policy) => policy,
            Err(e) => {
                self.counters.record_sync_failure(&e.to_string());
                return Err(e);
            }
        };
        let load_ms = started.elapsed().as_millis() as u64;
        self.counters.clear_sync_failure();
        Ok(Some(self.swap_in(policy, None, load_ms)))
    }

    /// The counters of swaps and rounds.
    pub(crate) fn counters(&self) -> &Arc<LoopCounters> {
        &self.counters
    }

    /// The store.
    pub(crate) fn store(&self) -> &Arc<Store> {
        self.locator.store()
    }

    /// Where adapters' folders are found.
    pub(crate) fn locator(&self) -> &AdapterLocator {
        &self.locator
    }

    /// The loader.
    pub(crate) fn loader(&self) -> &Arc<dyn PolicyLoader> {
        &self.loader
    }

    fn serves(&self, version: Option<u64>) -> bool {
        self.slot.is_none() || self.serving_version() == version
    }

    /// Routes new episodes to `policy`; the old model lives on in the episodes that hold it and
    /// is dropped with the last of them. Without a slot, `registry_before` is what the registry
    /// promoted before the change.
    fn swap_in(
        &self,
        policy: Arc<dyn Policy>,
        registry_before: Option<u64>,
        load_ms: u64,
    ) -> SwapReport {
        let to = policy.adapter_version();
        let from = match &self.slot {
            Some(slot) => {
                bump(&self.counters.swaps);
                self.counters
                    .last_swap_load_ms
                    .store(load_ms, std::sync::atomic::Ordering::Relaxed);
                slot.swap(policy).adapter_version()
            }
            None => registry_before,
        };
        tracing::info!(?from, ?to, load_ms, "served adapter changed");
        SwapReport { from, to, load_ms }
    }
}
