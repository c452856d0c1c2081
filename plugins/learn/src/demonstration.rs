//! Demonstrations: a teacher plays a question's worked solution through the serving agent's
//! tools and protocol, so a replay group whose samples all missed still holds an episode that
//! answers, read from real observations.
//!
//! The teacher is a [`Policy`] over the served model's tokenizer and chat template whose turns
//! are written, not sampled: each is the solution's next call (or the gold answer) in the
//! protocol's syntax, continuing whatever tag the protocol prefilled. Its recorded log-probs are
//! zeros, which is why the trainer rescores demonstrations instead of reading them.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use searchloop_core::{
    Agent, ChatMessage, EpisodeEnd, EpisodeRequest, Error, FinishReason, Policy, PolicySlot,
    Sample, SamplingParams, SolutionStep, Split, Trajectory, reward::normalize_answer,
};

use crate::{error::Result, questions::Question};

/// What playing a worked solution gave.
#[derive(Debug)]
pub(crate) enum Demonstrated {
    /// An answered episode with a gold answer in one of its observations.
    Episode(Box<Trajectory>),
    /// The solution cannot be played under the agent's protocol (why): it prefills an answer
    /// before the solution's last call, say, or a turn would not fit the token budget.
    Unfit(String),
    /// Played through, but no observation held a gold answer: the solution's calls did not
    /// lead to it, so the answer would be shown without its reason.
    Ungrounded,
}

/// Plays `question`'s worked solution through `agent`'s tools and protocol (its sink is not
/// used: a demonstration is not traffic) with episode seed `seed`.
pub(crate) async fn demonstrate(
    agent: &Agent,
    question: &Question,
    seed: u64,
) -> Result<Demonstrated> {
    let Some(answer) = question.answers.first() else {
        return Ok(Demonstrated::Unfit(
            "the question has no gold answer".into(),
        ));
    };
    let teacher = Arc::new(Teacher {
        inner: agent.policy().current(),
        default_tool: agent.tools().default_tool().map(str::to_string),
        solution: question.solution.clone(),
        answer: answer.clone(),
        state: Mutex::default(),
    });
    let player = Agent::new(
        Arc::new(PolicySlot::new(Arc::clone(&teacher) as Arc<dyn Policy>)),
        Arc::clone(agent.tools()),
        agent.config().clone(),
    )?;
    let request = EpisodeRequest {
        question: question.question.clone(),
        task: Some(question.task_info(Split::Train)),
        group_id: None,
        seed: Some(seed),
    };
    let episode = match player.run(request).await {
        Ok(episode) => episode,
        Err(e) => {
            return match teacher.state().unfit.take() {
                Some(reason) => Ok(Demonstrated::Unfit(reason)),
                None => Err(e.into()),
            };
        }
    };
    if episode.end != EpisodeEnd::Answered {
        return Ok(Demonstrated::Unfit(format!(
            "the episode ended {:?} before the answer",
            episode.end
        )));
    }
    let grounded = episode.tool_calls.iter().any(|call| {
        let observation = format!(" {} ", normalize_answer(&call.observation));
        question.answers.iter().any(|gold| {
            let gold = normalize_answer(gold);
            !gold.is_empty() && observation.contains(&format!(" {gold} "))
        })
    });
    Ok(if grounded {
        Demonstrated::Episode(Box::new(episode))
    } else {
        Demonstrated::Ungrounded
    })
}

/// The policy that writes a worked solution's turns.
struct Teacher {
    /// The served model: tokenizer, chat template, identity.
    inner: Arc<dyn Policy>,
    /// The tool `<search>` calls.
    default_tool: Option<String>,
    solution: Vec<SolutionStep>,
    answer: String,
    state: Mutex<TeacherState>,
}

#[derive(Debug, Default)]
struct TeacherState {
    /// Turns written so far: the solution's calls, then the answer.
    turns: usize,
    /// Why the solution stopped fitting the protocol, once it has.
    unfit: Option<String>,
}

impl Teacher {
    fn state(&self) -> MutexGuard<'_, TeacherState> {
        // A panic while holding the lock cannot leave two integers half-written.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next turn's text after `context`, which ends with the turn's prefill (if any).
    fn next_turn(&self, context: &str) -> std::result::Result<String, String> {
        let opened = ["search", "answer"]
            .into_iter()
            .find(|tag| context.ends_with(&format!("<{tag}>")));
        let turn = self.state().turns;
        let text = match (self.solution.get(turn), opened) {
            (Some(step), Some("answer")) => {
                return Err(format!(
                    "the protocol asks for the answer before the call to {}",
                    step.tool
                ));
            }
            (Some(step), opened) => {
                let searched = self.default_tool.as_deref() == Some(step.tool.as_str());
                match (opened.is_some(), searched) {
                    (true, true) => format!("{}</search>", step.input),
                    (true, false) => {
                        return Err(format!(
                            "the protocol opens a search where the solution calls {}",
                            step.tool
                        ));
                    }
                    (false, true) => format!("<search>{}</search>", step.input),
                    (false, false) => {
                        format!("<tool name=\"{}\">{}</tool>", step.tool, step.input)
                    }
                }
            }
            (None, _) if turn > self.solution.len() => {
                return Err("the protocol asks for a turn after the answer".into());
            }
            (None, Some("answer")) => format!("{}</answer>", self.answer),
            (None, Some(_)) => {
                return Err("the protocol opens a search after the solution's last call".into());
            }
            (None, None) => format!("<answer>{}</answer>", self.answer),
        };
        self.state().turns += 1;
        Ok(text)
    }

    /// `text` as the sample a sampler could have drawn under `params`, or why it could not:
    /// too long for the turn's budget, or holding a stop string before its end.
    fn as_sample(&self, text: &str, params: &SamplingParams) -> Result<Sample, String> {
        let tokens = self.inner.tokenize(text).map_err(|e| e.to_string())?;
        if tokens.len() > params.max_tokens {
            return Err(format!(
                "a turn of {} tokens exceeds the turn's budget of {}",
                tokens.len(),
                params.max_tokens
            ));
        }
        let stop = match params.first_stop(text) {
            Some((end, stop)) if end == text.len() => stop.to_string(),
            Some((_, stop)) => return Err(format!("the turn {text:?} holds the stop {stop:?}")),
            None => return Err(format!("the turn {text:?} ends at no stop string")),
        };
        Ok(Sample {
            text: self.inner.detokenize(&tokens).map_err(|e| e.to_string())?,
            logprobs: vec![0.0; tokens.len()],
            tokens,
            finish: FinishReason::Stop(stop),
        })
    }
}

#[async_trait]
impl Policy for Teacher {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }

    fn adapter_version(&self) -> Option<u64> {
        self.inner.adapter_version()
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> searchloop_core::Result<String> {
        self.inner.render_chat(messages, add_generation_prompt)
    }

    fn tokenize(&self, text: &str) -> searchloop_core::Result<Vec<u32>> {
        self.inner.tokenize(text)
    }

    fn detokenize(&self, tokens: &[u32]) -> searchloop_core::Result<String> {
        self.inner.detokenize(tokens)
    }

    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    async fn sample(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> searchloop_core::Result<Vec<Sample>> {
        if n != 1 {
            return Err(Error::Policy(format!(
                "a teacher writes one turn at a time, not {n}"
            )));
        }
        let context = self.inner.detokenize(prompt)?;
        match self
            .next_turn(&context)
            .and_then(|text| self.as_sample(&text, params))
        {
            Ok(sample) => Ok(vec![sample]),
            Err(reason) => {
                let message = format!("the worked solution does not fit the protocol: {reason}");
                self.state().unfit = Some(reason);
                Err(Error::Policy(message))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use searchloop_core::{
        AgentConfig, PolicySlot, SegmentKind, Tool, ToolError, ToolRegistry,
        scripted::ScriptedPolicy,
    };

    use super::*;

    /// A tool that lists the Nova Tote, whose colour is "teal", for any query naming it (or
    /// any arguments naming its SKU), and nothing otherwise.
    struct Lookup(&'static str);

    impl Tool for Lookup {
        type Args = serde_json::Value;
        fn name(&self) -> &str {
            self.0
        }
        fn description(&self) -> &str {
            "Finds products."
        }
        fn parameters(&self) -> serde_json::Value {
            serde_json::json!({"type": "object"})
        }
        async fn call(&self, args: serde_json::Value) -> std::result::Result<String, ToolError> {
            let text = args.to_string().to_lowercase();
            Ok(if text.contains("nova") || text.contains("tt-1") {
                "Nova Tote (TT-1) - colour: teal".into()
            } else {
                "nothing found".into()
            })
        }
    }

    /// An agent whose model always answers "red", over a catalog and an inventory tool, with
    /// the default protocol (a search prefilled first, an answer after an observation) or,
    /// with `free`, no prefills at all.
    fn agent(free: bool) -> Agent {
        let policy = ScriptedPolicy::new(|_: &str| "<answer>red</answer>".into());
        let mut registry = ToolRegistry::new();
        registry.register(Arc::new(Lookup("catalog"))).unwrap();
        registry.register(Arc::new(Lookup("inventory"))).unwrap();
        let mut config = AgentConfig::default();
        config.protocol.max_turn_tokens = 100;
        config.protocol.max_episode_tokens = 1_000;
        if free {
            config.protocol.first_turn_prefill = None;
            config.protocol.after_observation_prefill = None;
        }
        config.sampling.temperature = 0.7;
        let slot = Arc::new(PolicySlot::new(Arc::new(policy.with_context_length(8_192))));
        Agent::new(slot, Arc::new(registry), config).unwrap()
    }

    fn question(solution: &[(&str, &str)]) -> Question {
        Question {
            id: "q1".into(),
            question: "What colour is the Nova Tote?".into(),
            answers: vec!["Teal".into(), "teal green".into()],
            kind: "single_hop".into(),
            tools: vec!["catalog".into()],
            solution: solution
                .iter()
                .map(|(tool, input)| SolutionStep {
                    tool: tool.to_string(),
                    input: input.to_string(),
                })
                .collect(),
        }
    }

    /// The texts of an episode's model turns.
    fn model_turns(t: &Trajectory) -> Vec<String> {
        t.segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Model)
            .map(|s| {
                t.tokens[s.start as usize..s.end as usize]
                    .iter()
                    .map(|&b| b as u8 as char)
                    .collect()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_solution_is_played_through_the_prefilled_protocol_and_answers() {
        let agent = agent(false);
        let played = demonstrate(&agent, &question(&[("catalog", "nova tote")]), 7)
            .await
            .unwrap();
        let Demonstrated::Episode(t) = played else {
            panic!("{played:?}");
        };
        // The teacher continues each prefilled tag: the search, then the first gold answer.
        assert_eq!(model_turns(&t), ["nova tote</search>", "Teal</answer>"]);
        assert_eq!(t.answer.as_deref(), Some("Teal"));
        assert_eq!(t.tool_calls.len(), 1);
        assert_eq!(t.tool_calls[0].arguments["query"], "nova tote");
        // Rewarded like any episode: exact match against the gold answers.
        let exact = searchloop_core::reward::source::EXACT_MATCH;
        assert!(
            t.rewards
                .iter()
                .any(|r| r.source == exact && r.value == 1.0)
        );
        assert_eq!(t.sampling.temperature, 0.7);
        assert!(t.logprobs.iter().all(|&lp| lp == 0.0));
        // The model itself would have answered "red": the teacher is its own policy.
        let sampled = agent.ask("What colour is the Nova Tote?").await.unwrap();
        assert_eq!(sampled.answer.as_deref(), Some("red"));
    }

    #[tokio::test]
    async fn a_solution_whose_observations_lack_the_answer_is_ungrounded() {
        let played = demonstrate(&agent(false), &question(&[("catalog", "aurora bag")]), 7)
            .await
            .unwrap();
        assert!(matches!(played, Demonstrated::Ungrounded), "{played:?}");
    }

    #[tokio::test]
    async fn a_named_tool_call_needs_a_protocol_that_lets_the_model_choose() {
        let solution = [
            ("catalog", "nova tote"),
            ("inventory", r#"{"sku": "TT-1"}"#),
        ];
        // The default protocol prefills the answer after the first observation.
        let played = demonstrate(&agent(false), &question(&solution), 7)
            .await
            .unwrap();
        let Demonstrated::Unfit(reason) = played else {
            panic!("{played:?}");
        };
        assert!(reason.contains("before the call to inventory"), "{reason}");
        // Without prefills the teacher writes the tags itself.
        let played = demonstrate(&agent(true), &question(&solution), 7)
            .await
            .unwrap();
        let Demonstrated::Episode(t) = played else {
            panic!("{played:?}");
        };
        assert_eq!(
            model_turns(&t),
            [
                "<search>nova tote</search>",
                r#"<tool name="inventory">{"sku": "TT-1"}</tool>"#,
                "<answer>Teal</answer>"
            ]
        );
        assert_eq!(t.tool_calls[1].tool, "inventory");
    }

    #[tokio::test]
    async fn a_turn_the_sampler_would_have_cut_short_is_unfit() {
        // The protocol's implicit close stops a prefilled search at a newline.
        let played = demonstrate(&agent(false), &question(&[("catalog", "nova\ntote")]), 7)
            .await
            .unwrap();
        let Demonstrated::Unfit(reason) = played else {
            panic!("{played:?}");
        };
        assert!(reason.contains("holds the stop"), "{reason}");
    }
}
