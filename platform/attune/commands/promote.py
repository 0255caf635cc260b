"""attune promote ENTRY --config SERVE_CONFIG: make a registry entry servable by a running app.

A LoRA adapter is copied into the config's lora_store, where the running app loads it on the
first request for 'base:entry' (no redeploy). A full fine-tune is added to the config's
entries; `serve deploy` of the config then rolls it out.
"""

HELP = "make a registry entry servable (LoRA: live at once; full: added to the config)"


def add_arguments(parser) -> None:
    parser.add_argument("entry", help="registry entry location")
    parser.add_argument("--config", default="deployments/tiny.yaml", help="the Serve config file")


def run(args) -> int:
    from attune.serve.promote import promote

    print(promote(args.entry, args.config), flush=True)
    return 0
