"""The Python bindings over the real embedded model and a real SQLite store: a catalog question,
a Python-defined tool the agent calls, feedback, clear errors, and asks from several threads.

Real-model episodes cost seconds each, so the suite runs six in all (`first_answer`, the
Python tool, three threads, the example bot); the failure paths of host tools run on the
scripted stand-in, which makes them deterministic.
"""

import json
import pathlib
import re
import subprocess
import sys
import threading
import time

import pytest

import searchloop
from conftest import REPO, run

SKU = re.compile(r"\[[A-Z]{3}-\d{5}\]")


class CatalogApi(searchloop.SearchTool):
    """A host's own product API: the demo catalog, searched by product name in Python."""

    def __init__(self, catalog_file):
        with open(catalog_file, encoding="utf-8") as lines:
            self.products = [json.loads(line) for line in lines]
        self.queries = []

    def name(self):
        return "product_api"

    def description(self):
        return "Finds products by name in the shop's product API."

    def call(self, query):
        self.queries.append(query)
        words = set(re.findall(r"[a-z]+", query.lower()))
        ranked = sorted(
            self.products,
            key=lambda p: -len(words & set(p["name"].lower().split())),
        )
        best = ranked[0]
        if not words & set(best["name"].lower().split()):
            return "no product matches"
        return f"[{best['sku']}] {best['name']} - {best['description']}"


class FailingApi(searchloop.SearchTool):
    """A host tool whose every call fails, in the ways host code fails."""

    def name(self):
        return "failing_api"

    def description(self):
        return "Always fails."

    def call(self, query):
        if "crash" in query:
            raise ValueError("boom")
        if "slow" in query:
            time.sleep(2.0)
            return "too late"
        if "number" in query:
            return 42
        raise searchloop.HostToolError.Failed("the inventory service is down")


def test_ask_answers_a_catalog_question(agent, first_answer):
    question, answer = first_answer
    assert agent.tool_names()[:1] == ["catalog"]
    assert answer.trajectory_id
    assert answer.latency_ms > 0
    assert answer.end in (
        searchloop.EpisodeEnd.ANSWERED,
        searchloop.EpisodeEnd.NO_ANSWER,
        searchloop.EpisodeEnd.TOKEN_LIMIT,
    )
    assert (answer.text is not None) == (answer.end == searchloop.EpisodeEnd.ANSWERED)
    # The first turn is a search (the runtime prefills `<search>`), which goes to the catalog.
    search = answer.tool_calls[0]
    assert search.tool == "catalog"
    assert search.ok, search.observation
    assert "query" in json.loads(search.arguments_json)
    assert SKU.search(search.observation), search.observation
    stored = run(agent.trajectory(answer.trajectory_id))
    assert stored.question == question
    assert stored.answer == answer.text
    assert stored.tool_calls == answer.tool_calls
    assert stored.model_id == agent.model_id() != "scripted"
    assert stored.token_count > 0 and stored.total_ms > 0
    assert [r.source for r in stored.rewards] == ["format"]


def test_a_python_tool_is_called_by_the_agent(config_path, workdir, questions, tmp_path):
    api = CatalogApi(workdir / "data/catalog.jsonl")
    options = searchloop.AgentOptions(
        config_path=config_path,
        default_tool="product_api",
        store_url=str(tmp_path / "host-tool.db"),
        temperature=0.0,
    )
    agent = searchloop.Agent(options, tools=[api])
    assert agent.tool_names() == ["catalog", "inventory", "help", "product_api"]
    assert agent.default_tool() == "product_api"
    answer = run(agent.ask(questions[1]["question"]))
    assert api.queries, "the agent never called the Python tool"
    call = answer.tool_calls[0]
    assert call.tool == "product_api"
    assert json.loads(call.arguments_json) == {"query": api.queries[0]}
    assert call.ok
    assert call.observation == api.call(api.queries[0])[:1500]
    assert run(agent.stats()).trajectories == 1


def test_host_tool_failures_become_observations(config_path, tmp_path):
    options = searchloop.AgentOptions(
        config_path=config_path,
        default_tool="failing_api",
        store_url=str(tmp_path / "failing.db"),
        tool_timeout_ms=300,
    )
    script = searchloop.ScriptedPolicyOptions(answer="sorry")
    agent = searchloop.Agent.scripted(options, script, tools=[FailingApi()])
    assert agent.model_id() == "scripted"
    cases = [
        ("please crash", "ValueError('boom')"),
        ("is it in stock?", "error: the inventory service is down"),
        ("a number please", "error: the host tool raised"),
        ("a slow one", "error: timed out after 300 ms"),
    ]
    for question, expected in cases:
        started = time.monotonic()
        answer = run(agent.ask(question))
        assert time.monotonic() - started < 1.5, f"{question}: the tool timeout did not apply"
        assert answer.text == "sorry"
        assert answer.end == searchloop.EpisodeEnd.ANSWERED
        [call] = answer.tool_calls
        assert call.tool == "failing_api"
        assert not call.ok
        assert expected in call.observation, (question, call.observation)
    assert run(agent.stats()).trajectories == len(cases)


def test_feedback_is_stored(agent, first_answer):
    _, answer = first_answer
    before = run(agent.stats())
    key = f"order-{answer.trajectory_id}"
    outcome = run(agent.feedback(answer.trajectory_id, "purchase", 1.0, idempotency_key=key))
    assert outcome == searchloop.FeedbackOutcome.RECORDED
    again = run(agent.feedback(answer.trajectory_id, "purchase", 1.0, idempotency_key=key))
    assert again == searchloop.FeedbackOutcome.DUPLICATE
    assert run(agent.feedback(answer.trajectory_id, "thumbs", -1.0)) == (
        searchloop.FeedbackOutcome.RECORDED
    )
    stored = run(agent.trajectory(answer.trajectory_id))
    feedback = {r.source: r for r in stored.rewards if r.source != "format"}
    assert feedback["purchase"].value == 1.0
    assert feedback["purchase"].idempotency_key == key
    assert feedback["thumbs"].value == -1.0
    # format (weight 0.1) + purchase (1.0) + thumbs (-1.0), each at its recorded weight.
    format_reward = next(r for r in stored.rewards if r.source == "format")
    assert stored.reward == pytest.approx(0.1 * format_reward.value + 1.0 - 1.0)
    after = run(agent.stats())
    assert after.feedback_entries == before.feedback_entries + 2
    assert after.reward_entries == before.reward_entries + 2

    with pytest.raises(searchloop.SearchloopError.InvalidFeedback, match="5"):
        run(agent.feedback(answer.trajectory_id, "purchase", 5.0))
    with pytest.raises(searchloop.SearchloopError.InvalidFeedback, match="source"):
        run(agent.feedback(answer.trajectory_id, "not a source!", 1.0))
    with pytest.raises(searchloop.SearchloopError.UnknownTrajectory, match="no-such-id"):
        run(agent.feedback("no-such-id", "purchase", 1.0))
    with pytest.raises(searchloop.SearchloopError.UnknownTrajectory, match="no-such-id"):
        run(agent.trajectory("no-such-id"))
    with pytest.raises(searchloop.SearchloopError.InvalidInput, match="empty"):
        run(agent.ask("   "))


def test_bad_configs_raise_clear_errors(config_path, tmp_path):
    Config = searchloop.SearchloopError.Config
    with pytest.raises(Config, match="missing.toml"):
        searchloop.Agent.from_file(str(tmp_path / "missing.toml"))
    typo = tmp_path / "typo.toml"
    typo.write_text('[model]\nweigths = "q8_0"\n')
    with pytest.raises(Config, match=r"(?s)typo\.toml.*unknown field `weigths`"):
        searchloop.Agent.from_file(str(typo))
    with pytest.raises(Config, match="temperature"):
        searchloop.Agent(searchloop.AgentOptions(config_path=config_path, temperature=-1.0))
    with pytest.raises(Config, match="top_p"):
        searchloop.Agent(searchloop.AgentOptions(config_path=config_path, top_p=1.5))
    with pytest.raises(Config, match=r"at least one \[\[tools\]\]"):
        searchloop.Agent(searchloop.AgentOptions())
    store = str(tmp_path / "refused.db")
    with pytest.raises(Config, match="default tool 'nope'"):
        searchloop.Agent(
            searchloop.AgentOptions(config_path=config_path, store_url=store, default_tool="nope")
        )

    class BadName(FailingApi):
        def name(self):
            return "Bad Name"

    with pytest.raises(Config, match="Bad Name"):
        searchloop.Agent(
            searchloop.AgentOptions(config_path=config_path, store_url=store), tools=[BadName()]
        )

    class Nameless(FailingApi):
        def name(self):
            raise RuntimeError("no name today")

    with pytest.raises(searchloop.SearchloopError.Tool, match="no name today"):
        searchloop.Agent(
            searchloop.AgentOptions(config_path=config_path, store_url=store), tools=[Nameless()]
        )
    with pytest.raises(searchloop.SearchloopError.Model, match="no-such-model.gguf"):
        searchloop.Agent(
            searchloop.AgentOptions(
                config_path=config_path,
                store_url=store,
                model_path=str(tmp_path / "no-such-model.gguf"),
            )
        )


def test_concurrent_asks_from_python_threads(agent, questions):
    before = run(agent.stats()).trajectories
    asked = [q["question"] for q in questions[2:5]]
    answers, errors, spans = {}, [], {}

    def ask(question):
        try:
            started = time.monotonic()
            answers[question] = run(agent.ask(question))
            spans[question] = (started, time.monotonic())
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(q,)) for q in asked]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(answers) == sorted(asked)
    # Every ask was in flight while every other one was: they ran concurrently.
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values())
    ids = {a.trajectory_id for a in answers.values()}
    assert len(ids) == len(asked)
    for question, answer in answers.items():
        assert run(agent.trajectory(answer.trajectory_id)).question == question
    assert run(agent.stats()).trajectories == before + len(asked)


def test_the_example_bot_answers_and_records_feedback(config_path, questions):
    question = questions[5]["question"]
    bot = REPO / "examples/python/retail_support_bot.py"
    result = subprocess.run(
        [sys.executable, str(bot), "--config", config_path, "--question", question, "--rate", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"customer: {question}" in result.stdout
    assert "bot:" in result.stdout
    assert "feedback recorded" in result.stdout, result.stdout


def learn_config(workdir, tmp_path):
    """The demo config plus a `[learn]` section small enough for CI: one prompt, two replay
    episodes, one optimizer step, two held-out questions for the gate. The gate's margin lets
    any candidate through that the ISDD alarm does not stop, so the promotion path always runs
    (the Rust gate tests cover rejections)."""
    questions = workdir / "data/questions.jsonl"
    section = f"""
[learn]
adapters_dir = "{tmp_path / 'adapters'}"
memory_cap_mb = 16000

[learn.trigger]
new_rewarded = 1000000

[learn.eval]
set = "{questions}"
questions = 2

[learn.gate]
margin = 1.0

[learn.round]
source = "replay"
prompts = "{questions}"
group_size = 2
prompts_per_round = 1
threads = 1

[learn.round.trainer]
micro_batch_size = 1

[learn.round.trainer.advantages]
skip_zero_std_groups = false
"""
    # Beside the demo config, so its relative paths (index, inventory) still resolve.
    path = workdir / f"learn-{tmp_path.name}.toml"
    text = (workdir / "searchloop.toml").read_text(encoding="utf-8")
    path.write_text(text + section, encoding="utf-8")
    return str(path)


def test_adapters_training_and_rollback(workdir, tmp_path):
    options = searchloop.AgentOptions(
        config_path=learn_config(workdir, tmp_path),
        store_url=str(tmp_path / "learn.db"),
    )
    agent = searchloop.Agent(options)
    assert run(agent.adapters()) == []
    assert agent.serving_version() is None
    with pytest.raises(searchloop.SearchloopError.Adapter, match="nothing is promoted"):
        run(agent.rollback())
    with pytest.raises(searchloop.SearchloopError.Adapter, match="no adapter v99"):
        run(agent.promote(99))

    summary = run(agent.train_now())
    assert summary.candidate == 1 and summary.incumbent is None
    assert summary.steps >= 1 and summary.train_ms > 0
    assert json.loads(summary.report_json)["candidate"] == 1
    [adapter] = run(agent.adapters())
    assert adapter.version == 1 and adapter.parent_version is None
    assert pathlib.Path(adapter.path, "adapter_model.safetensors").is_file()
    assert summary.promoted, summary.rejection_reason
    assert summary.candidate_em is not None and summary.incumbent_em is not None
    assert adapter.status == "promoted"
    assert agent.serving_version() == 1
    answer = run(agent.ask("Which bags are red?"))
    assert run(agent.trajectory(answer.trajectory_id)).adapter_version == 1
    swap = run(agent.rollback())
    assert (swap.from_version, swap.to_version) == (1, None)
    assert agent.serving_version() is None
    assert run(agent.adapters())[0].status == "rolled_back"


def test_the_scheduler_attaches_only_with_a_learn_section(agent, workdir, tmp_path):
    with pytest.raises(searchloop.SearchloopError.Config, match=r"\[learn\]"):
        run(agent.attach_scheduler())
    with pytest.raises(searchloop.SearchloopError.Config, match=r"\[learn\]"):
        run(agent.train_now())
    options = searchloop.AgentOptions(
        config_path=learn_config(workdir, tmp_path),
        store_url=str(tmp_path / "scheduled.db"),
    )
    learner = searchloop.Agent(options)
    assert not learner.scheduler_attached()
    run(learner.attach_scheduler())
    assert learner.scheduler_attached()
    run(learner.detach_scheduler())
    assert not learner.scheduler_attached()
