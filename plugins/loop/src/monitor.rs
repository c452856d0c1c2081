//! The live monitor: rolls a fresh promotion back automatically when the online reward of the
//! new adapter falls below the one it replaced by a configured margin over a configured window.
//!
//! Only the stint that began with the latest registry event counts, and only when that event is
//! a promotion: after a rollback there is nothing to watch (so the monitor cannot flap). The new
//! adapter's window is its most recent rewarded episodes since that promotion; the old one's is
//! the most recent rewarded episodes the replaced version (or the base model) served before it.
//! Episodes that carry a group id are training rollouts (replay groups), not traffic, and are
//! left out of both windows.

use searchloop_store_sql::{Page, PromotionAction, Store, TrajectoryFilter};
use serde::{Deserialize, Serialize};

use crate::error::{LoopError, Result};

/// The `[learn.monitor]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Whether the monitor may roll back on its own.
    pub enabled: bool,
    /// Rewarded episodes of each side compared (the newest ones).
    pub window: usize,
    /// How far below the old adapter's mean online reward the new one's may fall.
    pub margin: f64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 32,
            margin: 0.1,
        }
    }
}

impl MonitorConfig {
    /// Checks the window and the margin.
    pub fn validate(&self) -> Result<()> {
        if self.window == 0 || self.window > Page::MAX_LIMIT {
            return Err(LoopError::Config(format!(
                "learn.monitor.window must be between 1 and {}, got {}",
                Page::MAX_LIMIT,
                self.window
            )));
        }
        if !self.margin.is_finite() || self.margin < 0.0 {
            return Err(LoopError::Config(format!(
                "learn.monitor.margin must be finite and >= 0, got {}",
                self.margin
            )));
        }
        Ok(())
    }
}

/// A comparison that calls for a rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineRegression {
    /// The promoted adapter under watch.
    pub version: u64,
    /// The version it replaced (`None`: the base model).
    pub replaced: Option<u64>,
    /// Mean online reward of the promoted adapter over the window.
    pub new_mean: f64,
    /// Mean online reward of the replaced version over the window.
    pub old_mean: f64,
    /// Episodes on each side.
    pub window: usize,
}

impl OnlineRegression {
    /// The reason recorded with the rollback.
    pub fn reason(&self) -> String {
        let old = self
            .replaced
            .map_or_else(|| "the base model".to_string(), |v| format!("v{v}"));
        format!(
            "automatic rollback: online reward of v{} ({:.4}) fell below {old}'s ({:.4}) by more \
             than the margin over {} episodes",
            self.version, self.new_mean, self.old_mean, self.window
        )
    }
}

/// Whether `new` (the promoted adapter's rewards) regressed against `old`: both need a full
/// window, then the means are compared with the margin.
pub fn regressed(new: &[f64], old: &[f64], config: &MonitorConfig) -> Option<(f64, f64)> {
    if new.len() < config.window || old.len() < config.window {
        return None;
    }
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (new_mean, old_mean) = (mean(new), mean(old));
    (new_mean < old_mean - config.margin).then_some((new_mean, old_mean))
}

/// Reads the current stint from the registry and the two windows from the store, and reports a
/// regression that calls for a rollback.
pub async fn check(store: &Store, config: &MonitorConfig) -> Result<Option<OnlineRegression>> {
    if !config.enabled {
        return Ok(None);
    }
    let history = store.promotion_history().await?;
    let Some((last, earlier)) = history.split_last() else {
        return Ok(None);
    };
    let (PromotionAction::Promote, Some(version)) = (last.action, last.version) else {
        return Ok(None);
    };
    let replaced = earlier.last().and_then(|e| e.version);
    let new = online_rewards(
        store,
        TrajectoryFilter {
            adapter_version: Some(Some(version)),
            created_after: Some(last.at),
            rewarded_only: true,
            ..TrajectoryFilter::default()
        },
        config.window,
    )
    .await?;
    if new.len() < config.window {
        return Ok(None);
    }
    let old = online_rewards(
        store,
        TrajectoryFilter {
            adapter_version: Some(replaced),
            created_before: Some(last.at),
            rewarded_only: true,
            ..TrajectoryFilter::default()
        },
        config.window,
    )
    .await?;
    Ok(
        regressed(&new, &old, config).map(|(new_mean, old_mean)| OnlineRegression {
            version,
            replaced,
            new_mean,
            old_mean,
            window: config.window,
        }),
    )
}

/// The training rewards of the newest `window` traffic episodes (no group id) matching `filter`.
async fn online_rewards(
    store: &Store,
    filter: TrajectoryFilter,
    window: usize,
) -> Result<Vec<f64>> {
    let mut rewards = Vec::with_capacity(window);
    let mut page = Page::first(window.clamp(64, Page::MAX_LIMIT));
    loop {
        let listed = store.list_trajectories(&filter, &page).await?;
        rewards.extend(
            listed
                .items
                .iter()
                .filter(|t| t.group_id.is_none())
                .filter_map(|t| t.reward)
                .take(window - rewards.len()),
        );
        match listed.next {
            Some(next) if rewards.len() < window => page.after = Some(next),
            _ => return Ok(rewards),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regression_needs_full_windows_and_the_margin() {
        let config = MonitorConfig {
            enabled: true,
            window: 3,
            margin: 0.1,
        };
        assert_eq!(regressed(&[0.0; 2], &[1.0; 3], &config), None);
        assert_eq!(regressed(&[0.0; 3], &[1.0; 2], &config), None);
        assert_eq!(regressed(&[0.95; 3], &[1.0; 3], &config), None);
        assert_eq!(regressed(&[0.5; 3], &[1.0; 3], &config), Some((0.5, 1.0)));
    }

    #[test]
    fn bad_monitor_configs_are_refused() {
        for (config, field) in [
            (
                MonitorConfig {
                    window: 0,
                    ..MonitorConfig::default()
                },
                "window",
            ),
            (
                MonitorConfig {
                    margin: f64::NAN,
                    ..MonitorConfig::default()
                },
                "margin",
            ),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
