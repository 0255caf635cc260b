"""`attune serve`: run the serving app on an embedded Ray (or RAY_ADDRESS) from a recipe or a
Serve config file, and say where it is.

    attune serve recipes/tiny-full.yaml          # the recipe's entry and its base model
    attune serve deployments/tiny.yaml           # a Serve config (its first application's args)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from attune.config import RecipeError, load_recipe, validate
from attune.serve.config import HA_PROXY_ENV, BaseModelSpec, ServeConfig


@dataclass
class Endpoint:
    base_url: str  # ends in /v1
    model_ids: list[str]


def config_from_file(path: str, overrides: list[str] = ()) -> ServeConfig:
    """A recipe serves its base model plus its registry entry; a Serve config file is used as is."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if "applications" in raw:
        args = next(a for a in raw["applications"] if a["import_path"].startswith("attune.serve"))["args"]
        return validate(ServeConfig, args, f"{path}: args")
    if "base_models" in raw:
        return validate(ServeConfig, raw, path)
    if "name" in raw and "optim" in raw:
        return config_from_recipe(path, overrides)
    raise RecipeError(f"{path}: neither a recipe nor a serving config")


def config_from_recipe(path: str, overrides: list[str] = ()) -> ServeConfig:
    from attune import registry

    recipe = load_recipe(path, overrides)
    entry = registry.entry_location(recipe)
    is_lora = recipe.method.type == "lora"
    return ServeConfig(
        base_models=[BaseModelSpec(id=_base_id(recipe.model.name_or_path),
                                   name_or_path=recipe.model.name_or_path)],
        entries=[entry],
        lora_store=(f"{registry.entry_location(recipe).rsplit('/', 1)[0]}/.adapters"
                    if is_lora and "://" in entry else None),
    )


def _enable_ha_proxy() -> None:
    """Direct streaming needs Serve's HAProxy ingress, which Serve reads from the environment
    once, when its modules load and when the cluster's controller and proxies start: set it
    before either, for this process and the embedded Ray it starts."""
    import os
    import sys

    os.environ[HA_PROXY_ENV] = "1"
    if "ray.serve._private.constants" in sys.modules:
        from ray.serve._private import constants

        if not constants.RAY_SERVE_ENABLE_HA_PROXY:
            raise RecipeError(f"direct_streaming: Ray Serve was loaded in this process before "
                              f"{HA_PROXY_ENV}=1 was set; set it before starting Python")


def _base_id(name_or_path: str) -> str:
    return name_or_path.removeprefix("attune:").rstrip("/").rsplit("/", 1)[-1]


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "attune") -> Endpoint:
    """Deploy the app and wait until it is healthy."""
    if config.direct_streaming:
        _enable_ha_proxy()
    from ray import serve

    from attune.serve.app import build_app
    from attune.trainer import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=name, route_prefix="/")
    ids = [m.id for m in config.base_models]
    from attune.serve.entries import base_for, read_entry

    for location in config.entries:
        entry = read_entry(location)
        ids.append(f"{base_for(entry, config).id}:{entry.name}" if entry.is_lora else entry.name)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Endpoint(f"http://{shown}:{port}/v1", ids)
