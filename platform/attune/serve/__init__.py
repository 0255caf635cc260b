"""Serving: Ray Serve + vLLM behind an OpenAI-compatible endpoint, fed by the registry.

`attune.serve:build_app` is the import path that Serve configs, `serve run` and a RayService use.
"""

from attune.serve.app import build_app
from attune.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app"]
