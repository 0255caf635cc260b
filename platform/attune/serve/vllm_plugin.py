"""attune's vLLM plugin (entry point `vllm.general_plugins`): engines that wait without spinning.

vLLM's engine process waits for its model worker on a shared-memory queue by spinning: check,
os.sched_yield(), check again, for a second after every result. The call releases Python's GIL
only for its own instant, so on a machine with a few cores the engine's other Python threads,
the ones that take requests in and send tokens out, rarely win the GIL while a request runs:
tokens reached clients in bursts, often all of a request's at its end, `vllm serve` alike. The
worker waits for the next step the same way and keeps its core busy, while the engine and the
HTTP server need that core too. It shows most when the server runs in a session of its own
(Linux shares the CPU between sessions first). Sleeping a few microseconds instead blocks for
real: the GIL and the core go to whoever waits (README: Serving, and its benchmark).

vLLM loads every installed general plugin in each of its processes, so this one acts only where
the serving app asked for it: ATTUNE_VLLM_POLL_SLEEP_US in the engine's environment
(`engine.poll_sleep_us`). Without it, `vllm serve` in the same environment stays plain vLLM.
"""

from __future__ import annotations

import logging
import os
import time

POLL_SLEEP_ENV = "ATTUNE_VLLM_POLL_SLEEP_US"

# Under vLLM's logger, so that the line lands beside the engine's own in its process's output.
logger = logging.getLogger("vllm.plugins.attune")


def register() -> None:
    """vLLM calls this in each of its processes (API server, engine core, workers)."""
    sleep_us = poll_sleep_us(os.environ.get(POLL_SLEEP_ENV))
    if not sleep_us:
        return
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
