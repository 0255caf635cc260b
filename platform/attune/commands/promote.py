"""attune promote ENTRY --config SERVE_CONFIG [--require 'SCORE>=N' ...]: make a registry entry
servable by a running app; with --require, only if its `attune eval` scores meet every bound.

A LoRA adapter is copied into the config's lora_store, where the running app loads it on the
first request for 'base:entry' (no redeploy). A full fine-tune is added to the config's
entries; `serve deploy` of the config then rolls it out.
"""

HELP = "make a registry entry servable (LoRA: live at once; full: added to the config)"


def add_arguments(parser) -> None:
    parser.add_argument("entry", help="registry entry location")
    parser.add_argument("--config", default="deployments/tiny.yaml", help="the Serve config file")
    parser.add_argument("--require", action="append", default=[], metavar="SCORE>=N",
                        help="a bound on a score of `attune eval`, e.g. 'exact_match>=0.9' "
                             "(repeatable; OP one of >=, >, <=, <, ==)")


def run(args) -> int:
    from attune.serve.promotion_gate import check_requirements
    from attune.registry import read_manifest
    from attune.serve.promote import promote

    if args.require:  # refused with its scores before anything is touched
        check_requirements(read_manifest(args.entry), args.require)
    print(promote(args.entry, args.config), flush=True)
    return 0
