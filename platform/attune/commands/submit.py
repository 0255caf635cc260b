"""attune submit [--address URL] COMMAND ...: run an attune command as a Ray job."""

import argparse

HELP = "run an attune command as a Ray job (ships attune with it)"


def add_arguments(parser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the attune command, e.g. train RECIPE")


def run(args) -> int:
    from attune.submit import submit

    return submit(args.args, address=args.address, wait=not args.no_wait)
