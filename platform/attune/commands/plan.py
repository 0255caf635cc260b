"""attune plan RECIPE [key=value ...] [--json]: the memory plan of a recipe, from the model's
config alone (no weights, no cluster): parameters, gradients, optimizer states, activations and
logits per device, whether they fit scaling.device_memory_gib, changes that would, and the KV
cache for serving.

    attune plan recipes/llama3-8b-full.yaml scaling.device_memory_gib=80
"""

import json
from dataclasses import asdict

HELP = "print a recipe's per-device memory plan (no cluster, no weights)"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/llama3-8b-full.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value, e.g. scaling.device_memory_gib=80 optim.micro_batch_size=1")
    parser.add_argument("--json", action="store_true", help="the plan as JSON (bytes)")


def run(args) -> int:
    from attune.recipe import load_recipe
    from attune.train.memory_plan import format_plan, plan_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    plan = plan_recipe(recipe)
    if args.json:
        print(json.dumps({**asdict(plan), "total_bytes": plan.total_bytes, "fits": plan.fits},
                         indent=2))
    else:
        print(format_plan(plan, recipe))
    return 0 if plan.fits is not False else 1
