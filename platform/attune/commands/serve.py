"""attune serve RECIPE_OR_SERVE_CONFIG [k=v ...]: serve on an embedded Ray (or RAY_ADDRESS) until Ctrl-C."""

HELP = "serve base and fine-tuned models behind an OpenAI-compatible endpoint"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a recipe (serves its entry) or a Serve config, e.g. "
                        "deployments/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, dotted key=value")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)


def run(args) -> int:
    from attune.serve.local import serve_until_interrupted

    return serve_until_interrupted(args.config, args.overrides, host=args.host, port=args.port)
