"""attune models [--endpoint URL]: the model ids an OpenAI-compatible endpoint serves."""

import os

HELP = "list the models an endpoint serves"


def add_arguments(parser) -> None:
    from attune.ui.endpoint import API_KEY_ENV, default_endpoint

    parser.add_argument("--endpoint", default=default_endpoint())
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, "none"),
                        help="bearer key (default: $ATTUNE_API_KEY)")


def run(args) -> int:
    from openai import OpenAI

    for model in OpenAI(base_url=args.endpoint, api_key=args.api_key).models.list().data:
        print(model.id)
    return 0
