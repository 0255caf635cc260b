"""attune models [--endpoint URL]: the model ids an OpenAI-compatible endpoint serves."""

import os

HELP = "list the models an endpoint serves"


def add_arguments(parser) -> None:
    parser.add_argument("--endpoint", default=os.environ.get("ATTUNE_ENDPOINT", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--api-key", default=os.environ.get("ATTUNE_API_KEY", "none"),
                        help="bearer key (default: $ATTUNE_API_KEY)")


def run(args) -> int:
    from openai import OpenAI

    for model in OpenAI(base_url=args.endpoint, api_key=args.api_key).models.list().data:
        print(model.id)
    return 0
