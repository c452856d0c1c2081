//! What every request handler shares: the agent, the store, the metrics, and the shutdown state.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicBool, Ordering},
};

use searchloop_core::Agent;
use searchloop_runtime::Runtime;
use searchloop_store_sql::Store;
use tokio_util::sync::CancellationToken;

use crate::{api::LastRound, metrics::Metrics};

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
    rounds: RoundTracker,
}

/// The training rounds started over HTTP: whether one is on its way, and how the last ended.
#[derive(Default)]
struct RoundTracker {
    pending: AtomicBool,
    last: Mutex<Option<LastRound>>,
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
                rounds: RoundTracker::default(),
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

    /// The runtime, when the server runs over one (adapters and training need it).
    pub fn runtime(&self) -> Option<&Arc<Runtime>> {
        match &self.shared.agent {
            AgentSource::Agent(_) => None,
            AgentSource::Runtime(runtime) => Some(runtime),
        }
    }

    /// Claims the right to start a round over HTTP; `false` while one started here is still
    /// running. [`AppState::round_finished`] gives it back.
    pub(crate) fn claim_round(&self) -> bool {
        self.shared
            .rounds
            .pending
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Records how the round started over HTTP ended, and lets the next one start.
    pub(crate) fn round_finished(&self, last: LastRound) {
        *self
            .shared
            .rounds
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(last);
        self.shared.rounds.pending.store(false, Ordering::SeqCst);
    }

    /// Whether a round started over HTTP is running, and how the last one ended.
    pub(crate) fn rounds(&self) -> (bool, Option<LastRound>) {
        let last = self
            .shared
            .rounds
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (self.shared.rounds.pending.load(Ordering::SeqCst), last)
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
