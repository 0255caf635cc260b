"""One module per `attune` subcommand: `HELP`, `add_arguments(parser)` and `run(args) -> int`."""
