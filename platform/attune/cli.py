"""The `attune` command: one subcommand per module in attune.commands.

    attune train recipes/tiny-full.yaml [key=value ...]
    attune submit [--address URL] train recipes/tiny-full.yaml
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from attune.cluster import exit_now
from attune.config import ConfigError
from attune.console import VERBOSE_ENV
from attune.train.records import DataError

# name -> module in attune.commands (each has HELP, add_arguments, run)
COMMANDS = {
    "train": "train",
    "plan": "plan",
    "tune": "tune",
    "submit": "submit",
    "build-tiny": "build_tiny",
    "answers": "answers",
    "serve": "serve",
    "models": "models",
    "runs": "runs",
    "eval": "eval",
    "generate": "generate",
    "promote": "promote",
    "k8s": "k8s",
    "chat": "chat",
    "chat-user": "chat_user",
    "feedback": "feedback",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attune", description="Fine-tune, search, serve and "
                                     "chat with open LLMs on Ray.")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and vLLM's logs too (as ATTUNE_VERBOSE=1 does)")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"attune.commands.{module_name}")
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__))
        modules[name] = module
    args = parser.parse_args(argv)
    if args.verbose:  # in the environment, so that Ray's workers and jobs see it too
        os.environ[VERBOSE_ENV] = "1"
    try:
        return modules[args.command].run(args)
    except (ConfigError, DataError) as e:  # bad input: one clear line, no traceback
        print(f"attune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the user asked to stop, now, and without a traceback
        exit_now(130)


if __name__ == "__main__":
    sys.exit(main())
