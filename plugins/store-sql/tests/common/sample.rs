//! Realistic synthetic trajectories for the store's tests and benchmark: deterministic from a
//! seed, so a parent process can rebuild exactly what a child process wrote.

use chrono::{DateTime, Duration, Utc};
use rand::{Rng, SeedableRng, rngs::StdRng};
use searchloop_core::{
    EpisodeEnd, RewardEntry, SamplingParams, SegmentKind, Split, TaskInfo, Timing, ToolCallRecord,
    Trajectory, reward::source, trajectory::SequenceBuilder,
};

/// How a sample trajectory looks.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Total tokens, drawn uniformly from this range.
    pub tokens: std::ops::Range<usize>,
    /// The group id.
    pub group_id: Option<String>,
    /// The adapter version that served it.
    pub adapter_version: Option<u64>,
    /// Task metadata: `(task_id, split, kind)`.
    pub task: Option<(String, Split, String)>,
    /// Episode rewards recorded with it.
    pub rewarded: bool,
    /// The creation time.
    pub created_at: DateTime<Utc>,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            tokens: 1000..2000,
            group_id: None,
            adapter_version: None,
            task: None,
            rewarded: true,
            created_at: DateTime::from_timestamp(1_780_000_000, 123_456_789).unwrap_or_default(),
        }
    }
}

/// A seed derived from a string (FNV-1a), so ids map to content.
pub fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn words(rng: &mut StdRng, n: usize) -> String {
    const WORDS: &[&str] = &[
        "aurora",
        "tote",
        "leather",
        "price",
        "stock",
        "store",
        "blue",
        "size",
        "the",
        "in",
        "warranty",
        "vegan",
        "canvas",
        "boots",
        "return",
        "policy",
        "is",
        "available",
        "at",
    ];
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A trajectory with id `id` whose content follows from `id` and `shape` alone.
pub fn trajectory(id: &str, shape: &Shape) -> Trajectory {
    let mut rng = StdRng::seed_from_u64(seed_of(id));
    let total = rng.random_range(shape.tokens.clone());
    let token = |rng: &mut StdRng| rng.random_range(0..49_152u32);
    let prompt_len = (total / 3).max(1);
    let prompt: Vec<u32> = (0..prompt_len).map(|_| token(&mut rng)).collect();
    let mut b = SequenceBuilder::new(prompt);
    let mut tool_calls = Vec::new();
    while b.tokens().len() < total {
        let left = total - b.tokens().len();
        b.push(SegmentKind::Prefill, &[token(&mut rng)]);
        let n = rng.random_range(1..=left.clamp(1, 120));
        let model: Vec<u32> = (0..n).map(|_| token(&mut rng)).collect();
        let logprobs: Vec<f32> = (0..n).map(|_| -rng.random::<f32>() * 6.0).collect();
        b.push_model(&model, &logprobs);
        if b.tokens().len() < total {
            let n = rng.random_range(1..=(total - b.tokens().len()).min(300));
            let kind = if rng.random_bool(0.1) {
                SegmentKind::Correction
            } else {
                SegmentKind::Observation
            };
            let obs: Vec<u32> = (0..n).map(|_| token(&mut rng)).collect();
            b.push(kind, &obs);
            tool_calls.push(ToolCallRecord {
                tool: "search".into(),
                arguments: serde_json::json!({
                    "query": words(&mut rng, 4),
                    "max_price": rng.random::<f64>() * 200.0,
                    "k": rng.random_range(1..10),
                }),
                observation: words(&mut rng, n),
                ok: rng.random_bool(0.9),
                latency_ms: rng.random::<f64>() * 40.0,
            });
        }
    }
    let (tokens, segments, logprobs) = b.finish();
    let response_len = tokens.len() - prompt_len;
    let created_at = shape.created_at;
    let rewards = if shape.rewarded {
        vec![
            RewardEntry {
                at: created_at,
                ..RewardEntry::now(
                    source::EXACT_MATCH,
                    f64::from(rng.random_range(0..2u8)),
                    1.0,
                )
            },
            RewardEntry {
                at: created_at,
                ..RewardEntry::now(source::F1, rng.random::<f64>(), 0.5)
            },
            RewardEntry {
                at: created_at,
                idempotency_key: Some(format!("format-{id}")),
                ..RewardEntry::now(source::FORMAT, 1.0, 0.1)
            },
        ]
    } else {
        Vec::new()
    };
    Trajectory {
        id: id.to_string(),
        created_at,
        question: format!("Is the {} in stock?", words(&mut rng, 3)),
        prompt_text: words(&mut rng, prompt_len),
        response_text: words(&mut rng, response_len),
        task: shape.task.clone().map(|(task_id, split, kind)| TaskInfo {
            task_id,
            gold_answers: vec![words(&mut rng, 2), "vegan leather".into()],
            split,
            kind,
            tools: vec!["catalog".into(), "inventory".into()],
        }),
        tokens,
        segments,
        logprobs,
        tool_calls,
        answer: Some(words(&mut rng, 3)),
        end: EpisodeEnd::Answered,
        turns: 3,
        model_id: "SmolLM2-135M-Instruct.Q4_1".into(),
        adapter_version: shape.adapter_version,
        replica_id: None,
        sampling: SamplingParams {
            temperature: 0.7 + rng.random::<f32>() * 0.3,
            top_p: 0.95,
            top_k: 0,
            max_tokens: 256,
            stop: vec!["</search>".into(), "</answer>".into()],
            seed: Some(rng.random()),
        },
        group_id: shape.group_id.clone(),
        timing: Timing {
            started_at: Some(created_at - Duration::milliseconds(1500)),
            model_ms: rng.random::<f64>() * 1000.0,
            tool_ms: rng.random::<f64>() * 100.0,
            total_ms: 1200.5,
        },
        rewards,
    }
}
