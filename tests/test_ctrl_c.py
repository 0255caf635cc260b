"""Ctrl-C stops attune's commands within seconds and leaves no process behind (a real SIGINT to a
real command: its Ray cluster, Train workers, vLLM engines and web servers must all go)."""

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

import pytest
from leftovers import MARKER, left_behind

from attune.cluster import free_port
from conftest import API_KEY, REPO

ATTUNE = [sys.executable, "-m", "attune"]
STOP_WITHIN_S = 30


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
        threading.Thread(target=self._read, daemon=True).start()

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
        return time.monotonic() - start

    def left_running(self) -> dict[int, str]:
        return left_behind(self.marker, grace_s=15)


pytestmark = pytest.mark.slow


def test_ctrl_c_after_training_stops_the_process(tmp_path):
    """Serving or the chat page after training in one process (as `make demo`): Ray Train's
    handler, left installed by fit(), swallowed every later Ctrl-C."""
    script = ("import time\n"
              "from attune.recipe import load_recipe\n"
              "from attune.trainer import fine_tune\n"
              "fine_tune(load_recipe('recipes/tiny-full.yaml', ['optim.max_steps=4', "
              "'optim.warmup_steps=1', 'scaling.num_workers=1', 'eval.every_steps=4']))\n"
              "print('trained, now waiting', flush=True)\n"
              "time.sleep(600)\n")
    command = Command([sys.executable, "-c", script], tmp_path)
    command.wait_for("trained, now waiting", timeout=240)
    command.ctrl_c()
    assert command.left_running() == {}


def test_ctrl_c_stops_attune_train_while_it_trains(tmp_path):
    command = Command([*ATTUNE, "train", "recipes/tiny-full.yaml", "optim.max_steps=5000",
                       "eval.log_every_steps=1"], tmp_path)
    command.wait_for("[attune] step ", timeout=240)
    command.ctrl_c()
    assert command.left_running() == {}


def test_ctrl_c_stops_attune_chat(tmp_path):
    command = Command([*ATTUNE, "chat", "--endpoint", "http://127.0.0.1:9/v1", "--port",
                       str(free_port())], tmp_path)
    command.wait_for("chat page for", timeout=120)
    time.sleep(2)  # the page's server is up by now
    command.ctrl_c()
    assert command.left_running() == {}


def test_ctrl_c_stops_attune_serve(tmp_path, tiny_full_entry):
    command = Command([*ATTUNE, "serve", "recipes/tiny-full.yaml", "--port", str(free_port()),
                       f"output.registry={Path(tiny_full_entry).parent}"], tmp_path,
                      ATTUNE_API_KEYS=API_KEY, ATTUNE_HOME=os.environ["ATTUNE_HOME"])
    command.wait_for("[attune] serving at", timeout=300)
    command.ctrl_c()
    assert command.left_running() == {}
