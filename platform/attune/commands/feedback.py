"""attune feedback export --as dpo|sft FILE: the chat page's thumbs and corrections as training data.

    attune feedback export --as dpo feedback-dpo.jsonl      # corrected answers: chosen vs rejected
    attune feedback export --as sft feedback-sft.jsonl      # thumbs-up and corrected answers
    attune feedback export --as dpo pairs.jsonl --model tiny-full --since 2026-11-01 --user ada
    attune feedback upgrade                                 # the database to this attune's schema
    attune train recipes/tiny-dpo.yaml 'data.train_files=[feedback-dpo.jsonl]'

The database is the page's: --db, else $ATTUNE_FEEDBACK_DB (postgresql://user:password@host/db
or any SQLAlchemy URL), else sqlite:///$ATTUNE_HOME/feedback.db. Both bring it up to date
first; only upgrade creates the table where there is none (a new database for the pages).
"""

HELP = "export the chat page's feedback as DPO pairs or SFT chats (JSONL the recipes read)"
DB_HELP = "the feedback database URL (default: $ATTUNE_FEEDBACK_DB, else sqlite under $ATTUNE_HOME)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="feedback_command", required=True)
    export = sub.add_parser("export", help="write the feedback to FILE as JSONL")
    export.add_argument("file", help="the JSONL file to write")
    export.add_argument("--as", dest="kind", required=True, choices=["dpo", "sft"],
                        help="dpo: {messages, chosen, rejected} (data.format: preference); "
                             "sft: {messages} (data.format: messages)")
    export.add_argument("--db", help=DB_HELP)
    export.add_argument("--model", help="only the feedback on this model id")
    export.add_argument("--user", help="only the feedback of this page login")
    export.add_argument("--since", help="only feedback from this date or time on (ISO 8601, UTC "
                        "unless it says: 2026-11-30, 2026-11-30T12:00)")
    export.add_argument("--until", help="only feedback before this time, or through this date")
    upgrade = sub.add_parser("upgrade", help="bring the database to this attune's schema "
                             "(creating the table in an empty one)")
    upgrade.add_argument("--db", help=DB_HELP)


def run(args) -> int:
    from attune.feedback import FeedbackStore

    # upgrade may create the table (a new database for the pages); export reads what is there
    store = FeedbackStore(args.db, create=args.feedback_command == "upgrade", lazy=True)
    before, after = store.upgrade()
    if args.feedback_command == "upgrade" or before != after:
        was = f"migrated from {before or 'empty'}" if before != after else "this attune's newest"
        print(f"[attune] {store.shown}: at revision {after} ({was})", flush=True)
    if args.feedback_command == "upgrade":
        return 0
    return _export(store, args)


def _export(store, args) -> int:
    from attune.feedback.export import export, utc_text

    filters = {"model": args.model, "user": args.user,
               "since": args.since and utc_text(args.since, "--since"),
               "until": args.until and utc_text(args.until, "--until", end=True)}
    written = export(store, args.kind, args.file, **filters)
    what = "preference pairs" if args.kind == "dpo" else "chats"
    print(f"[attune] {args.file}: {written.lines} {what} from {store.shown}", flush=True)
    if skipped := written.skipped_line():
        print(f"[attune] {skipped}", flush=True)
    return 0
