"""attune serve RECIPE_OR_SERVE_CONFIG [k=v ...]: serve on an embedded Ray (or RAY_ADDRESS) until Ctrl-C."""

HELP = "serve base and fine-tuned models behind an OpenAI-compatible endpoint"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a recipe (serves its entry) or a Serve config, e.g. "
                        "deployments/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, dotted key=value")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)


def run(args) -> int:
    import time

    from attune.cluster import exit_now, started_here
    from attune.registry import read_manifest
    from attune.serve.config import config_from_file
    from attune.serve.local import run as serve_locally

    config = config_from_file(args.config, args.overrides)  # fails before Ray starts
    for location in config.entries:  # and so does an entry that is not there
        read_manifest(location)
    endpoint = serve_locally(config, host=args.host, port=args.port)
    print(f"[attune] serving at {endpoint.base_url}", flush=True)
    for model_id in endpoint.model_ids:
        print(f"[attune]   model: {model_id}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[attune] shutting down", flush=True)
        if started_here():
            exit_now(0)  # the cluster is killed whole, at once: no replica to drain one by one
        # As `serve run` does: the app goes with the command on a joined cluster too (Serve's
        # shutdown also stops its HAProxy, which outlives a killed cluster otherwise).
        from ray import serve

        serve.shutdown()
        return 0
