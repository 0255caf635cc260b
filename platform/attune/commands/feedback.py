"""attune feedback export --as dpo|sft FILE: the chat page's thumbs and corrections as training data.

    attune feedback export --as dpo feedback-dpo.jsonl      # corrected answers: chosen vs rejected
    attune feedback export --as sft feedback-sft.jsonl      # thumbs-up and corrected answers
    attune train recipes/tiny-dpo.yaml 'data.train_files=[feedback-dpo.jsonl]'

The database is the page's: $ATTUNE_FEEDBACK_DB (a SQLAlchemy URL), else
sqlite:///$ATTUNE_HOME/feedback.db.
"""

HELP = "export the chat page's feedback as DPO pairs or SFT chats (JSONL the recipes read)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="feedback_command", required=True)
    export = sub.add_parser("export", help="write the feedback to FILE as JSONL")
    export.add_argument("file", help="the JSONL file to write")
    export.add_argument("--as", dest="kind", required=True, choices=["dpo", "sft"],
                        help="dpo: {messages, chosen, rejected} (data.format: preference); "
                             "sft: {messages} (data.format: messages)")
    export.add_argument("--db", help="the feedback database URL (default: $ATTUNE_FEEDBACK_DB, "
                                     "else sqlite under $ATTUNE_HOME)")
    export.add_argument("--model", help="only the feedback on this model id")


def run(args) -> int:
    from attune.feedback import FeedbackStore

    store = FeedbackStore(args.db, create=False)  # a read: no database there is an error
    lines = store.export(args.kind, args.file, model=args.model)
    what = "preference pairs" if args.kind == "dpo" else "chats"
    print(f"[attune] {args.file}: {lines} {what} from {store.url}", flush=True)
    return 0
