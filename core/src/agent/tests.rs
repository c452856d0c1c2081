//! Unit tests of the agent loop, driven by a scripted policy.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::*;
use crate::{
    scripted::ScriptedPolicy,
    tool::{Tool, ToolError},
    trajectory::Split,
};

struct Catalog {
    calls: AtomicUsize,
}

#[derive(Deserialize)]
struct QueryArgs {
    query: String,
}

impl Tool for Catalog {
    type Args = QueryArgs;
    fn name(&self) -> &str {
        "catalog"
    }
    fn description(&self) -> &str {
        "Finds products."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
    }
    async fn call(&self, args: QueryArgs) -> Result<String, ToolError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if args.query.contains("broken") {
            return Err(ToolError::Failed("index unavailable".into()));
        }
        Ok(format!(
            "Aurora Tote: material leather (query {})",
            args.query
        ))
    }
}

struct Inventory;

#[derive(Deserialize)]
struct StockArgs {
    sku: String,
}

impl Tool for Inventory {
    type Args = StockArgs;
    fn name(&self) -> &str {
        "inventory"
    }
    fn description(&self) -> &str {
        "Stock by SKU."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]})
    }
    async fn call(&self, args: StockArgs) -> Result<String, ToolError> {
        Ok(format!("{}: 3 in Lyon", args.sku))
    }
}

fn tools() -> (Arc<ToolRegistry>, Arc<Catalog>) {
    let catalog = Arc::new(Catalog {
        calls: AtomicUsize::new(0),
    });
    let mut registry = ToolRegistry::new();
    registry.register(catalog.clone()).unwrap();
    registry.register(Arc::new(Inventory)).unwrap();
    (Arc::new(registry), catalog)
}

/// A config with no prefill, so scripts write whole actions themselves, and turn limits sized
/// for byte tokens.
fn unscaffolded() -> AgentConfig {
    let mut config = AgentConfig::default();
    config.protocol.max_turn_tokens = 200;
    config.protocol.max_episode_tokens = 2_000;
    config.protocol.first_turn_prefill = None;
    config.protocol.after_observation_prefill = None;
    config
}

fn agent(policy: ScriptedPolicy, config: AgentConfig) -> (Agent, Arc<Catalog>) {
    let (tools, catalog) = tools();
    let slot = Arc::new(PolicySlot::new(Arc::new(policy)));
    (Agent::new(slot, tools, config).unwrap(), catalog)
}

/// Observations in the assistant's part of the context (the system prompt shows an example
/// block too, so only what follows the scripted template's `<assistant>` marker counts).
fn observations(ctx: &str) -> usize {
    let reply = ctx.rsplit("<assistant>").next().unwrap_or("");
    reply.matches("\n<information>").count()
}

fn text_of(policy: &dyn Policy, t: &Trajectory, kind: SegmentKind) -> String {
    policy.detokenize(&t.tokens_of(kind)).unwrap()
}

#[tokio::test]
async fn multi_turn_episode_with_two_tools() {
    let script = |ctx: &str| {
        if observations(ctx) == 0 {
            "<think>find it</think><search>aurora tote</search>".to_string()
        } else if !ctx.contains("3 in Lyon") {
            r#"<tool name="inventory">{"sku": "SKU-1"}</tool>"#.to_string()
        } else {
            "<answer>yes</answer> trailing".to_string()
        }
    };
    let (agent, catalog) = agent(ScriptedPolicy::new(script), unscaffolded());
    let task = TaskInfo {
        task_id: "q1".into(),
        gold_answers: vec!["Yes".into()],
        split: Split::Heldout,
        kind: "inventory".into(),
        tools: Vec::new(),
    };
    let t = agent
        .run(EpisodeRequest {
            question: "Is the Aurora Tote in stock in Lyon?".into(),
            task: Some(task),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(t.end, EpisodeEnd::Answered);
    assert_eq!(t.answer.as_deref(), Some("yes"));
    assert_eq!(t.turns, 3);
    assert_eq!(catalog.calls.load(Ordering::SeqCst), 1);
    assert_eq!(t.tool_calls.len(), 2);
    assert_eq!(t.tool_calls[0].tool, "catalog");
    assert_eq!(t.tool_calls[0].arguments, json!({"query": "aurora tote"}));
    assert_eq!(t.tool_calls[1].tool, "inventory");
    assert_eq!(t.tool_calls[1].arguments, json!({"sku": "SKU-1"}));
    assert!(t.tool_calls.iter().all(|c| c.ok));
    // The last turn stops at the closing tag: the text after it is never generated.
    assert!(t.response_text.ends_with("<answer>yes</answer>"));
    let em = t
        .rewards
        .iter()
        .find(|r| r.source == "exact_match")
        .unwrap();
    assert_eq!(em.value, 1.0);
    let format = t.rewards.iter().find(|r| r.source == "format").unwrap();
    assert_eq!(format.value, 1.0);
}

#[tokio::test]
async fn mask_covers_exactly_the_model_tokens() {
    let script = |ctx: &str| {
        if observations(ctx) > 0 {
            "leather</answer>".to_string()
        } else {
            "aurora tote</search>".to_string()
        }
    };
    // Default scaffolding: "<search>" prefilled first, "<answer>" after the observation.
    let (agent, _) = agent(ScriptedPolicy::new(script), AgentConfig::default());
    let t = agent
        .ask("What material is the Aurora Tote?")
        .await
        .unwrap();
    t.validate().unwrap();
    let policy = agent.policy().current();
    let kinds: Vec<SegmentKind> = t.segments.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            SegmentKind::Prompt,
            SegmentKind::Prefill,
            SegmentKind::Model,
            SegmentKind::Observation,
            SegmentKind::Prefill,
            SegmentKind::Model,
        ]
    );
    assert_eq!(
        text_of(policy.as_ref(), &t, SegmentKind::Model),
        "aurora tote</search>leather</answer>"
    );
    assert_eq!(
        text_of(policy.as_ref(), &t, SegmentKind::Prefill),
        "<search><answer>"
    );
    let observation = text_of(policy.as_ref(), &t, SegmentKind::Observation);
    assert!(observation.starts_with("\n<information>Aurora Tote"));
    let mask = t.loss_mask();
    for (i, trained) in mask.iter().enumerate() {
        let in_model = t.segments.iter().any(|s| {
            s.kind == SegmentKind::Model && (s.start as usize..s.end as usize).contains(&i)
        });
        assert_eq!(*trained, in_model, "position {i}");
        if *trained {
            assert_eq!(t.logprobs[i], -0.25);
        } else {
            assert_eq!(t.logprobs[i], 0.0);
        }
    }
    assert_eq!(
        mask.iter().filter(|m| **m).count(),
        "aurora tote</search>leather</answer>".len()
    );
    // The whole sequence decodes to the prompt followed by the response text.
    assert_eq!(
        policy.detokenize(&t.tokens).unwrap(),
        format!("{}{}", t.prompt_text, t.response_text)
    );
    assert_eq!(t.answer.as_deref(), Some("leather"));
}

#[tokio::test]
async fn prefilled_tags_close_implicitly_at_a_newline_or_eos() {
    let script = |ctx: &str| {
        if observations(ctx) > 0 {
            "Leather".to_string()
        } else {
            "aurora tote\nand then some rambling".to_string()
        }
    };
    let (scaffolded, _) = agent(ScriptedPolicy::new(script), AgentConfig::default());
    let t = scaffolded
        .ask("What material is the Aurora Tote?")
        .await
        .unwrap();
    assert_eq!(t.tool_calls[0].arguments, json!({"query": "aurora tote"}));
    assert_eq!(t.answer.as_deref(), Some("Leather"));
    assert_eq!(t.end, EpisodeEnd::Answered);
    // The turn ended at the newline: the rambling was never generated.
    assert!(!t.response_text.contains("rambling"));
    // The end-of-sequence token is recorded as a model token but is not part of the answer.
    assert_eq!(t.tokens.last(), Some(&crate::scripted::SCRIPTED_EOS));

    // Without implicit-close stops, a turn that runs into the token limit finishes no action.
    let mut config = AgentConfig::default();
    config.protocol.implicit_close_stops.clear();
    config.protocol.max_turns = 1;
    let (unclosed, _) = agent(
        ScriptedPolicy::new(|_: &str| format!("aurora tote\n{}", "x".repeat(200))),
        config,
    );
    let t = unclosed.ask("q").await.unwrap();
    assert!(t.tool_calls.is_empty());
    assert_eq!(t.end, EpisodeEnd::NoAnswer);
}

#[tokio::test]
async fn invalid_action_gets_the_corrective_message_then_recovers() {
    let script = |ctx: &str| {
        if ctx.contains("Let me try again") {
            "<answer>leather</answer>".to_string()
        } else {
            "I think it is leather.".to_string()
        }
    };
    let (agent, _) = agent(ScriptedPolicy::new(script), unscaffolded());
    let t = agent.ask("What material?").await.unwrap();
    assert_eq!(t.end, EpisodeEnd::Answered);
    assert_eq!(t.turns, 2);
    assert!(t.segments.iter().any(|s| s.kind == SegmentKind::Correction));
    assert!(t.response_text.contains("My previous action is invalid"));
    assert!(t.tool_calls.is_empty());
}

#[tokio::test]
async fn turn_limit_forces_a_final_answer_only_turn() {
    let contexts = Arc::new(Mutex::new(Vec::new()));
    let seen = contexts.clone();
    let script = move |ctx: &str| {
        seen.lock().unwrap().push(ctx.to_string());
        if ctx.ends_with("<answer>") {
            "out of ideas</answer>".to_string()
        } else {
            "<search>again</search>".to_string()
        }
    };
    let mut config = unscaffolded();
    config.protocol.max_turns = 3;
    let (agent, catalog) = agent(ScriptedPolicy::new(script), config);
    let t = agent.ask("loop forever").await.unwrap();
    assert_eq!(catalog.calls.load(Ordering::SeqCst), 3);
    assert_eq!(t.turns, 4, "three tool turns and one final answer turn");
    assert_eq!(t.end, EpisodeEnd::Answered);
    assert_eq!(t.answer.as_deref(), Some("out of ideas"));
    assert!(
        contexts
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .ends_with("<answer>")
    );
}

#[tokio::test]
async fn final_turn_without_an_answer_ends_the_episode() {
    let (agent, _) = agent(
        ScriptedPolicy::new(|_: &str| "<search>still searching</search>".to_string()),
        AgentConfig {
            protocol: ProtocolConfig {
                max_turns: 1,
                final_turn_prefill: String::new(),
                first_turn_prefill: None,
                after_observation_prefill: None,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let t = agent.ask("q").await.unwrap();
    assert_eq!(t.end, EpisodeEnd::NoAnswer);
    assert_eq!(t.turns, 2);
    assert_eq!(t.answer, None);
    let format = t.rewards.iter().find(|r| r.source == "format").unwrap();
    assert_eq!(format.value, 0.0);
}

#[tokio::test]
async fn tool_failures_become_observations() {
    let script = |ctx: &str| {
        if observations(ctx) >= 3 {
            "<answer>sorry</answer>".to_string()
        } else if observations(ctx) == 2 {
            r#"<tool name="inventory">{"sku": </tool>"#.to_string()
        } else if observations(ctx) > 0 {
            r#"<tool name="teleport">{"to": "mars"}</tool>"#.to_string()
        } else {
            "<search>broken index</search>".to_string()
        }
    };
    let (agent, _) = agent(ScriptedPolicy::new(script), unscaffolded());
    let t = agent.ask("q").await.unwrap();
    assert_eq!(t.end, EpisodeEnd::Answered);
    assert_eq!(t.tool_calls.len(), 3);
    assert!(t.tool_calls.iter().all(|c| !c.ok));
    assert!(t.tool_calls[0].observation.contains("index unavailable"));
    assert!(
        t.tool_calls[1]
            .observation
            .contains("unknown tool 'teleport'")
    );
    assert!(t.tool_calls[2].observation.contains("not JSON"));
    assert_eq!(t.tool_calls[2].arguments, json!(r#"{"sku":"#));
}

#[tokio::test]
async fn token_budget_ends_a_rambling_episode() {
    let mut config = unscaffolded();
    config.protocol.max_turn_tokens = 10;
    config.protocol.max_episode_tokens = 25;
    config.protocol.max_turns = 100;
    let (agent, _) = agent(ScriptedPolicy::new(|_: &str| "blah ".repeat(50)), config);
    let t = agent.ask("q").await.unwrap();
    assert_eq!(t.end, EpisodeEnd::TokenLimit);
    assert_eq!(t.tokens_of(SegmentKind::Model).len(), 25);
}

#[tokio::test]
async fn the_tool_choice_reward_pays_for_calling_every_tool_the_question_needs() {
    // A clerk who searches the catalog, then asks the inventory, then answers; and one who
    // answers after the catalog alone.
    let thorough = |ctx: &str| {
        if observations(ctx) == 0 {
            "<search>aurora tote</search>".to_string()
        } else if observations(ctx) == 1 {
            r#"<tool name="inventory">{"sku": "SKU-1"}</tool>"#.to_string()
        } else {
            "<answer>yes</answer>".to_string()
        }
    };
    let hasty = |ctx: &str| {
        if observations(ctx) == 0 {
            "<search>aurora tote</search>".to_string()
        } else {
            "<answer>yes</answer>".to_string()
        }
    };
    let needs = |tools: &[&str]| EpisodeRequest {
        question: "Is the Aurora Tote in stock in Lyon?".into(),
        task: Some(TaskInfo {
            task_id: "q1".into(),
            gold_answers: vec!["yes".into()],
            split: Split::Train,
            kind: "inventory".into(),
            tools: tools.iter().map(|t| t.to_string()).collect(),
        }),
        ..Default::default()
    };
    let tool_choice = |t: &Trajectory| {
        t.rewards
            .iter()
            .find(|r| r.source == crate::reward::source::TOOL_CHOICE)
            .map(|r| (r.value, r.weight))
    };
    let mut config = unscaffolded();
    config.rewards.tool_choice = 0.1;
    let (agent_thorough, _) = agent(ScriptedPolicy::new(thorough), config.clone());
    let (agent_hasty, _) = agent(ScriptedPolicy::new(hasty), config.clone());

    let t = agent_thorough.run(needs(&["inventory"])).await.unwrap();
    assert_eq!(tool_choice(&t), Some((1.0, 0.1)));
    let t = agent_hasty.run(needs(&["inventory"])).await.unwrap();
    assert_eq!(t.answer.as_deref(), Some("yes"));
    assert_eq!(
        tool_choice(&t),
        Some((0.0, 0.1)),
        "right answer, wrong tools"
    );
    // Every listed tool must be called, not just one of them.
    let t = agent_hasty
        .run(needs(&["catalog", "inventory"]))
        .await
        .unwrap();
    assert_eq!(tool_choice(&t), Some((0.0, 0.1)));
    let t = agent_thorough
        .run(needs(&["catalog", "inventory"]))
        .await
        .unwrap();
    assert_eq!(tool_choice(&t), Some((1.0, 0.1)));
    // Kept small beside the answer's rewards, so calling tools cannot outweigh a right answer.
    assert!(config.rewards.tool_choice < config.rewards.exact_match);
    // No entry when the question names no tools, or the weight is off.
    let t = agent_thorough.run(needs(&[])).await.unwrap();
    assert_eq!(tool_choice(&t), None);
    let (agent_off, _) = agent(ScriptedPolicy::new(thorough), unscaffolded());
    let t = agent_off.run(needs(&["inventory"])).await.unwrap();
    assert_eq!(tool_choice(&t), None);
}

#[tokio::test]
async fn a_question_over_the_limit_is_refused_before_the_model_runs() {
    let mut config = unscaffolded();
    config.protocol.max_question_chars = 10;
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let policy = ScriptedPolicy::new(move |_: &str| {
        counter.fetch_add(1, Ordering::SeqCst);
        "<answer>x</answer>".to_string()
    });
    let (agent, _) = agent(policy, config);
    // Ten characters (of two bytes each) are within the limit.
    assert!(agent.ask(&"é".repeat(10)).await.is_ok());
    let served = asked.load(Ordering::SeqCst);
    assert!(served > 0);
    let err = agent.ask(&"é".repeat(11)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::QuestionTooLong {
                chars: 11,
                limit: 10
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_question_chars"), "{err}");
    assert_eq!(asked.load(Ordering::SeqCst), served, "the model ran");
    // Zero is not a limit.
    let mut config = unscaffolded();
    config.protocol.max_question_chars = 0;
    assert!(config.validate().is_err());
}

#[tokio::test]
async fn groups_share_an_id_and_episodes_are_recorded() {
    struct Memory(Mutex<Vec<Trajectory>>);
    #[async_trait::async_trait]
    impl TrajectorySink for Memory {
        async fn record(&self, t: &Trajectory) -> crate::Result<()> {
            self.0.lock().unwrap().push(t.clone());
            Ok(())
        }
    }
    let sink = Arc::new(Memory(Mutex::new(Vec::new())));
    let (agent, _) = agent(
        ScriptedPolicy::new(|_: &str| "x</answer>".to_string()).with_adapter_version(Some(7)),
        AgentConfig::default(),
    );
    let agent = agent.with_sink(sink.clone());
    let group = agent
        .run_group(
            EpisodeRequest {
                seed: Some(5),
                ..EpisodeRequest::new("q")
            },
            4,
        )
        .await
        .unwrap();
    assert_eq!(group.len(), 4);
    let gid = group[0].group_id.clone().unwrap();
    assert!(
        group
            .iter()
            .all(|t| t.group_id.as_deref() == Some(gid.as_str()))
    );
    assert!(group.iter().all(|t| t.adapter_version == Some(7)));
    let recorded = sink.0.lock().unwrap();
    assert_eq!(recorded.len(), 4);
    let mut ids: Vec<_> = recorded.iter().map(|t| t.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
}

#[tokio::test]
async fn a_swap_routes_new_episodes_to_the_new_policy() {
    let (agent, _) = agent(
        ScriptedPolicy::new(|_: &str| "x</answer>".to_string()).with_adapter_version(None),
        AgentConfig::default(),
    );
    assert_eq!(agent.ask("q").await.unwrap().adapter_version, None);
    let old = agent.policy().swap(Arc::new(
        ScriptedPolicy::new(|_: &str| "y</answer>".to_string()).with_adapter_version(Some(2)),
    ));
    assert_eq!(old.adapter_version(), None);
    let t = agent.ask("q").await.unwrap();
    assert_eq!(t.adapter_version, Some(2));
    assert_eq!(t.answer.as_deref(), Some("y"));
}

#[test]
fn an_agent_needs_tools_and_a_valid_config() {
    let slot = Arc::new(PolicySlot::new(Arc::new(ScriptedPolicy::new(|_: &str| {
        String::new()
    }))));
    assert!(
        Agent::new(
            slot.clone(),
            Arc::new(ToolRegistry::new()),
            AgentConfig::default()
        )
        .is_err()
    );
    let (tools, _) = tools();
    let mut config = AgentConfig::default();
    config.sampling.top_p = 2.0;
    assert!(Agent::new(slot, tools, config).is_err());
}

#[tokio::test]
async fn a_reconfigured_agent_shares_policy_tools_and_sink() {
    struct Memory(Mutex<Vec<Trajectory>>);
    #[async_trait::async_trait]
    impl TrajectorySink for Memory {
        async fn record(&self, t: &Trajectory) -> crate::Result<()> {
            self.0.lock().unwrap().push(t.clone());
            Ok(())
        }
    }
    let sink = Arc::new(Memory(Mutex::new(Vec::new())));
    let (agent, _) = agent(
        ScriptedPolicy::new(|_: &str| "x</answer>".to_string()),
        AgentConfig::default(),
    );
    let agent = agent.with_sink(sink.clone());
    let mut config = agent.config().clone();
    config.sampling.temperature = 0.9;
    let hot = agent.reconfigured(config.clone()).unwrap();
    assert!(Arc::ptr_eq(hot.policy(), agent.policy()));
    assert!(Arc::ptr_eq(hot.tools(), agent.tools()));
    assert_eq!(hot.ask("q").await.unwrap().sampling.temperature, 0.9);
    assert_eq!(
        agent.ask("q").await.unwrap().sampling.temperature,
        crate::agent::SERVING_TEMPERATURE
    );
    assert_eq!(
        sink.0.lock().unwrap().len(),
        2,
        "both agents record into the sink"
    );
    config.sampling.top_p = 0.0;
    assert!(agent.reconfigured(config).is_err());
}
