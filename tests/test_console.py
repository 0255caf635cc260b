"""A person sees attune's own lines, warnings and errors; Ray's and vLLM's INFO logs stay in the
log files unless --verbose (attune.console)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from running import ATTUNE, REPO

from attune.console import _shown_only

# Workers' lines as a demo's console got them (Ray's "(name pid=...)" prefix off), each marked
# + where a quiet console shows it, - where only the log files keep it.
CAPTURED = Path(__file__).parent / "data" / "console_lines.txt"


def test_a_quiet_console_shows_attunes_lines_warnings_and_errors_only():
    printed = []
    shown = _shown_only(lambda data, ignore_prefix: printed.append((data["lines"], ignore_prefix)))
    shown({"pid": 1, "lines": ["INFO engine started", "[attune] step 1/2 | loss 2.0",
                               "WARNING low memory", "INFO request done"]}, False)
    shown({"pid": 1, "lines": ["INFO nothing to see"]}, False)
    # attune's lines without Ray's "(worker pid=...)" prefix, as the driver's own
    assert printed == [(["[attune] step 1/2 | loss 2.0"], True), (["WARNING low memory"], False)]


def test_a_quiet_console_drops_vllms_cpu_notices_and_repeats_but_shows_errors_whole():
    marked = CAPTURED.read_text().splitlines()
    printed = []
    shown = _shown_only(lambda data, ignore_prefix: printed.extend(data["lines"]))
    shown({"pid": 1, "lines": [line[2:] for line in marked]}, False)
    assert printed == [line[2:] for line in marked if line.startswith("+ ")]


def train(tmp_path) -> list[str]:
    done = subprocess.run([*ATTUNE, "train", "recipes/tiny-full.yaml", "optim.max_steps=10",
                           "optim.warmup_steps=1", "eval.every_steps=10", "scaling.num_workers=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ATTUNE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (done.stdout + done.stderr).splitlines()


@pytest.mark.slow
def test_attune_train_says_little_unless_verbose(tmp_path):
    """Quiet here; --verbose showing Ray's INFO logs is checked on the training that
    test_ctrl_c stops (one training fewer)."""
    quiet = train(tmp_path)
    assert [line for line in quiet if re.search(r"\sINFO\s", line)] == []
    assert [line for line in quiet if "pid=" in line and "[attune]" in line] == []
    assert any(line.startswith("[attune] Ray's and its workers' logs: ") for line in quiet)
    assert any("[attune] step 10/10" in line for line in quiet), quiet
