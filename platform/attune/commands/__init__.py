"""One module per `attune` subcommand: `HELP`, `add_arguments(parser)` and `run(args) -> int`.

Each `run` imports the library when it runs, not when the module loads: `attune --help` and a
bad argument answer at once instead of after loading Ray, torch and vLLM.
"""
