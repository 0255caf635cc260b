"""What a test session leaves running: every process that inherited the session's marker.

A process started by the session (Ray's daemons and workers, vLLM engines, HAProxy, `ray start`
heads, browsers) inherits its environment, marker included, even once its parent is gone; so
the marker finds exactly this session's processes, not another run's on the same machine.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

MARKER = "ATTUNE_TEST_SESSION"


def mark_session() -> str:
    """Mark this process's environment; every process started from now on inherits it."""
    os.environ[MARKER] = uuid.uuid4().hex
    return os.environ[MARKER]


def marked_processes(marker: str) -> dict[int, str]:
    """Running processes (not zombies) whose environment carries `marker`: pid -> command line."""
    found = {}
    needle = f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        found[int(entry.name)] = command.strip()[:160]
    return found


def orphaned_ray_processes(cwd: Path) -> dict[int, str]:
    """Ray's processes whose raylet is gone, working in `cwd`, that carry no session's marker:
    Ray's agents retitle themselves (setproctitle) over the start of their environment, marker
    included, and outlive a raylet that was killed. pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.readlink(entry / "cwd") != str(cwd):
                continue
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            # a zombie is gone already; a raylet's agents and workers are its to end
            if state == "Z" or Path(f"/proc/{parent}/comm").read_text().strip() == "raylet":
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            marked = f"{MARKER}=".encode() in (entry / "environ").read_bytes()
            if command.startswith("ray::") and not marked:
                found[int(entry.name)] = command.strip()[:160]
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def left_behind(marker: str, grace_s: float = 30, cwd: Path | None = None) -> dict[int, str]:
    """The marked processes still running after `grace_s` seconds (and, with `cwd`, Ray's
    orphans working there); they are killed, then named."""
    def still_running() -> dict[int, str]:
        return {**marked_processes(marker), **(orphaned_ray_processes(cwd) if cwd else {})}

    deadline = time.monotonic() + grace_s
    while (left := still_running()) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
