"""Serving: Ray Serve + vLLM behind an OpenAI-compatible endpoint, fed by the registry.

`attune.serve:build_app` is the import path that Serve configs, `serve run` and a RayService use.
It is loaded on first use: Ray Serve reads some settings from the environment when it loads
(RAY_SERVE_ENABLE_HA_PROXY, for direct streaming), so reading a serving config must not load it.
"""

from attune.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app"]


def __getattr__(name: str):
    if name == "build_app":
        # Loaded on first use: Ray Serve reads settings from the environment when it loads.
        from attune.serve.app import build_app

        return build_app
    raise AttributeError(f"module 'attune.serve' has no attribute {name!r}")
