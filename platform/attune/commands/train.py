"""attune train RECIPE [key=value ...]: fine-tune on Ray Train and print the registry entry."""

HELP = "fine-tune a recipe with Ray Train"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny-full.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-3")


def run(args) -> int:
    from attune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # fails before any cluster work
    from attune.train.trainer import fine_tune

    print(f"[attune] registry entry: {fine_tune(recipe)}", flush=True)
    return 0
