"""The `attune` command.

    attune train recipes/tiny-full.yaml [key=value ...]    fine-tune on Ray Train, print the entry
    attune submit [--address URL] train RECIPE [k=v ...]   the same as a Ray job on a cluster
    attune build-tiny                                      build the bundled tiny base model
    attune answers ENTRY [--data FILE]                     exact-match of greedy answers
"""

from __future__ import annotations

import argparse
import sys

from attune.config import RecipeError
from attune.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attune", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a recipe with Ray Train")
    train.add_argument("recipe", help="recipe YAML")
    train.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-3")

    submit = commands.add_parser("submit", help="run an attune command as a Ray job")
    submit.add_argument("--address", default=None,
                        help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.add_argument("args", nargs=argparse.REMAINDER, help="the attune command to run")

    commands.add_parser("build-tiny", help="build the bundled tiny base model")

    answers = commands.add_parser("answers", help="greedy answers of a model on a Q&A file")
    answers.add_argument("model", help="registry entry or model directory")
    answers.add_argument("--data", default="data/transformer_qa.jsonl")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (RecipeError, DataError) as e:
        print(f"attune: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "train":
        from attune.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)  # fails before any cluster work
        from attune.trainer import fine_tune

        print(f"[attune] registry entry: {fine_tune(recipe)}", flush=True)
        return 0
    if args.command == "submit":
        from attune.submit import submit

        return submit(args.args, address=args.address, wait=not args.no_wait)
    if args.command == "build-tiny":
        from attune.modeling import ensure_tiny_llama

        print(ensure_tiny_llama())
        return 0
    if args.command == "answers":
        from attune.answers import exact_match, greedy_answers, load_for_generation, qa_pairs

        model, tokenizer = load_for_generation(args.model)
        pairs = qa_pairs(args.data)
        got = greedy_answers(model, tokenizer, [q for q, _ in pairs])
        for (question, expected), answer in zip(pairs, got):
            print(f"{'✓' if answer == expected else '✗'} {question}  ->  {answer}")
        print(f"exact match: {exact_match(got, [a for _, a in pairs]):.1%} of {len(pairs)}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
