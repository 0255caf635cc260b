"""attune eval ENTRY [--data FILE]: score a registry entry on held-out chats (eval loss over the
answers' tokens, exact match of greedy answers) and record the scores in its manifest, where
`attune promote --require` reads them.

    attune eval ~/.attune/registry/tiny-full --data data/transformer_qa.jsonl
"""

HELP = "score a registry entry (eval loss, exact match) and record the scores in its manifest"


def add_arguments(parser) -> None:
    parser.add_argument("entry", help="registry entry location (a path or s3:// / gs:// URI)")
    parser.add_argument("--data", default="data/transformer_qa.jsonl",
                        help="held-out data, one example per line")
    parser.add_argument("--format", default="messages",
                        choices=["messages", "prompt_completion", "alpaca", "text"],
                        help="the data's format, as data.format in a recipe")


def run(args) -> int:
    from attune.evaluation import evaluate

    record = evaluate(args.entry, args.data, args.format)
    scores = "  ".join(f"{name} {value:.4f}" for name, value in record["scores"].items())
    print(f"[attune] {args.entry}: {scores}  ({record['examples']} examples of {args.data})",
          flush=True)
    return 0
