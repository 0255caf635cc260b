"""Direct streaming: one model whose own vLLM OpenAI server is the app's HTTP ingress.

    attune serve deployments/tiny-direct.yaml          # direct_streaming: true

In the default app (attune.serve.app) every streamed token travels engine -> LLMServer replica
-> attune's ingress replica -> HAProxy (Serve's Python proxy, on a cluster started without
HAProxy) -> client, each replica a Python process on the same cores as the engine. Ray Serve
2.60 can instead have HAProxy send each request straight to an LLMServer replica serving vLLM's
FastAPI app (Ray's direct streaming): one Python hop fewer. attune puts the same API-key check,
body check and Retry-After in front of that app. Ray's limits hold: one model, no LoRA, and the
cluster started with RAY_SERVE_ENABLE_HA_PROXY=1 (its controller and proxies read it once, at
start).
"""

from __future__ import annotations

from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig

from attune.cluster import HA_PROXY_ENV
from attune.ray_internals import build_direct_streaming_llm_deployment, serve_constants
from attune.serve.auth import api_key_options
from attune.serve.config import ServeConfig
from attune.serve.ingress import add_checks
from attune.serve.llm_config import llm_configs
from attune.serve.server import LLMServer


def direct_app(config: ServeConfig) -> Application:
    """The app for a config with direct_streaming: true (one model, no LoRA)."""
    if not serve_constants.RAY_SERVE_ENABLE_HA_PROXY:
        raise RuntimeError(
            f"direct_streaming needs {HA_PROXY_ENV}=1 where the app is built and in the Ray "
            f"cluster's environment from its start (`{HA_PROXY_ENV}=1 ray start --head`, or the "
            "RayService containers' env); `attune serve` sets it for its embedded Ray.")
    (llm_config,) = llm_configs(config)  # the config's validation allows exactly one
    # No LLMRouter in front (Ray attaches one, which HAProxy calls per request to pick a replica
    # round robin): HAProxy balances the replicas itself, by least connections.
    return build_direct_streaming_llm_deployment(
        llm_config, deployment_cls=DirectLLMServer,
        override_serve_options={"request_router_config": RequestRouterConfig()},
        bind_kwargs={"auth": api_key_options(config)})


class DirectLLMServer(LLMServer):
    """attune's LLMServer as the HTTP ingress: vLLM's app with attune's checks in front."""

    async def __init__(self, llm_config: LLMConfig, *, auth: dict, **kwargs):
        self._auth = auth
        await super().__init__(llm_config, **kwargs)

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        add_checks(app, self._auth)  # in front of vLLM's routes, as in the default app
        return app

