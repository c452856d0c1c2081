//! Agent episodes over the demo's three real tools, wired from the demo's own config and
//! recorded in its store: one calls the tantivy catalog and then the SQL inventory the demo
//! seeds, another the help center's HTTP search API through the HTTP search tool; and the
//! generated inventory questions' worked solutions, called on the same real tools.
//!
//! The policy is scripted (the embedded 135M model rarely writes a well-formed named-tool call,
//! see the demo), so this test checks the wiring the model would use: the registry routing
//! `<search>`, `<tool name="inventory">` and `<tool name="help">`, the observations, the episode
//! rewards and the store.

use std::sync::Arc;

use searchloop_core::{
    Agent, EpisodeRequest, PolicySlot, Split, TaskInfo, ToolRegistry, Trajectory, TrajectorySink,
    reward::normalize_answer, scripted::ScriptedPolicy,
};
use searchloop_demo::help_center::RunningHelpCenter;
use searchloop_demo::retail;
use searchloop_e2e::prepare_demo;
use searchloop_runtime::{
    AppConfig,
    service::{build_tools, open_store},
};

/// A prepared demo: the temporary folder's guard, the demo's folder inside it, and its config.
type PreparedDemo = (tempfile::TempDir, std::path::PathBuf, AppConfig);

/// A demo data set prepared in a fresh temporary folder (kept alive by the returned guard),
/// with its folder and its config.
fn prepared_demo() -> Result<PreparedDemo, Box<dyn std::error::Error>> {
    let work = tempfile::tempdir()?;
    let workdir = work.path().join("data");
    prepare_demo(&workdir, 1);
    let config = AppConfig::load(&workdir.join("searchloop.toml"))?;
    Ok((work, workdir, config))
}

/// The text between `start` and `end` in `text`.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

/// The turn that answers `answer`, after an `<answer>` the protocol may have prefilled.
fn answer_turn(context: &str, answer: &str) -> String {
    if context.ends_with("<answer>") {
        format!("{answer}</answer>")
    } else {
        format!("<answer>{answer}</answer>")
    }
}

/// Searches the catalog for the product, then asks the inventory for its stock in the city,
/// then answers with the inventory's `in_stock` column.
fn inventory_clerk() -> ScriptedPolicy {
    ScriptedPolicy::new(|context| {
        // The system prompt's one-shot example has an information block of its own, so only
        // what follows the question counts.
        let (before, episode) = context.rsplit_once("</user>").unwrap_or(("", context));
        let question = before.rsplit_once("<user>").map_or("", |(_, q)| q);
        let product = between(question, "Is the ", " in stock in").unwrap_or("");
        let city = between(question, "in the ", " store?").unwrap_or("");
        let observations = episode.matches("<information>").count();
        let opened_search = context.ends_with("<search>");
        match observations {
            0 if opened_search => format!("{product}</search>"),
            0 => format!("<search>{product}</search>"),
            1 => format!(
                r#"<tool name="inventory">{{"query": "stock_in_store", "product_name": "{product}", "city": "{city}"}}</tool>"#
            ),
            _ => {
                let last = episode.rsplit("<information>").next().unwrap_or("");
                let answer = if last.contains("| yes |") || last.contains(" yes") { "yes" } else { "no" };
                answer_turn(context, answer)
            }
        }
    })
    .with_model_id("scripted-clerk")
    // The prompt describes three tools, in byte tokens.
    .with_context_length(8192)
}

/// Asks the help center about the question's store, then answers with the weekday opening time
/// that the store page lists ("Monday to Friday 9:00-19:00" answers "9:00").
fn help_desk() -> ScriptedPolicy {
    ScriptedPolicy::new(|context| {
        let (before, episode) = context.rsplit_once("</user>").unwrap_or(("", context));
        let question = before.rsplit_once("<user>").map_or("", |(_, q)| q);
        let city = between(question, "does the ", " store").unwrap_or("");
        if !episode.contains("<information>") {
            return format!(
                r#"<tool name="help">{{"query": "{city} store opening hours"}}</tool>"#
            );
        }
        let last = episode.rsplit("<information>").next().unwrap_or("");
        let opens = between(last, "Monday to Friday ", "-").unwrap_or("unknown");
        answer_turn(context, opens)
    })
    .with_model_id("scripted-help-desk")
    .with_context_length(8192)
}

/// The first generated question of `kind` with its id and gold answers; `None` when the file
/// is unreadable or has no such question.
fn first_question(workdir: &std::path::Path, kind: &str) -> Option<(String, String, Vec<String>)> {
    let questions = std::fs::read_to_string(workdir.join("data/questions.jsonl")).ok()?;
    let item: serde_json::Value = questions
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|q| q["kind"] == kind)?;
    let gold = item["answers"]
        .as_array()?
        .iter()
        .map(|a| a.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()?;
    Some((
        item["id"].as_str()?.into(),
        item["question"].as_str()?.into(),
        gold,
    ))
}

/// Runs `policy` on the first generated question of `kind` through `tools`, recording into
/// `sink`; returns the episode, the question and its gold answers.
async fn scripted_episode(
    policy: ScriptedPolicy,
    kind: &str,
    workdir: &std::path::Path,
    tools: Arc<ToolRegistry>,
    config: &AppConfig,
    sink: Arc<dyn TrajectorySink>,
) -> Result<(Trajectory, String, Vec<String>), String> {
    let (task_id, question, gold) =
        first_question(workdir, kind).ok_or_else(|| format!("no {kind} question"))?;
    let agent = Agent::new(
        Arc::new(PolicySlot::new(Arc::new(policy))),
        tools,
        config.agent.clone(),
    )
    .map_err(|e| e.to_string())?
    .with_sink(sink);
    let trajectory = agent
        .run(EpisodeRequest {
            question: question.clone(),
            task: Some(TaskInfo {
                task_id,
                gold_answers: gold.clone(),
                split: Split::Train,
                kind: kind.into(),
                tools: Vec::new(),
            }),
            ..EpisodeRequest::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok((trajectory, question, gold))
}

#[tokio::test]
async fn episodes_call_the_catalog_the_inventory_and_the_help_center_and_are_stored() {
    let (_work, workdir, mut config) = prepared_demo().unwrap();

    // The demo's help center stopped with the demo; serve it again and point its tool file at
    // it, as the demo does on every run.
    let stores = retail::read_stores_jsonl(&workdir.join("data/stores.jsonl")).unwrap();
    let help_center = RunningHelpCenter::start(&stores, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    std::fs::write(workdir.join("help.toml"), help_center.tool_config_toml()).unwrap();

    // The default protocol prefills `<answer>` after the first observation, which keeps the
    // 135M model from rambling; a model that can plan several tool calls runs without it.
    config.agent.protocol.after_observation_prefill = None;
    // The scripted policy's tokens are bytes: a JSON tool call needs more than a model turn.
    config.agent.protocol.max_turn_tokens = 256;
    config.agent.protocol.max_episode_tokens = 1024;
    let store = Arc::new(open_store(&config).await.unwrap());
    let tools = Arc::new(build_tools(&config).await.unwrap());
    let episode = |policy, kind| {
        scripted_episode(
            policy,
            kind,
            &workdir,
            Arc::clone(&tools),
            &config,
            Arc::clone(&store) as Arc<dyn TrajectorySink>,
        )
    };

    // An inventory question from the generated set, with its verified gold answer.
    let (trajectory, question, _) = episode(inventory_clerk(), "inventory").await.unwrap();
    let tools_called: Vec<&str> = trajectory
        .tool_calls
        .iter()
        .map(|c| c.tool.as_str())
        .collect();
    assert_eq!(
        tools_called,
        ["catalog", "inventory"],
        "{:#?}",
        trajectory.tool_calls
    );
    assert!(
        trajectory.tool_calls.iter().all(|c| c.ok),
        "{:#?}",
        trajectory.tool_calls
    );
    let product = between(&question, "Is the ", " in stock in").unwrap();
    assert!(trajectory.tool_calls[0].observation.contains(product));
    assert!(trajectory.tool_calls[1].observation.contains(product));
    let stored = store.get_trajectory(&trajectory.id).await.unwrap().unwrap();
    assert_eq!(stored.tool_calls, trajectory.tool_calls);
    assert_eq!(stored.answer, trajectory.answer);

    // A store question, answered from the help center over HTTP.
    let (trajectory, question, gold) = episode(help_desk(), "store_info").await.unwrap();
    assert!(question.contains("open on weekdays"), "{question}");
    assert_eq!(
        trajectory.tool_calls.len(),
        1,
        "{:#?}",
        trajectory.tool_calls
    );
    let call = &trajectory.tool_calls[0];
    assert_eq!(call.tool, "help");
    assert!(call.ok, "{call:#?}");
    let city = between(&question, "does the ", " store").unwrap();
    assert!(
        call.observation
            .contains(&format!("{city} store: address and opening hours")),
        "{}",
        call.observation
    );
    let answer = trajectory.answer.clone().unwrap_or_default();
    assert!(
        gold.contains(&answer),
        "answered {answer:?}, gold {gold:?}: {}",
        call.observation
    );
    let stored = store.get_trajectory(&trajectory.id).await.unwrap().unwrap();
    assert_eq!(stored.tool_calls, trajectory.tool_calls);
    store.close().await;
}

/// The generated inventory questions' worked solutions, called on the demo's real tools: the
/// catalog search lists the product, and the inventory's `stock_in_store` call accepts the
/// arguments and answers with the gold answer. A warm start imitates these calls, so a
/// solution the tool refused would teach the model a failing call.
#[tokio::test]
async fn inventory_solutions_call_the_real_tools_and_find_the_gold_answer() {
    let (_work, workdir, config) = prepared_demo().unwrap();
    let tools = build_tools(&config).await.unwrap();
    let questions = retail::read_questions(&workdir.join("data/questions.jsonl")).unwrap();
    let inventory: Vec<_> = questions
        .iter()
        .filter(|q| q.kind == retail::QuestionKind::Inventory)
        .collect();
    assert!(inventory.len() >= 100, "{}", inventory.len());
    for question in inventory {
        let steps: Vec<(&str, &str)> = question
            .solution
            .iter()
            .map(|s| (s.tool.as_str(), s.input.as_str()))
            .collect();
        let [("catalog", product), ("inventory", arguments)] = steps.as_slice() else {
            panic!("{question:?}");
        };
        let listed = tools
            .invoke("catalog", serde_json::json!({ "query": product }))
            .await;
        assert!(listed.error.is_none(), "{listed:?}");
        assert!(listed.observation.contains(product), "{listed:?}");
        let arguments: serde_json::Value = serde_json::from_str(arguments).unwrap();
        let stock = tools.invoke("inventory", arguments).await;
        assert!(stock.error.is_none(), "{question:?}: {stock:?}");
        let observation = format!(" {} ", normalize_answer(&stock.observation));
        assert!(
            question
                .answers
                .iter()
                .any(|gold| observation.contains(&format!(" {} ", normalize_answer(gold)))),
            "{question:?}: {}",
            stock.observation
        );
    }
}
