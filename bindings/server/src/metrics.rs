//! The server's Prometheus metrics: request counts and latency histograms per route and status,
//! episode outcomes, tool calls and their errors, generated tokens, feedback, and the store's
//! counts read at scrape time. Rendered in the Prometheus text format (version 0.0.4).
//!
//! The registry is a handful of counters behind one mutex: a request touches it once, for
//! microseconds, so it never contends at the request rates a CPU-served model reaches, and the
//! crate needs no metrics framework.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use searchloop_core::{EpisodeEnd, SegmentKind, Trajectory};
use searchloop_runtime::{LoopMetrics, LossMetrics};
use searchloop_store_sql::{FeedbackOutcome, SourceCount, StoreStats};

/// Upper bounds (seconds) of the latency histogram buckets: from a health check (~1 ms) to a
/// long real-model episode under load (~1 min).
const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The labels of one request series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RequestKey {
    route: String,
    method: String,
    status: u16,
}

/// A latency histogram: per-bucket counts (not cumulative), the count and the sum.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|le| seconds <= *le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Tool calls of one tool.
#[derive(Debug, Clone, Copy, Default)]
struct ToolCounts {
    calls: u64,
    errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: BTreeMap<RequestKey, Histogram>,
    episodes: BTreeMap<&'static str, u64>,
    episode_failures: u64,
    tools: BTreeMap<String, ToolCounts>,
    tokens_generated: u64,
    feedback: BTreeMap<&'static str, u64>,
}

/// What the store held at scrape time, or why it could not be read.
#[derive(Debug)]
pub enum StoreSnapshot {
    /// The store answered.
    Read {
        /// Its counts.
        stats: StoreStats,
        /// Its ledger entries per reward source.
        by_source: Vec<SourceCount>,
    },
    /// The store failed; the scrape still reports the in-process metrics.
    Unavailable,
}

/// The server's metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    in_flight: AtomicU64,
}

impl Metrics {
    fn counters(&self) -> MutexGuard<'_, Counters> {
        // A panic while holding the lock can at worst leave one counter short; the counts are
        // still worth serving, so a poisoned lock is used as it is.
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request began.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// A request ended with `status` after `elapsed`. `route` is the route template (never the
    /// raw path, so ids do not become series).
    pub fn request_finished(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let key = RequestKey {
            route: route.to_string(),
            method: method.to_string(),
            status,
        };
        self.counters()
            .requests
            .entry(key)
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Counts a finished episode: its end, its tool calls and the tokens the model generated.
    pub fn episode_finished(&self, trajectory: &Trajectory) {
        let generated: u64 = trajectory
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Model)
            .map(|s| u64::from(s.end - s.start))
            .sum();
        let mut counters = self.counters();
        *counters
            .episodes
            .entry(end_label(trajectory.end))
            .or_default() += 1;
        counters.tokens_generated += generated;
        for call in &trajectory.tool_calls {
            let tool = counters.tools.entry(call.tool.clone()).or_default();
            tool.calls += 1;
            tool.errors += u64::from(!call.ok);
        }
    }

    /// Counts an episode that failed (model or store error).
    pub fn episode_failed(&self) {
        self.counters().episode_failures += 1;
    }

    /// Counts accepted feedback.
    pub fn feedback(&self, outcome: FeedbackOutcome) {
        let label = match outcome {
            FeedbackOutcome::Recorded => "recorded",
            FeedbackOutcome::Duplicate => "duplicate",
        };
        *self.counters().feedback.entry(label).or_default() += 1;
    }

    /// The metrics in the Prometheus text format, with the served model's identity, the
    /// replica's name in a fleet (empty when it has none) and the store's counts.
    pub fn render(
        &self,
        model_id: &str,
        adapter_version: Option<u64>,
        replica_id: Option<&str>,
        store: &StoreSnapshot,
    ) -> String {
        let mut out = String::new();
        let c = self.counters();

        header(
            &mut out,
            "searchloop_http_requests_total",
            "counter",
            "HTTP requests answered, by route template, method and status.",
        );
        for (k, h) in &c.requests {
            let labels = request_labels(k);
            let _ = writeln!(
                out,
                "searchloop_http_requests_total{{{labels}}} {}",
                h.count
            );
        }
        header(
            &mut out,
            "searchloop_http_request_duration_seconds",
            "histogram",
            "Time to answer an HTTP request, by route template, method and status.",
        );
        for (k, h) in &c.requests {
            let labels = request_labels(k);
            let mut cumulative = 0;
            for (le, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "searchloop_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "searchloop_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "searchloop_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "searchloop_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        header(
            &mut out,
            "searchloop_http_requests_in_flight",
            "gauge",
            "HTTP requests being answered.",
        );
        let _ = writeln!(
            out,
            "searchloop_http_requests_in_flight {}",
            self.in_flight()
        );

        header(
            &mut out,
            "searchloop_episodes_total",
            "counter",
            "Episodes run by this server, by how they ended.",
        );
        for end in [
            EpisodeEnd::Answered,
            EpisodeEnd::NoAnswer,
            EpisodeEnd::TokenLimit,
        ] {
            let label = end_label(end);
            let n = c.episodes.get(label).copied().unwrap_or(0);
            let _ = writeln!(out, "searchloop_episodes_total{{end=\"{label}\"}} {n}");
        }
        header(
            &mut out,
            "searchloop_episode_failures_total",
            "counter",
            "Episodes that failed with a model or store error.",
        );
        let _ = writeln!(
            out,
            "searchloop_episode_failures_total {}",
            c.episode_failures
        );
        header(
            &mut out,
            "searchloop_tool_calls_total",
            "counter",
            "Tool calls made by episodes of this server, by tool.",
        );
        for (tool, n) in &c.tools {
            let _ = writeln!(
                out,
                "searchloop_tool_calls_total{{tool=\"{}\"}} {}",
                escape(tool),
                n.calls
            );
        }
        header(
            &mut out,
            "searchloop_tool_call_errors_total",
            "counter",
            "Tool calls that failed (the error became the observation), by tool.",
        );
        for (tool, n) in &c.tools {
            let _ = writeln!(
                out,
                "searchloop_tool_call_errors_total{{tool=\"{}\"}} {}",
                escape(tool),
                n.errors
            );
        }
        header(
            &mut out,
            "searchloop_tokens_generated_total",
            "counter",
            "Tokens sampled by the model in episodes of this server.",
        );
        let _ = writeln!(
            out,
            "searchloop_tokens_generated_total {}",
            c.tokens_generated
        );
        header(
            &mut out,
            "searchloop_feedback_total",
            "counter",
            "Feedback accepted, by outcome.",
        );
        for label in ["recorded", "duplicate"] {
            let n = c.feedback.get(label).copied().unwrap_or(0);
            let _ = writeln!(out, "searchloop_feedback_total{{outcome=\"{label}\"}} {n}");
        }
        drop(c);

        header(
            &mut out,
            "searchloop_serving_info",
            "gauge",
            "The served model and adapter, and this replica's name (always 1).",
        );
        let _ = writeln!(
            out,
            "searchloop_serving_info{{model_id=\"{}\",adapter_version=\"{}\",replica=\"{}\"}} 1",
            escape(model_id),
            version_label(adapter_version),
            escape(replica_id.unwrap_or_default())
        );
        render_store(&mut out, store);
        out
    }
}

/// Appends the learning loop's figures: rounds by outcome, the gate's decisions, swaps by kind,
/// and the durations of the last round and the last swap's model load.
pub fn render_loop(out: &mut String, m: &LoopMetrics) {
    header(
        out,
        "searchloop_training_rounds_total",
        "counter",
        "Training rounds of this process, by outcome (started counts every round begun).",
    );
    for (outcome, n) in [
        ("started", m.rounds_started),
        ("completed", m.rounds_completed),
        ("failed", m.rounds_failed),
        ("cancelled", m.rounds_cancelled),
    ] {
        let _ = writeln!(
            out,
            "searchloop_training_rounds_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    header(
        out,
        "searchloop_training_round_running",
        "gauge",
        "1 while a training round runs, else 0.",
    );
    let _ = writeln!(
        out,
        "searchloop_training_round_running {}",
        u8::from(m.round_running)
    );
    header(
        out,
        "searchloop_training_last_round_seconds",
        "gauge",
        "Wall time of the last finished round, eval gate included.",
    );
    let _ = writeln!(
        out,
        "searchloop_training_last_round_seconds {}",
        m.last_round_ms as f64 / 1e3
    );
    header(
        out,
        "searchloop_gate_decisions_total",
        "counter",
        "Candidates judged by the eval gate, by decision.",
    );
    for (decision, n) in [
        ("promoted", m.candidates_promoted),
        ("rejected", m.candidates_rejected),
    ] {
        let _ = writeln!(
            out,
            "searchloop_gate_decisions_total{{decision=\"{decision}\"}} {n}"
        );
    }
    header(
        out,
        "searchloop_adapter_swaps_total",
        "counter",
        "Served-model swaps in this process, by kind (sync: following a change another process \
         made to the registry).",
    );
    let manual_rollbacks = m.rollbacks.saturating_sub(m.auto_rollbacks);
    let syncs = m.swaps.saturating_sub(m.promotions + m.rollbacks);
    for (kind, n) in [
        ("promotion", m.promotions),
        ("rollback", manual_rollbacks),
        ("auto_rollback", m.auto_rollbacks),
        ("sync", syncs),
    ] {
        let _ = writeln!(out, "searchloop_adapter_swaps_total{{kind=\"{kind}\"}} {n}");
    }
    header(
        out,
        "searchloop_adapter_last_swap_load_seconds",
        "gauge",
        "Time to load the model of the last swap.",
    );
    let _ = writeln!(
        out,
        "searchloop_adapter_last_swap_load_seconds {}",
        m.last_swap_load_ms as f64 / 1e3
    );
    header(
        out,
        "searchloop_adapter_sync_failures_total",
        "counter",
        "Failed attempts to load the adapter the registry promoted (the process kept serving its own).",
    );
    let _ = writeln!(
        out,
        "searchloop_adapter_sync_failures_total {}",
        m.registry_sync_failures
    );
    header(
        out,
        "searchloop_adapter_behind_registry",
        "gauge",
        "1 while this process serves another version than the registry promoted, after a failed load.",
    );
    let _ = writeln!(
        out,
        "searchloop_adapter_behind_registry {}",
        u8::from(m.registry_sync_error.is_some())
    );
    if let Some(loss) = &m.last_round_loss {
        render_round_loss(out, loss);
    }
}

/// Appends the policy-loss diagnostics of the last round as gauges: the importance ratio
/// against the sampling policy, what the loss clipped, what the SAPO and LLDS terms acted on,
/// GSPO's sequence ratio and the sampler correction's weights, each only where it was measured.
fn render_round_loss(out: &mut String, loss: &LossMetrics) {
    let gauges: [(&str, &str, Option<f64>); 8] = [
        (
            "searchloop_training_ratio_mean",
            "Mean token importance ratio pi_theta / pi_old over the last round's steps.",
            Some(loss.ratio_mean),
        ),
        (
            "searchloop_training_clip_fraction",
            "Fraction of the last round's trained tokens the policy loss clipped.",
            Some(loss.clip_frac),
        ),
        (
            "searchloop_training_sapo_active_fraction",
            "Fraction of the last round's trained tokens where the SAPO indicator was on.",
            Some(loss.sapo_active_frac),
        ),
        (
            "searchloop_training_llds_active_fraction",
            "Fraction of the last round's trained tokens the LLDS penalty acted on.",
            Some(loss.llds_active_frac),
        ),
        (
            "searchloop_training_sequence_ratio_mean",
            "Mean length-normalised sequence ratio (the ratio GSPO clips) in the last round.",
            loss.seq_ratio_mean,
        ),
        (
            "searchloop_training_is_weight_mean",
            "Mean sampler-correction weight over the last round's trained tokens.",
            loss.is_weight_mean,
        ),
        (
            "searchloop_training_is_clip_fraction_positive",
            "Fraction of A >= 0 tokens the sampler correction truncated or masked.",
            loss.is_clip_frac_pos,
        ),
        (
            "searchloop_training_is_clip_fraction_negative",
            "Fraction of A < 0 tokens the sampler correction truncated or masked.",
            loss.is_clip_frac_neg,
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(value) = value.filter(|v| v.is_finite()) {
            header(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

fn render_store(out: &mut String, store: &StoreSnapshot) {
    header(
        out,
        "searchloop_store_up",
        "gauge",
        "1 when the store answered this scrape, else 0.",
    );
    let StoreSnapshot::Read { stats, by_source } = store else {
        let _ = writeln!(out, "searchloop_store_up 0");
        return;
    };
    let _ = writeln!(out, "searchloop_store_up 1");
    let gauges = [
        (
            "searchloop_store_trajectories",
            "Trajectories stored.",
            stats.trajectories,
        ),
        (
            "searchloop_store_rewarded_trajectories",
            "Trajectories with at least one reward.",
            stats.rewarded_trajectories,
        ),
        ("searchloop_store_groups", "Training groups.", stats.groups),
        (
            "searchloop_store_reward_entries",
            "Reward ledger entries.",
            stats.reward_entries,
        ),
        (
            "searchloop_store_feedback_entries",
            "Ledger entries delivered as host feedback.",
            stats.feedback_entries,
        ),
        (
            "searchloop_store_adapters",
            "Registered adapters.",
            stats.adapters,
        ),
        (
            "searchloop_store_size_bytes",
            "Bytes the store occupies.",
            stats.size_bytes,
        ),
    ];
    for (name, help, value) in gauges {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        out,
        "searchloop_store_trajectories_by_adapter",
        "gauge",
        "Trajectories per adapter version that served them (base = no adapter).",
    );
    for v in &stats.by_adapter_version {
        let _ = writeln!(
            out,
            "searchloop_store_trajectories_by_adapter{{adapter_version=\"{}\"}} {}",
            version_label(v.adapter_version),
            v.trajectories
        );
    }
    header(
        out,
        "searchloop_store_reward_entries_by_source",
        "gauge",
        "Reward ledger entries per source.",
    );
    for s in by_source {
        let _ = writeln!(
            out,
            "searchloop_store_reward_entries_by_source{{source=\"{}\"}} {}",
            escape(&s.source),
            s.entries
        );
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn request_labels(k: &RequestKey) -> String {
    format!(
        "route=\"{}\",method=\"{}\",status=\"{}\"",
        escape(&k.route),
        escape(&k.method),
        k.status
    )
}

fn end_label(end: EpisodeEnd) -> &'static str {
    match end {
        EpisodeEnd::Answered => "answered",
        EpisodeEnd::NoAnswer => "no_answer",
        EpisodeEnd::TokenLimit => "token_limit",
    }
}

fn version_label(version: Option<u64>) -> String {
    version.map_or_else(|| "base".to_string(), |v| v.to_string())
}

/// Escapes a label value as the text format requires (backslash, double quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_consistent() {
        let metrics = Metrics::default();
        for ms in [0.5, 3.0, 3.0, 700.0, 90_000.0] {
            metrics.request_started();
            metrics.request_finished("/v1/ask", "POST", 200, Duration::from_secs_f64(ms / 1e3));
        }
        let text = metrics.render("m\"1", None, Some("r-1"), &StoreSnapshot::Unavailable);
        let series = "route=\"/v1/ask\",method=\"POST\",status=\"200\"";
        assert!(
            text.contains(&format!("searchloop_http_requests_total{{{series}}} 5")),
            "{text}"
        );
        assert!(
            text.contains(&format!("_bucket{{{series},le=\"0.001\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("_bucket{{{series},le=\"0.005\"}} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!("_bucket{{{series},le=\"60\"}} 4")),
            "{text}"
        );
        assert!(
            text.contains(&format!("_bucket{{{series},le=\"+Inf\"}} 5")),
            "{text}"
        );
        assert!(
            text.contains("searchloop_http_requests_in_flight 0"),
            "{text}"
        );
        assert!(
            text.contains("model_id=\"m\\\"1\",adapter_version=\"base\",replica=\"r-1\""),
            "{text}"
        );
        assert!(text.contains("searchloop_store_up 0"), "{text}");
    }

    #[test]
    fn the_last_rounds_loss_diagnostics_are_gauges_where_measured() {
        let mut out = String::new();
        render_loop(&mut out, &LoopMetrics::default());
        assert!(!out.contains("searchloop_training_ratio_mean"), "{out}");
        assert!(
            out.contains("\nsearchloop_adapter_behind_registry 0\n"),
            "{out}"
        );
        let mut out = String::new();
        let behind = LoopMetrics {
            registry_sync_failures: 2,
            registry_sync_error: Some("adapter v3: its merged model is missing".into()),
            ..LoopMetrics::default()
        };
        render_loop(&mut out, &behind);
        assert!(
            out.contains("\nsearchloop_adapter_behind_registry 1\n"),
            "{out}"
        );
        assert!(
            out.contains("\nsearchloop_adapter_sync_failures_total 2\n"),
            "{out}"
        );

        let loss = LossMetrics {
            ratio_mean: 1.25,
            clip_frac: 0.5,
            seq_ratio_mean: Some(0.75),
            is_weight_mean: None,
            ratio_min: f64::NAN,
            ..LossMetrics::default()
        };
        let metrics = LoopMetrics {
            last_round_loss: Some(loss),
            ..LoopMetrics::default()
        };
        let mut out = String::new();
        render_loop(&mut out, &metrics);
        assert!(
            out.contains("\nsearchloop_training_ratio_mean 1.25\n"),
            "{out}"
        );
        assert!(
            out.contains("\nsearchloop_training_clip_fraction 0.5\n"),
            "{out}"
        );
        assert!(
            out.contains("\nsearchloop_training_sequence_ratio_mean 0.75\n"),
            "{out}"
        );
        // Without a sampler correction its gauges are absent rather than zero.
        assert!(!out.contains("searchloop_training_is_weight_mean"), "{out}");
        assert!(
            !out.contains("searchloop_training_is_clip_fraction"),
            "{out}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
