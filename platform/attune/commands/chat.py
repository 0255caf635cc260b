"""attune chat [--endpoint URL] [--model ID]: serve the Gradio chat page over an OpenAI endpoint.

The page works against attune's endpoint (the default: where `attune serve` listens), plain vLLM,
or any OpenAI-compatible server. The API key comes from ATTUNE_API_KEY; page login from
ATTUNE_CHAT_USERS ("user:pass,...") or ATTUNE_CHAT_USERS_FILE.
"""

HELP = "chat with served models in the browser (Gradio)"


def add_arguments(parser) -> None:
    from attune.ui.endpoint import DEFAULT_ENDPOINT

    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"OpenAI base URL (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--model", help="model selected when the page opens (default: the first listed)")
    parser.add_argument("--compare-model", help="second model selected for compare mode")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)


def run(args) -> int:
    import sys

    from attune.ui import build_page, launch_page
    from attune.ui.users import UsersError, page_users

    try:
        page_users()  # a malformed users list fails here, in one line, before the server starts
    except (UsersError, OSError) as e:
        print(f"attune: {e}", file=sys.stderr)
        return 2
    page = build_page(args.endpoint, model=args.model, compare_model=args.compare_model)
    print(f"[attune] chat page for {args.endpoint} at http://{args.host}:{args.port}/ (Ctrl-C to stop)",
          flush=True)
    launch_page(page, host=args.host, port=args.port)
    return 0
