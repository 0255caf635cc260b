"""Ctrl-C stops attune's commands within seconds (running.STOP_WITHIN_S) and leaves no process
behind (a real SIGINT to a real command: its Ray cluster, Train workers, vLLM engines and web
servers must all go).

`attune serve` is stopped so at the end of tests/test_serve_local_lora.py (the tiny LoRA recipe,
the case first reported) rather than started again here; the demo below serves a full entry.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
from running import ATTUNE, Command

from attune.cluster import free_port

pytestmark = pytest.mark.slow
# What a quiet demo leaves in the log files: Serve's deployment options, vLLM's per-weight and
# CPU notices, JSON logs.
DEMO_NOISE = ("Deployment Options", "Attempted to load weight", "Triton", "LD_PRELOAD",
              '{"asctime"')


def test_ctrl_c_after_training_stops_the_process(tmp_path):
    """Serving or the chat page after training in one process (as `make demo`): Ray Train's
    handler, left installed by fit(), swallowed every later Ctrl-C."""
    script = ("import time\n"
              "from attune.recipe import load_recipe\n"
              "from attune.train.trainer import fine_tune\n"
              "fine_tune(load_recipe('recipes/tiny-full.yaml', ['optim.max_steps=4', "
              "'optim.warmup_steps=1', 'scaling.num_workers=1', 'eval.every_steps=4']))\n"
              "print('trained, now waiting', flush=True)\n"
              "time.sleep(600)\n")
    command = Command([sys.executable, "-c", script], tmp_path)
    command.wait_for("trained, now waiting", timeout=240)
    command.ctrl_c()
    assert command.left_running() == {}


def test_ctrl_c_stops_attune_train_while_it_trains_and_verbose_shows_rays_logs(tmp_path):
    """--verbose here, so that one training serves both: a quiet one is test_console's."""
    command = Command([*ATTUNE, "--verbose", "train", "recipes/tiny-full.yaml",
                       "optim.max_steps=5000", "eval.log_every_steps=1"], tmp_path)
    command.wait_for("[attune] step ", timeout=300)
    assert any(re.search(r"\sINFO\s", line) for line in command.output), command.all_output()
    command.ctrl_c()
    assert command.left_running() == {}


def test_ctrl_c_stops_attune_chat(tmp_path):
    command = Command([*ATTUNE, "chat", "--endpoint", "http://127.0.0.1:9/v1", "--port",
                       str(free_port())], tmp_path)
    command.wait_for("chat page for", timeout=120)
    time.sleep(2)  # the page's server is up by now
    command.ctrl_c()
    assert command.left_running() == {}


def test_ctrl_c_stops_make_demo_at_its_chat_page(tmp_path, tiny_full_entry):
    """The demo's training resumes the session's finished run, so this is mostly its serving."""
    command = Command([sys.executable, "-m", "attune.demo", "--port", str(free_port()),
                       "--chat-port", str(free_port())], tmp_path,
                      ATTUNE_HOME=os.environ["ATTUNE_HOME"])
    command.wait_for("[demo] chat page:", timeout=600)
    console = command.output  # up to its chat page
    assert len(console) <= 60, "".join(console)
    assert [line for line in console if any(n in line for n in DEMO_NOISE)] == [], "".join(console)
    time.sleep(2)  # the page's server is up by now
    command.ctrl_c()
    assert command.left_running() == {}


def test_ctrl_c_stops_attune_tune_which_says_how_to_resume(tmp_path):
    command = Command([*ATTUNE, "tune", "tuning/tiny-full-asha.yaml", "num_samples=2",
                       "optim.max_steps=2000", "eval.log_every_steps=1"], tmp_path)
    command.wait_for("[attune] step ", timeout=300)
    command.ctrl_c()
    assert command.left_running() == {}
    assert "interrupted; run the same command again to resume" in command.all_output()
