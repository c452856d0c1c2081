//! Counters of the learning loop (training rounds, gate decisions, model swaps) for a host's
//! metrics endpoint: cheap atomics updated in place, read as one [`LoopMetrics`] snapshot.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use searchloop_train_sapo::{LossMetrics, TrainReport};
use serde::{Deserialize, Serialize};

/// A snapshot of the loop's counters since the process started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopMetrics {
    /// The adapter version serving new episodes (`None`: the base model).
    pub serving_version: Option<u64>,
    /// Training rounds started.
    pub rounds_started: u64,
    /// Rounds that produced a candidate.
    pub rounds_completed: u64,
    /// Rounds that failed (including those stopped by the memory cap).
    pub rounds_failed: u64,
    /// Rounds cancelled.
    pub rounds_cancelled: u64,
    /// Whether a round is running now.
    pub round_running: bool,
    /// Wall time of the last finished round, gate included, in milliseconds.
    pub last_round_ms: u64,
    /// Candidates the gate promoted.
    pub candidates_promoted: u64,
    /// Candidates the gate rejected.
    pub candidates_rejected: u64,
    /// Model swaps done in this process (promotions, rollbacks, registry follow-ups).
    pub swaps: u64,
    /// Of which promotions.
    pub promotions: u64,
    /// Of which rollbacks, automatic ones included.
    pub rollbacks: u64,
    /// Rollbacks started by the online monitor.
    pub auto_rollbacks: u64,
    /// Time to load the model of the last swap, in milliseconds.
    pub last_swap_load_ms: u64,
    /// The policy-loss diagnostics of the last completed round (importance ratios, clipped
    /// and masked fractions, the active fractions of the SAPO and LLDS terms), merged over its
    /// optimizer steps; `None` before the first round or when it took no step.
    pub last_round_loss: Option<LossMetrics>,
    /// Times this process failed to load the adapter the registry says to serve.
    pub registry_sync_failures: u64,
    /// Why the last attempt to follow the registry failed, while this process still serves an
    /// older version than the registry's; `None` when it serves what the registry says.
    pub registry_sync_error: Option<String>,
}

/// The live counters behind [`LoopMetrics`].
#[derive(Debug, Default)]
pub(crate) struct LoopCounters {
    pub(crate) rounds_started: AtomicU64,
    pub(crate) rounds_completed: AtomicU64,
    pub(crate) rounds_failed: AtomicU64,
    pub(crate) rounds_cancelled: AtomicU64,
    pub(crate) round_running: AtomicBool,
    pub(crate) last_round_ms: AtomicU64,
    pub(crate) candidates_promoted: AtomicU64,
    pub(crate) candidates_rejected: AtomicU64,
    pub(crate) swaps: AtomicU64,
    pub(crate) promotions: AtomicU64,
    pub(crate) rollbacks: AtomicU64,
    pub(crate) auto_rollbacks: AtomicU64,
    pub(crate) last_swap_load_ms: AtomicU64,
    pub(crate) last_round_loss: Mutex<Option<LossMetrics>>,
    pub(crate) registry_sync_failures: AtomicU64,
    pub(crate) registry_sync_error: Mutex<Option<String>>,
}

/// Locks one of the counters' mutexes. A poisoned lock only means a panic elsewhere while it
/// was held; the values are plain data, so they are still sound to read and replace.
fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Adds one to a counter. Relaxed ordering: the counters are independent statistics, read
/// without any happens-before expectation between them.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl LoopCounters {
    /// Counts a failed attempt to load the registry's adapter and keeps its reason.
    pub(crate) fn record_sync_failure(&self, reason: &str) {
        bump(&self.registry_sync_failures);
        *relock(&self.registry_sync_error) = Some(reason.to_string());
    }

    /// Forgets the last sync failure: the process serves what the registry says.
    pub(crate) fn clear_sync_failure(&self) {
        *relock(&self.registry_sync_error) = None;
    }

    /// Keeps the loss diagnostics of a finished round's steps, merged, for the snapshot.
    pub(crate) fn record_round_loss(&self, train: &TrainReport) {
        let merged = train.steps.split_first().map(|(first, rest)| {
            let mut merged = first.loss.clone();
            for step in rest {
                merged.merge(&step.loss);
            }
            merged
        });
        *relock(&self.last_round_loss) = merged;
    }

    /// The counters now, with the version serving.
    pub(crate) fn snapshot(&self, serving_version: Option<u64>) -> LoopMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LoopMetrics {
            serving_version,
            rounds_started: get(&self.rounds_started),
            rounds_completed: get(&self.rounds_completed),
            rounds_failed: get(&self.rounds_failed),
            rounds_cancelled: get(&self.rounds_cancelled),
            round_running: self.round_running.load(Ordering::Relaxed),
            last_round_ms: get(&self.last_round_ms),
            candidates_promoted: get(&self.candidates_promoted),
            candidates_rejected: get(&self.candidates_rejected),
            swaps: get(&self.swaps),
            promotions: get(&self.promotions),
            rollbacks: get(&self.rollbacks),
            auto_rollbacks: get(&self.auto_rollbacks),
            last_swap_load_ms: get(&self.last_swap_load_ms),
            last_round_loss: relock(&self.last_round_loss).clone(),
            registry_sync_failures: get(&self.registry_sync_failures),
            registry_sync_error: relock(&self.registry_sync_error).clone(),
        }
    }
}
