"""A retail support bot on the searchloop Python bindings.

It answers customer questions with the embedded model, the shop's catalog and inventory (from a
`searchloop.toml`, such as the one `searchloop demo` writes), and one tool written in Python:
the shop's policies, as a host application would wrap its own API. Each answer is followed by
the customer's rating, recorded as feedback on the episode so a later training round can learn
from it.

    scripts/bindings.sh
    target/release/searchloop demo --workdir searchloop-data --questions 0
    PYTHONPATH=target/bindings/python python3 examples/python/retail_support_bot.py \
        --config searchloop-data/searchloop.toml

Without `--question` it reads questions from the terminal; with `--rate` it records that rating
instead of asking for one.
"""

import argparse
import asyncio
import sys

import searchloop

POLICIES = {
    "returns": "Unworn items can be returned within 30 days with the receipt, for a full refund.",
    "shipping": "Standard shipping takes 3-5 working days and is free over $50.",
    "warranty": "Electronics carry a 2-year warranty; bags and shoes carry 1 year.",
}


class ShopPolicies(searchloop.SearchTool):
    """The shop's policies, looked up by keyword. The model calls it with
    `<tool name="shop_policies">{"query": "returns"}</tool>`; set `default_tool` to
    "shop_policies" in the options to make `<search>` call it instead of the catalog."""

    def name(self):
        return "shop_policies"

    def description(self):
        return "Looks up the shop's returns, shipping and warranty policies."

    def call(self, query):
        found = [text for topic, text in POLICIES.items() if topic in query.lower()]
        if not found:
            # An exception would reach the model as an `error: …` observation too; a plain
            # sentence reads better.
            return "No policy matches; the topics are: " + ", ".join(POLICIES)
        return " ".join(found)


async def serve(agent, question, rating):
    answer = await agent.ask(question)
    print(f"customer: {question}")
    for call in answer.tool_calls:
        status = "" if call.ok else " (failed)"
        print(f"  [{call.tool}{status}] {call.arguments_json}")
    print(f"bot: {answer.text or 'Sorry, I could not find that.'}  ({answer.latency_ms:.0f} ms)")
    if rating is None:
        reply = input("was this helpful? [y/n] ").strip().lower()
        rating = 1.0 if reply.startswith("y") else -1.0
    await agent.feedback(answer.trajectory_id, "helpful", rating)
    print(f"feedback recorded: helpful = {rating:+.0f} on {answer.trajectory_id}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a searchloop.toml")
    parser.add_argument("--question", action="append", help="a question (repeatable)")
    parser.add_argument("--rate", type=float, help="record this rating (-1 to 1) for every answer")
    args = parser.parse_args()
    try:
        agent = searchloop.Agent.from_file(args.config, tools=[ShopPolicies()])
    except searchloop.SearchloopError as e:
        sys.exit(f"cannot start the bot: {e}")
    for question in args.question or typed_questions():
        asyncio.run(serve(agent, question, args.rate))


def typed_questions():
    """Questions typed at the terminal, until an empty line or the end of input."""
    while True:
        try:
            question = input("question (empty to quit): ").strip()
        except EOFError:
            return
        if not question:
            return
        yield question


if __name__ == "__main__":
    main()
