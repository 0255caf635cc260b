"""A command run as a user runs it: its own process group, its output read line by line, its
processes marked (tests/leftovers.py) so that the test can tell whether any outlived it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from leftovers import MARKER, left_behind

REPO = Path(__file__).resolve().parents[1]
ATTUNE = [sys.executable, "-m", "attune"]
# What a Ctrl-C may take to end a command, its cluster, engines and servers included: the
# graceful shutdown it replaced took 14-20 s on an idle machine, and a loaded one must pass.
STOP_WITHIN_S = 12


class Command:
    """A command started as a user starts it, in a process group of its own, its output read
    line by line; its processes carry a marker of their own."""

    def __init__(self, args: list[str], tmp_path: Path, **env: str):
        self.marker = uuid.uuid4().hex
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, MARKER: self.marker, "ATTUNE_HOME": str(tmp_path / "home"), **env},
            start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "ended early:\n" + "".join(self.output[-40:])
                continue
            self.output.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout} s:\n" + "".join(self.output[-40:]))

    def ctrl_c(self) -> float:
        """SIGINT to the command (a terminal's Ctrl-C reaches its process); seconds to its end."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"still running {STOP_WITHIN_S} s after Ctrl-C:\n"
                                 + "".join(self.output[-40:])) from None
        taken = time.monotonic() - start
        print(f"ended {taken:.1f} s after Ctrl-C: {' '.join(self.proc.args)[:120]}")
        return taken

    def all_output(self) -> str:
        """Everything it printed so far (all of it once it has ended)."""
        if self.proc.poll() is not None:
            self.reader.join(timeout=10)  # until the pipe's end: its last lines
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)

    def left_running(self) -> dict[int, str]:
        return left_behind(self.marker, grace_s=15)
