"""attune eval ENTRY [--data FILE]: score a registry entry on held-out chats (eval loss over the
answers' tokens, exact match of greedy answers) and record the scores in its manifest, where
`attune promote --require` reads them.

    attune eval ~/.attune/registry/tiny-full --data data/transformer_qa.jsonl
    attune eval ~/.attune/registry/tiny-full --endpoint http://127.0.0.1:8000/v1 --tasks attune_qa

With --endpoint, lm-evaluation-harness also runs its tasks against the served entry: attune_qa
(the data's questions, exact match) here, its standard tasks by name where a dataset hub is
reachable.
"""

import os

HELP = "score a registry entry (eval loss, exact match) and record the scores in its manifest"


def add_arguments(parser) -> None:
    parser.add_argument("entry", help="registry entry location (a path or s3:// / gs:// URI)")
    parser.add_argument("--data", default="data/transformer_qa.jsonl",
                        help="held-out data, one example per line")
    parser.add_argument("--format", default="messages",
                        choices=["messages", "prompt_completion", "alpaca", "text"],
                        help="the data's format, as data.format in a recipe")
    parser.add_argument("--endpoint", default=None,
                        help="the OpenAI endpoint serving the entry (ends in /v1): run "
                        "lm-evaluation-harness's --tasks against it")
    parser.add_argument("--model", default=None,
                        help="the entry's model id at the endpoint (default: the entry's name)")
    parser.add_argument("--tasks", default="attune_qa",
                        help="comma-separated lm-evaluation-harness tasks (default: attune_qa, "
                        "built from --data)")
    parser.add_argument("--api-key", default=os.environ.get("ATTUNE_API_KEY", "none"),
                        help="bearer key for the endpoint (default: $ATTUNE_API_KEY)")


def run(args) -> int:
    from attune.evaluate.scores import Served, evaluate
    from attune.registry import read_manifest

    served = None
    if args.endpoint:
        served = Served(args.endpoint, args.api_key, args.model or read_manifest(args.entry)["name"],
                        [t.strip() for t in args.tasks.split(",") if t.strip()])
    record = evaluate(args.entry, args.data, args.format, served=served)
    scores = "  ".join(f"{name} {value:.4f}" for name, value in record["scores"].items())
    print(f"[attune] {args.entry}: {scores}  ({record['examples']} examples of {args.data})",
          flush=True)
    return 0
