//! What every request handler shares: the agent, the store, the metrics, and the shutdown state.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use searchloop_core::Agent;
use searchloop_runtime::Runtime;
use searchloop_store_sql::Store;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Where the agent lives: shared on its own, or inside a started [`Runtime`] (which owns it).
enum AgentSource {
    Agent(Arc<Agent>),
    Runtime(Arc<Runtime>),
}

struct Shared {
    agent: AgentSource,
    store: Arc<Store>,
    metrics: Metrics,
    shutting_down: AtomicBool,
    abandon: CancellationToken,
}

/// The state of one server: cheap to clone, every clone sees the same agent, store and metrics.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("agent", self.agent())
            .field("store", &self.shared.store.location())
            .field("shutting_down", &self.is_shutting_down())
            .finish()
    }
}

impl AppState {
    /// A server over `agent`, reading trajectories and writing feedback through `store`. The
    /// agent must record its episodes into the same store (`agent.with_sink(store)`), or the
    /// ids the server hands out cannot be looked up or given feedback.
    pub fn new(agent: Arc<Agent>, store: Arc<Store>) -> Self {
        Self::with_source(AgentSource::Agent(agent), store)
    }

    /// A server over a started runtime's agent and store (the runtime records every episode
    /// into its store).
    pub fn from_runtime(runtime: Arc<Runtime>) -> Self {
        let store = Arc::clone(runtime.store());
        Self::with_source(AgentSource::Runtime(runtime), store)
    }

    fn with_source(agent: AgentSource, store: Arc<Store>) -> Self {
        Self {
            shared: Arc::new(Shared {
                agent,
                store,
                metrics: Metrics::default(),
                shutting_down: AtomicBool::new(false),
                abandon: CancellationToken::new(),
            }),
        }
    }

    /// The agent that answers questions.
    pub fn agent(&self) -> &Agent {
        match &self.shared.agent {
            AgentSource::Agent(agent) => agent,
            AgentSource::Runtime(runtime) => runtime.agent(),
        }
    }

    /// The trajectory store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Whether shutdown has begun (new episodes are refused).
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    /// Marks the start of shutdown: from now on new episodes get 503, and health checks report
    /// it so load balancers stop routing here.
    pub(crate) fn begin_shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Fires when the shutdown grace period has run out: requests still running are answered
    /// with 503 and their work dropped.
    pub(crate) fn abandon_token(&self) -> &CancellationToken {
        &self.shared.abandon
    }
}
