"""`make image` / `make test-image` on a machine without podman or debootstrap: one line saying
what to install, before anything is built.

    pytest tests/test_make_image_tools.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make(target: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("make"), "-s", target], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PATH": str(path)}, timeout=60)


@pytest.mark.parametrize("missing", ["podman", "debootstrap"])
def test_image_targets_say_what_to_install(tmp_path, missing):
    for tool in {"podman", "debootstrap"} - {missing}:  # the other tool is there
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    for target in ("image", "test-image"):
        result = make(target, tmp_path)
        assert result.returncode != 0
        assert result.stdout.splitlines() == [
            f"make: {missing} not found; install the image tools: "
            "apt-get install podman debootstrap (docs/image.md)"], result.stdout


def test_the_check_passes_where_the_tools_are(tmp_path):
    for tool in ("podman", "debootstrap"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    assert make("image-tools", tmp_path).returncode == 0
