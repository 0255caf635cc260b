"""attune build-tiny [NAME ...]: build the tiny base models (done on first use anyway).

    attune build-tiny                          # attune:tiny-llama, attune:tiny-qwen2, attune:tiny-llama3
    attune build-tiny attune:tiny-qwen2
"""

from attune.config import ConfigError

HELP = "build the tiny base models (tiny-llama, tiny-qwen2, tiny-llama3)"


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="attune:tiny-llama, attune:tiny-qwen2 or attune:tiny-llama3 "
                             "(default: all)")


def run(args) -> int:
    from attune.tiny_models import TINY_MODELS, ensure_tiny

    unknown = [n for n in args.names if n not in TINY_MODELS]
    if unknown:
        raise ConfigError(f"build-tiny: no tiny model {', '.join(unknown)}; there are "
                          f"{', '.join(TINY_MODELS)}")
    for name in args.names or TINY_MODELS:
        print(f"{name}: {ensure_tiny(name)}")
    return 0
