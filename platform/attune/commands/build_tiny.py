"""attune build-tiny: build the bundled tiny base model (done on first use anyway)."""

HELP = "build the bundled tiny base model"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from attune.modeling import ensure_tiny_llama

    print(ensure_tiny_llama())
    return 0
