//! The [`Agent`] object: a started searchloop runtime behind a uniffi handle, with the
//! operations a host calls (ask, feedback, trajectory, stats, and the learning loop's: adapters,
//! promote, rollback, train_now, the scheduler).
//!
//! Every agent runs on one process-wide, multi-threaded tokio runtime owned by the bindings.
//! Constructors block on it while the model loads (Python cannot `await` a constructor), and
//! the async methods spawn their work onto it, so an episode makes progress on tokio's workers
//! whichever host thread or event loop awaits it, and a host that stops awaiting (a cancelled
//! coroutine) still gets its episode finished and stored.

use std::{
    future::Future,
    path::Path,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use searchloop_core::{DynTool, EpisodeRequest, Policy, scripted::ScriptedPolicy};
use searchloop_runtime::{PolicyLoader, Runtime};
use searchloop_store_sql::FeedbackInput;

use crate::{
    error::{Result, SearchloopError},
    host_tool::{HostTool, SearchTool},
    options::{AgentOptions, ScriptedPolicyOptions},
    records::{
        AdapterInfo, Answer, FeedbackOutcome, RoundSummary, StoreStats, SwapInfo, ToolCallRecord,
        TrajectoryRecord,
    },
};

/// A searchloop agent: the model, the tools (the configured ones and the host's), and the
/// trajectory store every episode is recorded in. Safe to share between threads; concurrent
/// `ask`s run concurrently.
#[derive(uniffi::Object)]
pub struct Agent {
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("runtime", &self.runtime)
            .finish()
    }
}

// `async_runtime = "tokio"` also gives every poll from the host a tokio context, so the
// exported futures are sound whichever executor drives them.
#[uniffi::export(async_runtime = "tokio")]
impl Agent {
    /// Starts an agent from typed options, with the host's own `tools` registered after the
    /// configured ones. Blocks while the model loads (seconds).
    #[uniffi::constructor(default(tools = []))]
    pub fn new(options: AgentOptions, tools: Vec<Arc<dyn SearchTool>>) -> Result<Arc<Self>> {
        let config = options.app_config()?;
        let extra = host_tools(tools)?;
        let runtime = block_on(Runtime::start_with_tools(config, extra))??;
        Ok(Arc::new(Self {
            runtime: Arc::new(runtime),
        }))
    }

    /// Starts an agent from a `searchloop.toml` (or `.json`) config file; see [`Agent::new`].
    #[uniffi::constructor(default(tools = []))]
    pub fn from_file(path: String, tools: Vec<Arc<dyn SearchTool>>) -> Result<Arc<Self>> {
        let options = AgentOptions {
            config_path: Some(path),
            ..AgentOptions::default()
        };
        Self::new(options, tools)
    }

    /// Starts an agent like [`Agent::new`], with a scripted stand-in of fixed cost in place
    /// of the model (see [`ScriptedPolicyOptions`]); no model is loaded. For host tests and
    /// for measuring the bindings' own overhead; episodes are recorded like any other, under
    /// model id `scripted`.
    #[uniffi::constructor(default(tools = []))]
    pub fn scripted(
        options: AgentOptions,
        script: ScriptedPolicyOptions,
        tools: Vec<Arc<dyn SearchTool>>,
    ) -> Result<Arc<Self>> {
        let config = options.app_config()?;
        let extra = host_tools(tools)?;
        let loader = Arc::new(ScriptedLoader(script));
        let runtime = block_on(Runtime::start_with(config, extra, loader))??;
        Ok(Arc::new(Self {
            runtime: Arc::new(runtime),
        }))
    }

    /// Answers one question: runs an episode (model turns and tool calls) and stores its
    /// trajectory before returning.
    pub async fn ask(&self, question: String) -> Result<Answer> {
        if question.trim().is_empty() {
            return Err(SearchloopError::InvalidInput(
                "the question is empty".to_string(),
            ));
        }
        let runtime = Arc::clone(&self.runtime);
        spawn(async move {
            let started = Instant::now();
            let t = runtime.run(EpisodeRequest::new(question)).await?;
            Ok(Answer {
                text: t.answer.clone(),
                end: t.end.into(),
                trajectory_id: t.id.clone(),
                tool_calls: t.tool_calls.iter().map(ToolCallRecord::from).collect(),
                latency_ms: started.elapsed().as_secs_f64() * 1e3,
            })
        })
        .await
    }

    /// Records host feedback (a purchase, a thumbs-up, a resolved ticket) on a trajectory's
    /// reward ledger. `value` must lie in the store's feedback range (`[-1, 1]` unless the
    /// config says otherwise); a repeated delivery with the same `idempotency_key` is a
    /// [`FeedbackOutcome::Duplicate`] and changes nothing.
    #[uniffi::method(default(idempotency_key = None))]
    pub async fn feedback(
        &self,
        trajectory_id: String,
        source: String,
        value: f64,
        idempotency_key: Option<String>,
    ) -> Result<FeedbackOutcome> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move {
            let mut input = FeedbackInput::new(source, value);
            input.idempotency_key = idempotency_key;
            let outcome = runtime.store().add_feedback(&trajectory_id, input).await?;
            Ok(outcome.into())
        })
        .await
    }

    /// The stored trajectory with `id`, with its whole reward ledger.
    pub async fn trajectory(&self, id: String) -> Result<TrajectoryRecord> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move {
            let store = runtime.store();
            match store.get_trajectory(&id).await? {
                Some(t) => Ok(TrajectoryRecord::new(&t, &store.options().reward_policy)),
                None => Err(SearchloopError::UnknownTrajectory(format!(
                    "unknown trajectory id '{id}'"
                ))),
            }
        })
        .await
    }

    /// Counts and size of the trajectory store.
    pub async fn stats(&self) -> Result<StoreStats> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move { Ok(runtime.store().stats().await?.into()) }).await
    }

    /// Every registered adapter, oldest first.
    pub async fn adapters(&self) -> Result<Vec<AdapterInfo>> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move {
            Ok(runtime
                .adapters()
                .await?
                .into_iter()
                .map(AdapterInfo::from)
                .collect())
        })
        .await
    }

    /// The adapter version serving new episodes (absent: the base model).
    pub fn serving_version(&self) -> Option<u64> {
        self.runtime.loop_metrics().serving_version
    }

    /// Promotes adapter `version` and serves it; episodes in flight finish on the old model.
    pub async fn promote(&self, version: u64) -> Result<SwapInfo> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move { Ok(runtime.promote(version).await?.into()) }).await
    }

    /// Rolls back to the formerly promoted adapter `to`, or by default to the one promoted
    /// before the current one (or the base model when there is none).
    #[uniffi::method(default(to = None))]
    pub async fn rollback(&self, to: Option<u64>) -> Result<SwapInfo> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move { Ok(runtime.rollback(to).await?.into()) }).await
    }

    /// Runs one training round now, with its eval gate, and returns what it did (minutes on a
    /// CPU). Needs a `[learn]` section in the agent's config file.
    pub async fn train_now(&self) -> Result<RoundSummary> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move { Ok(runtime.train_now().await?.into()) }).await
    }

    /// Attaches the training scheduler of the config's `[learn]` section: rounds start in the
    /// background on its triggers while the agent keeps answering. A bad `[learn]` section is
    /// an error now, not at the first round.
    pub async fn attach_scheduler(&self) -> Result<()> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move {
            let Some(learn) = runtime.config().learn.clone() else {
                return Err(SearchloopError::Config(
                    "the scheduler needs a [learn] section in the agent's config file".into(),
                ));
            };
            Ok(runtime.attach_scheduler(learn).await?)
        })
        .await
    }

    /// Stops the scheduler, cancelling its running round (which leaves no trace).
    pub async fn detach_scheduler(&self) -> Result<()> {
        let runtime = Arc::clone(&self.runtime);
        spawn(async move {
            runtime.detach_scheduler().await;
            Ok(())
        })
        .await
    }

    /// Whether the scheduler is attached.
    pub fn scheduler_attached(&self) -> bool {
        self.runtime.scheduler_attached()
    }

    /// The names of the agent's tools, in registration order.
    pub fn tool_names(&self) -> Vec<String> {
        self.runtime.agent().tools().names()
    }

    /// The tool `<search>` calls.
    pub fn default_tool(&self) -> Option<String> {
        self.runtime
            .agent()
            .tools()
            .default_tool()
            .map(str::to_string)
    }

    /// The id of the model serving new episodes.
    pub fn model_id(&self) -> String {
        self.runtime
            .agent()
            .policy()
            .current()
            .model_id()
            .to_string()
    }
}

/// The bindings' tokio runtime, started on first use.
fn tokio_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("searchloop-ffi")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the bindings' tokio runtime: {e}"))
        })
        .as_ref()
        .map_err(|message| SearchloopError::Internal(message.clone()))
}

/// Runs `future` to completion on the bindings' runtime, blocking the calling thread.
fn block_on<F: Future>(future: F) -> Result<F::Output> {
    // Blocking inside an async context would stall (or, in tokio, abort) the caller's
    // executor, so it is refused with an error instead.
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(SearchloopError::Internal(
            "Agent constructors block while the model loads; call them outside an async context \
             (in Rust, from a plain thread or `spawn_blocking`)"
                .to_string(),
        ));
    }
    Ok(tokio_runtime()?.block_on(future))
}

/// Runs `work` on the bindings' runtime and waits for it from whatever executor polls the
/// returned future.
async fn spawn<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    tokio_runtime()?
        .spawn(work)
        .await
        .map_err(|e| SearchloopError::Internal(format!("the bindings' task failed: {e}")))?
}

/// The host's tools, adapted to the registry.
fn host_tools(tools: Vec<Arc<dyn SearchTool>>) -> Result<Vec<Arc<dyn DynTool>>> {
    tools
        .into_iter()
        .map(|tool| Ok(Arc::new(HostTool::new(tool)?) as Arc<dyn DynTool>))
        .collect()
}

/// Serves the scripted policy in place of a model (the same one again if the runtime ever
/// reloads it).
struct ScriptedLoader(ScriptedPolicyOptions);

#[async_trait]
impl PolicyLoader for ScriptedLoader {
    async fn load(
        &self,
        _merged: Option<&Path>,
        version: Option<u64>,
    ) -> searchloop_loop::Result<Arc<dyn Policy>> {
        Ok(Arc::new(
            scripted_policy(self.0.clone()).with_adapter_version(version),
        ))
    }
}

/// A policy that searches the default tool for the question, then answers
/// `script.answer`, taking `script.turn_delay_ms` per turn.
///
/// It reads the scripted policy's own chat rendering (`<user>question</user>`) and works with
/// or without the runtime's prefilled action tags.
fn scripted_policy(script: ScriptedPolicyOptions) -> ScriptedPolicy {
    let answer = script.answer;
    ScriptedPolicy::new(move |context| {
        let (before, after_question) = context.rsplit_once("</user>").unwrap_or((context, ""));
        let question = before.rsplit_once("<user>").map_or(before, |(_, q)| q);
        let searched = after_question.contains("<information>");
        match (
            searched,
            context.ends_with("<search>"),
            context.ends_with("<answer>"),
        ) {
            (_, _, true) => format!("{answer}</answer>"),
            (false, true, _) => format!("{question}</search>"),
            (false, false, _) => format!("<search>{question}</search>"),
            (true, _, _) => format!("<answer>{answer}</answer>"),
        }
    })
    .with_delay(Duration::from_millis(script.turn_delay_ms))
    .with_model_id("scripted")
}

#[cfg(test)]
mod tests {
    use searchloop_core::{ChatMessage, Policy, Role, SamplingParams};

    use super::*;

    /// The scripted turn after `context`, with the loop's stop strings.
    async fn turn(policy: &ScriptedPolicy, context: &str) -> String {
        let params = SamplingParams {
            stop: vec!["</search>".into(), "</answer>".into()],
            ..SamplingParams::default()
        };
        let prompt = policy.tokenize(context).unwrap();
        policy.sample(&prompt, &params, 1).await.unwrap()[0]
            .text
            .clone()
    }

    #[tokio::test]
    async fn the_script_searches_the_question_then_answers() {
        let policy = scripted_policy(ScriptedPolicyOptions {
            answer: "blue".into(),
            turn_delay_ms: 0,
        });
        let messages = [
            ChatMessage::new(Role::System, "Example: <information>x</information>"),
            ChatMessage::new(Role::User, "What colour is the Nova Tote?"),
        ];
        let prompt = policy.render_chat(&messages, true).unwrap();
        assert_eq!(
            turn(&policy, &format!("{prompt}<search>")).await,
            "What colour is the Nova Tote?</search>"
        );
        assert_eq!(
            turn(&policy, &prompt).await,
            "<search>What colour is the Nova Tote?</search>"
        );
        let searched = format!("{prompt}<search>q</search>\n<information>r</information>\n");
        assert_eq!(
            turn(&policy, &format!("{searched}<answer>")).await,
            "blue</answer>"
        );
        assert_eq!(turn(&policy, &searched).await, "<answer>blue</answer>");
    }

    #[tokio::test]
    async fn constructors_refuse_to_block_an_async_context() {
        let err = Agent::new(AgentOptions::default(), Vec::new()).unwrap_err();
        // Default options read fine (the runtime validates them later), so the guard is what
        // refuses.
        assert!(matches!(err, SearchloopError::Internal(_)), "{err:?}");
    }
}
