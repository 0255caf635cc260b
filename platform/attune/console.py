"""What a person sees: attune's own lines, warnings and errors; the rest goes to log files.

    ATTUNE_VERBOSE=1 attune train recipes/tiny-full.yaml      # or attune --verbose ...: all of it

Ray forwards everything its workers print to the driver's console: vLLM's and Serve's INFO logs,
HAProxy's reloads, Ray Train's and Ray Data's progress. Quiet (the default), the console shows of
that only the lines attune writes and warnings and errors (with a traceback's frames), less the
warnings every vLLM CPU engine gives (NOISE) and warnings already shown; all of it stays in Ray's
log files, whose folder attune prints when it starts Ray.
"""

from __future__ import annotations

import json
import logging
import os
import re

from attune.ray_internals import ray_data_logging, ray_worker

VERBOSE_ENV = "ATTUNE_VERBOSE"
# What a worker's line must hold to reach a quiet console.
SHOWN = ("[attune]", "WARNING", "ERROR", "CRITICAL", "Traceback", "Error")
ERRORS = ("ERROR", "CRITICAL", "Traceback", "Error")
# Warnings every vLLM CPU engine gives at start, none of which a person can act on: no Triton
# on CPU (and what vLLM does without it), tcmalloc and iomp hints, a dtype cast per weight.
NOISE = ("Attempted to load weight ", "Triton is installed, but doesn't include CPU backend",
         "Triton is not installed. triton-cpu is expected", "Model Runner V2 requires Triton",
         "Reset SSM cache type to float32", "is not found in LD_PRELOAD",
         "Inductor compilation was disabled by user settings",
         # and those of GRPO's in-process rollout engines: the seed, eager mode, thread binding,
         # the rotary cache's buffers a weight reload skips
         "The global random seed is set to", "Enforce eager set, disabling torch.compile",
         "doesn't allow to use `torch.set_num_threads`", "RotaryEmbedding: Failed to load weights")
# Loggers of this process that speak at INFO on every request or step (openai's client logs
# through httpx2).
CHATTY = ("ray", "ray.serve", "httpx", "httpx2", "vllm", "gradio", "uvicorn.access", "mlflow")
# Loggers of this process whose warnings are NOISE too (vLLM's import on the driver).
NOISY = ("vllm.triton_utils.importing",)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_log_level() -> int:
    """For `ray.init`, which sets its driver's loggers to this."""
    return logging.INFO if verbose() else logging.WARNING


def quiet() -> None:
    """Unless verbose: workers' lines filtered as above (before `ray.init`, which subscribes the
    console to them), this process's chatty loggers at WARNING. Importing Ray Serve and Ray
    LLM sets Serve's logger and the root logger to INFO again: call this after them too."""
    if verbose():
        return
    for name in ("", *CHATTY):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
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


def _shown_line(line: str) -> bool:
    """Whether a worker's line (not attune's) reaches a quiet console, repeats aside."""
    record = _json_record(line)
    if record is not None:  # Ray LLM's replicas log JSON: its level, not its words, decides
        level = logging.getLevelName(str(record.get("levelname", "")))
        line = str(record.get("message", ""))
        return isinstance(level, int) and level >= logging.WARNING and not _noise(line)
    return any(s in line for s in SHOWN) and not _noise(line)


def _noise(line: str) -> bool:
    return any(s in line for s in NOISE) and not any(s in line for s in ERRORS)


def _json_record(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _repeat(line: str, seen: set[str]) -> bool:
    """A warning seen before, numbers and times aside (Serve's controller says a replica is slow
    to start every 30 s); errors always show."""
    if any(s in line for s in ERRORS):
        return False
    key = re.sub(r"\d+", "#", line)
    if key in seen:
        return True
    seen.add(key)
    return False


def _others_shown(lines: list[str], seen: set[str]) -> list[str]:
    """A batch's lines that are not attune's and reach a quiet console; a traceback's indented
    frames show with it."""
    shown, in_traceback = [], False
    for line in lines:
        if "[attune]" in line:
            continue
        frame = in_traceback and line[:1].isspace()
        show = frame or (_shown_line(line) and not _repeat(line, seen))
        in_traceback = show and (in_traceback or "Traceback" in line)
        if show:
            shown.append(line)
    return shown


def _shown_only(print_to_stdstream):
    seen: set[str] = set()

    def shown(data, ignore_prefix: bool):
        lines = data.get("lines", [])
        ours = [line for line in lines if "[attune]" in line]
        others = _others_shown(lines, seen)
        if ours:  # as the driver's own lines, without Ray's "(worker pid=...)" prefix
            print_to_stdstream({**data, "lines": ours}, True)
        if others:
            print_to_stdstream({**data, "lines": others}, ignore_prefix)

    shown.attune_quiet = True
    return shown
