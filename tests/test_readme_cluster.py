"""The README's "Run on your own cluster" commands, run as written on a fresh machine: an empty
HOME (no Ray token, nothing cached) and a network and /tmp of their own (no other cluster)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from leftovers import MARKER, left_behind

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def first_bash_block(markdown: str, heading: str) -> str:
    section = markdown.split(heading, 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_cluster_commands_run_as_written_from_scratch():
    commands = first_bash_block((REPO / "README.md").read_text(), "## Run on your own cluster")
    assert "ray start --head" in commands and "ray job submit" in commands
    script = "set -e\n" + commands.replace("HEAD:", "127.0.0.1:")
    marker = uuid.uuid4().hex
    # A machine of its own: loopback and /tmp private to the commands, HOME an empty directory;
    # a checkout under /tmp is mounted back where it was (a new user may well clone there).
    fresh_machine = ("ip link set lo up && mount -t tmpfs none /tmp && export HOME=$(mktemp -d) "
                     "&& exec bash -c \"$0\"")
    kept = Path(tempfile.mkdtemp(dir="/var/tmp"))
    if REPO.is_relative_to("/tmp"):
        fresh_machine = (f"mount --bind /tmp {kept} && ip link set lo up && mount -t tmpfs none /tmp "
                         f"&& mkdir -p {REPO} && mount --bind {kept / REPO.relative_to('/tmp')} {REPO} "
                         "&& export HOME=$(mktemp -d) && exec bash -c \"$0\"")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/bin", "LANG": "C.UTF-8",
           MARKER: marker}
    try:
        done = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private",
                               "bash", "-c", fresh_machine, script],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        left = left_behind(marker, grace_s=0)  # the head outlives the commands, as on a cluster
        kept.rmdir()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "[attune] registry entry:" in output and "succeeded" in output, output[-4000:]
    assert any("raylet" in command for command in left.values())  # it was the head that ran it
