"""attune's vLLM plugin (entry point `vllm.general_plugins`): CPU engines tuned for few cores.

vLLM loads every installed general plugin in each of its processes, so this one acts only where
the engine's environment asks for it; without those variables `vllm serve` stays plain vLLM.

ATTUNE_VLLM_CPU_EXECUTOR (`engine.cpu_executor`): vLLM's CPU platform always runs the model in a
worker process ('mp') bound to all cores but one. On 2 CPUs that worker computes on one core, as
the engine process would, and adds two shared-memory hand-offs per step; 'auto' keeps 'uni' there.

ATTUNE_VLLM_POLL_SLEEP_US (`engine.poll_sleep_us`): with a worker process, both sides wait on that
queue by spinning on os.sched_yield(), which on a few cores starves the engine's request and
token threads of the GIL, so tokens reach clients in bursts. A short sleep blocks for real.
"""

from __future__ import annotations

import logging
import os
import time

CPU_EXECUTOR_ENV = "ATTUNE_VLLM_CPU_EXECUTOR"
CPU_EXECUTORS = ("auto", "uni", "mp")
POLL_SLEEP_ENV = "ATTUNE_VLLM_POLL_SLEEP_US"

# vLLM's CPU worker gets the node's CPUs but one; with this many or fewer it computes on one.
AUTO_UNI_MAX_CPUS = 2

# Under vLLM's logger, so that the line lands beside the engine's own in its process's output.
logger = logging.getLogger("vllm.plugins.attune")


def register() -> None:
    """vLLM calls this in each of its processes (API server, engine core, workers)."""
    _keep_the_model_in_the_engine_process()
    _wait_without_spinning()


def _keep_the_model_in_the_engine_process() -> None:
    executor = cpu_executor(os.environ.get(CPU_EXECUTOR_ENV))
    if executor in ("", "mp"):
        return
    # vLLM's modules only where the hook acts: attune's app imports this module for its names.
    from vllm.platforms import cpu

    platform_check = cpu.CpuPlatform.check_and_update_config.__func__

    # Called where the engine's config is made (the API server, Serve's replica); a no-op on GPUs,
    # whose platform class is another. Ray Serve LLM asks for 'mp' on CPU itself, as the only
    # executor vLLM's CPU platform allows; a model on several workers keeps it.
    def check_and_update_config(cls, vllm_config) -> None:
        platform_check(cls, vllm_config)
        parallel = vllm_config.parallel_config
        cpus = len(os.sched_getaffinity(0))
        if (parallel.distributed_executor_backend == "mp" and parallel.world_size == 1
                and parallel.data_parallel_size == 1
                and (executor == "uni" or cpus <= AUTO_UNI_MAX_CPUS)):
            parallel.distributed_executor_backend = "uni"
            # One compute thread, as the worker had on its one core. vLLM keeps torch at one in
            # the engine process, but its own OpenMP kernels would start a thread per CPU, which
            # then wait on each other beside the server's threads (about 0.7x the tokens/s on
            # 2 CPUs). The engine process inherits this from here, its parent.
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            logger.info("attune: the model runs in vLLM's engine process, executor 'uni', "
                        "OMP_NUM_THREADS=%s (%s=%s, %d CPUs)", os.environ["OMP_NUM_THREADS"],
                        CPU_EXECUTOR_ENV, executor, cpus)

    cpu.CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def _wait_without_spinning() -> None:
    sleep_us = poll_sleep_us(os.environ.get(POLL_SLEEP_ENV))
    if not sleep_us:
        return
    # vLLM's modules only where the hook acts, as above.
    from vllm.distributed.device_communicators import shm_broadcast

    if not callable(getattr(shm_broadcast, "sched_yield", None)):
        raise RuntimeError(f"{POLL_SLEEP_ENV} is set, but this vLLM's shared-memory queue has no "
                           "sched_yield to replace; unset it (engine.poll_sleep_us: 0)")
    seconds = sleep_us / 1e6

    def sleep_instead_of_spinning() -> None:
        time.sleep(seconds)

    # Both of the queue's busy waits (a reader waiting for a result, a writer for a free slot)
    # call this module-level name; idle waits already block on a socket and stay as they are.
    shm_broadcast.sched_yield = sleep_instead_of_spinning
    logger.info("attune: vLLM's shared-memory queue waits sleep %g us instead of spinning "
                "(%s)", sleep_us, POLL_SLEEP_ENV)


def cpu_executor(value: str | None) -> str:
    """The variable's executor; unset or empty is '' (vLLM's own choice)."""
    if value and value not in CPU_EXECUTORS:
        raise ValueError(f"{CPU_EXECUTOR_ENV}={value!r}: expected one of {', '.join(CPU_EXECUTORS)}")
    return value or ""


def poll_sleep_us(value: str | None) -> float:
    """The variable's microseconds; unset or empty is 0 (vLLM's spin)."""
    if not value:
        return 0.0
    try:
        sleep_us = float(value)
    except ValueError:
        sleep_us = -1.0
    if not sleep_us >= 0:  # also refuses nan
        raise ValueError(f"{POLL_SLEEP_ENV}={value!r}: expected microseconds, a number >= 0")
    return sleep_us
