"""attune chat [--endpoint URL] [--model ID]: serve the Gradio chat page over an OpenAI endpoint.

    attune chat                                                   # http://127.0.0.1:7860, no login
    attune chat --host 0.0.0.0 --users-file chat-users            # `attune chat-user add` writes it

The page works against attune's endpoint (the default: where `attune serve` listens), plain vLLM,
or any OpenAI-compatible server. The API key comes from ATTUNE_API_KEY, and every visitor of the
page uses it: off loopback the page needs a login (--users-file, ATTUNE_CHAT_USERS_FILE, or
ATTUNE_CHAT_USERS="user:pass,...") unless --auth none says to serve it open.
"""

import sys

HELP = "chat with served models in the browser (Gradio)"


def add_arguments(parser) -> None:
    from attune.ui.endpoint import ENDPOINT_ENV, default_endpoint

    parser.add_argument("--endpoint", default=default_endpoint(),
                        help=f"OpenAI base URL (default: ${ENDPOINT_ENV}, else {default_endpoint()})")
    parser.add_argument("--model", help="model selected when the page opens (default: the first listed)")
    parser.add_argument("--compare-model", help="second model selected for compare mode")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--users-file", help="users file (user:scrypt$... lines, from `attune chat-user "
                        "add`); read at each login (default: $ATTUNE_CHAT_USERS_FILE)")
    parser.add_argument("--auth", choices=["login", "none"], default="login",
                        help="none: serve the page without a login on any address (default: login, "
                        "required off loopback)")
    parser.add_argument("--feedback-db", help="where thumbs and corrections of answers go: "
                        "postgresql://user:password@host/db, or any SQLAlchemy URL (default: "
                        "$ATTUNE_FEEDBACK_DB, else sqlite under $ATTUNE_HOME)")
    parser.add_argument("--no-feedback", action="store_true", help="answers take no feedback")


def run(args) -> int:
    from attune.ui import build_page_from_config, launch_page
    from attune.ui.config import PageConfig
    from attune.ui.users import UsersError, page_login

    config = PageConfig(endpoint=args.endpoint, model=args.model, compare_model=args.compare_model,
                        auth=args.auth, users_file=args.users_file,
                        feedback=not args.no_feedback, feedback_db=args.feedback_db)
    try:
        # a malformed users file, or an open page on a network, fails here before the server starts
        page_login(config.auth, args.host, config.users_file)
    except (UsersError, OSError) as e:
        print(f"attune: {e}", file=sys.stderr)
        return 2
    page = build_page_from_config(config)
    print(f"[attune] chat page for {config.endpoint} at http://{args.host}:{args.port}/ (Ctrl-C to stop)",
          flush=True)
    launch_page(page, host=args.host, port=args.port, auth=config.auth, users_file=config.users_file)
    return 0
