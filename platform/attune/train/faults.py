"""Fault injection for the recovery tests: a worker that dies at a given step, once."""

from __future__ import annotations

import os
from pathlib import Path

from attune.train import parallel


def maybe_inject_fault(step: int) -> None:
    """Fault injection for recovery tests: ATTUNE_FAULT_AT_STEP=N kills the last rank at step N,
    once (ATTUNE_FAULT_MARKER names a file that records that it happened)."""
    at, marker = os.environ.get("ATTUNE_FAULT_AT_STEP"), os.environ.get("ATTUNE_FAULT_MARKER")
    if at and marker and step == int(at) and parallel.rank() == parallel.world_size() - 1:
        if not os.path.exists(marker):
            Path(marker).write_text(f"failed at step {step}\n")
            os._exit(1)
