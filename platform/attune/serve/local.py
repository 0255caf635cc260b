"""`attune serve`: run the serving app on an embedded Ray (or RAY_ADDRESS) and say where it is.

    endpoint = run(config_from_file("deployments/tiny.yaml"), port=8000)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# ray_internals' names are read when used: imported by name up here, Serve would load and read
# its settings from the environment before _enable_ha_proxy sets them.
from attune import console, ray_internals
from attune.capacity import check_fits
from attune.cluster import HA_PROXY_ENV, ensure_ray
from attune.config import ConfigError
from attune.serve.config import ServeConfig
from attune.serve.entries import base_for, read_entry


@dataclass
class Endpoint:
    base_url: str  # ends in /v1
    model_ids: list[str]


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "attune",
        route_prefix: str = "/") -> Endpoint:
    """Deploy the app as application `name` under `route_prefix` and wait until it is healthy;
    deployed again under the same name, Serve rolls it over to the new config."""
    if config.direct_streaming:
        _enable_ha_proxy()
    # Ray Serve reads HA_PROXY_ENV when it loads: only now, after _enable_ha_proxy.
    from ray import serve

    from attune.serve.app import build_app

    ensure_ray()
    console.quiet()  # again: importing Serve and Ray LLM just set their loggers to INFO
    _check_replicas_fit(config)
    serve.start(http_options={"host": host, "port": port})
    _check_serve_listens_on(host, port)
    serve.run(build_app(config), name=name, route_prefix=route_prefix)
    ids = [m.id for m in config.base_models]
    for location in config.entries:
        entry = read_entry(location)
        ids.append(f"{base_for(entry, config).id}:{entry.name}" if entry.is_lora else entry.name)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Endpoint(f"http://{shown}:{port}{route_prefix.rstrip('/')}/v1", ids)


def _check_serve_listens_on(host: str, port: int) -> None:
    """Serve keeps the proxy of its first start: a cluster that already serves elsewhere ignores
    the host and port asked for (only a warning in Ray's log), so say so before deploying."""
    running = ray_internals.get_global_client().http_config
    if (running.host, running.port) != (host, port):
        raise ConfigError(
            f"Ray Serve already listens on {running.host}:{running.port} in this cluster and its "
            f"proxy cannot move to {host}:{port}: serve there (--host {running.host} --port "
            f"{running.port}), or stop Serve first (`serve shutdown`)")


def _enable_ha_proxy() -> None:
    """Direct streaming needs Serve's HAProxy ingress, which Serve reads from the environment
    once, when its modules load and when the cluster's controller and proxies start: set it
    before either, for this process and the embedded Ray it starts."""
    os.environ[HA_PROXY_ENV] = "1"
    constants = ray_internals.loaded_serve_constants()
    if constants is not None and not constants.RAY_SERVE_ENABLE_HA_PROXY:
        raise ConfigError(f"direct_streaming: Ray Serve was loaded in this process before "
                          f"{HA_PROXY_ENV}=1 was set; set it before starting Python")


def _check_replicas_fit(config: ServeConfig) -> None:
    """Each model's engines: one GPU each on gpu, a CPU each on cpu (the replicas' own actors
    and the ingress ask for little more)."""
    full = [location for location in config.entries if not read_entry(location).is_lora]
    models = len(config.base_models) + len(full)  # adapters ride on their base model
    engine = {"GPU": 1} if config.accelerator == "gpu" else {"CPU": 1}
    check_fits([engine] * models * max(config.autoscaling.min_replicas, 1),
               f"{models} model(s) x {config.autoscaling.min_replicas} replica(s)",
               "accelerator" if config.accelerator == "gpu" else "autoscaling.min_replicas")
