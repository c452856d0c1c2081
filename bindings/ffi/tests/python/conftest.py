"""Fixtures of the Python binding tests: the demo work folder (data set, catalog index,
inventory, config) built once per session by the real `searchloop` binary, and agents over it
with the real embedded model.

`scripts/test-python.sh` builds the bindings and the binary, then runs these tests with
`target/bindings/python` on `PYTHONPATH`.
"""

import asyncio
import json
import os
import pathlib
import subprocess

import pytest

import searchloop

REPO = pathlib.Path(__file__).resolve().parents[4]


def run(coroutine):
    """Awaits one binding call on a fresh event loop, as a synchronous host would."""
    return asyncio.run(coroutine)


@pytest.fixture(scope="session")
def searchloop_bin():
    path = pathlib.Path(os.environ.get("SEARCHLOOP_BIN", REPO / "target/release/searchloop"))
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it with `cargo build --release -p searchloop-cli`")
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, searchloop_bin):
    """The demo's work folder, prepared by `searchloop demo` with no questions asked."""
    folder = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [str(searchloop_bin), "demo", "--workdir", str(folder), "--questions", "0"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return folder


@pytest.fixture(scope="session")
def config_path(workdir):
    path = workdir / "searchloop.toml"
    assert path.is_file(), f"the demo wrote no config in {workdir}"
    return str(path)


@pytest.fixture(scope="session")
def questions(workdir):
    """The demo data set's single-hop catalog questions."""
    with open(workdir / "data/questions.jsonl", encoding="utf-8") as lines:
        items = [json.loads(line) for line in lines]
    return [q for q in items if q["kind"] == "single_hop"]


@pytest.fixture(scope="session")
def agent(config_path):
    """The demo config's agent: the real model, the catalog, inventory and help center tools,
    SQLite. Greedy, so each question gets the same episode on every run: the 135M model at the
    demo's temperature sometimes writes a search query too long to finish in a turn."""
    return searchloop.Agent(searchloop.AgentOptions(config_path=config_path, temperature=0.0))


@pytest.fixture(scope="session")
def first_answer(agent, questions):
    """One real episode, shared by the tests that read it back."""
    question = questions[0]["question"]
    return question, run(agent.ask(question))
