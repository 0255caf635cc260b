"""The serving application: Ray's OpenAI ingress and vLLM deployments, configured by attune.

    serve run deployments/tiny.yaml          # import_path: attune.serve:build_app

Everything that serves is `ray.serve.llm` (LLMConfig, LLMServer, OpenAiIngress). attune adds
what it knows: which registry entries become which model ids, the engine settings for CPU or
GPU, the servability checks, and API-key auth on Ray's own ingress app.
"""

from __future__ import annotations

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import make_fastapi_ingress

from attune.config import validate
from attune.ray_internals import init, to_model_metadata
from attune.serve.auth import api_key_options
from attune.serve.config import ServeConfig
from attune.serve.direct import direct_app
from attune.serve.entries import adapters_path, promote_adapters
from attune.serve.ingress import Ingress, add_checks, add_openai_error_handler, use_plain_asgi_errors
from attune.serve.llm_config import REPLICA_ENV, SCORES, entry_scores, llm_configs, logging_config
from attune.serve.server import LLMServer


def build_app(args: dict) -> Application:
    """Ray Serve builder (`import_path: attune.serve:build_app`); `args` is a ServeConfig.

    It runs once per deploy (`attune serve`, `serve run`, `serve deploy`'s build task). Once the
    app is built, every entry checked, the config's LoRA entries are copied where the app loads
    them: the one thing deploying writes (the builders below write nothing)."""
    config = args if isinstance(args, ServeConfig) else validate(ServeConfig, dict(args), "serve args")
    app = direct_app(config) if config.direct_streaming else openai_app(llm_configs(config), config)
    promote_adapters(config)
    return app


def openai_app(configs: list[LLMConfig], config: ServeConfig) -> Application:
    """`ray.serve.llm.build_openai_app`, with API-key middleware and OpenAI-shaped errors on the
    ingress's FastAPI app, Ray's exception middleware as plain ASGI, and attune's stricter
    ingress class.

    Ray's builder creates its FastAPI app internally; these lines are its own steps with the
    app handed in, so the middleware wraps every route (Ray 2.60's internals, pinned).
    """
    scores = entry_scores(config)
    app = init()
    use_plain_asgi_errors(app)
    add_checks(app, api_key_options(config))
    add_openai_error_handler(app)
    ingress = make_fastapi_ingress(Ingress, app=app)
    options = Ingress.get_deployment_options(configs)
    # The ingress (a thin async router) admits several times what the models hold, so overload
    # is refused by a model's own queue: an OpenAI-shaped 503 that passes the middleware above
    # and gets Retry-After. Only a far larger burst meets the ingress's own limit.
    capacity = (config.max_ongoing_requests + config.max_queued_requests) * max(len(configs), 1)
    options["max_ongoing_requests"] = 4 * capacity
    options["max_queued_requests"] = 4 * capacity
    actor = options.setdefault("ray_actor_options", {})
    actor["runtime_env"] = {"env_vars": dict(REPLICA_ENV)}
    if config.accelerator == "cpu":
        actor["num_cpus"] = 0  # it mostly waits on engines
    options["logging_config"] = logging_config(config)
    return serve.deployment(ingress, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c, deployment_cls=LLMServer)
                         for c in configs},
        model_cards={c.model_id: to_model_metadata(
            c.model_id, c, overrides={SCORES: scores[c.model_id]} if c.model_id in scores else None)
            for c in configs},
        lora_paths={spec.id: adapters_path(config, spec)
                    for spec in config.base_models if config.lora_store},
    )
