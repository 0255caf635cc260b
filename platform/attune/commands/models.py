"""attune models [--endpoint URL]: the model ids an OpenAI-compatible endpoint serves."""

import os

HELP = "list the models an endpoint serves"


def add_arguments(parser) -> None:
    from attune.ui.endpoint import API_KEY_ENV, default_endpoint

    parser.add_argument("--endpoint", default=default_endpoint())
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, "none"),
                        help="bearer key (default: $ATTUNE_API_KEY)")


def run(args) -> int:
    from attune.config import ConfigError
    from attune.ui.endpoint import describe_error, list_models, make_client

    try:
        models = list_models(make_client(args.endpoint, args.api_key))
    except Exception as e:  # an endpoint down or refusing the key: one line, not a traceback
        raise ConfigError(describe_error(e, args.endpoint)) from None
    for model in models:
        print(model)
    return 0
