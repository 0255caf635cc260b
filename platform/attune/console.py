"""What a person sees: attune's own lines, warnings and errors; the rest goes to log files.

    ATTUNE_VERBOSE=1 attune train recipes/tiny-full.yaml      # or attune --verbose ...: all of it

Ray forwards everything its workers print to the driver's console: vLLM's and Serve's INFO logs,
HAProxy's reloads, Ray Train's and Ray Data's progress. Quiet (the default), the console shows of
that only the lines attune writes and warnings and errors; all of it stays in Ray's log files,
whose folder attune prints when it starts Ray.
"""

from __future__ import annotations

import logging
import os

from ray._private import worker as ray_worker
from ray.data._internal import logging as ray_data_logging

VERBOSE_ENV = "ATTUNE_VERBOSE"
# What a worker's line must hold to reach a quiet console.
SHOWN = ("[attune]", "WARNING", "ERROR", "CRITICAL", "Traceback", "Error")
# Loggers of this process that speak at INFO on every request or step.
CHATTY = ("ray", "ray.serve", "httpx", "vllm", "gradio", "uvicorn.access", "mlflow")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_log_level() -> int:
    """For `ray.init`, which sets its driver's loggers to this."""
    return logging.INFO if verbose() else logging.WARNING


def quiet() -> None:
    """Unless verbose: workers' lines filtered as above (before `ray.init`, which subscribes the
    console to them), this process's chatty loggers at WARNING."""
    if verbose():
        return
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data logs to a file of its own and to the console; only the console's level goes up,
    # in the config Ray Data applies again whenever it sets up its logging.
    ray_data_logging.DEFAULT_CONFIG["handlers"]["console"]["level"] = "WARNING"
    ray_data_logging.configure_logging()
    if not getattr(ray_worker.print_to_stdstream, "attune_quiet", False):
        ray_worker.print_to_stdstream = _shown_only(ray_worker.print_to_stdstream)


def say_where_logs_are() -> None:
    node = getattr(ray_worker, "_global_node", None)
    if node is not None and not verbose():
        print(f"[attune] Ray's and its workers' logs: {node.get_logs_dir_path()} "
              f"(--verbose or {VERBOSE_ENV}=1 shows them here)", flush=True)


def _shown_only(print_to_stdstream):
    def shown(data, ignore_prefix: bool):
        lines = data.get("lines", [])
        ours = [line for line in lines if "[attune]" in line]
        others = [line for line in lines if "[attune]" not in line and any(s in line for s in SHOWN)]
        if ours:  # as the driver's own lines, without Ray's "(worker pid=...)" prefix
            print_to_stdstream({**data, "lines": ours}, True)
        if others:
            print_to_stdstream({**data, "lines": others}, ignore_prefix)

    shown.attune_quiet = True
    return shown
