"""What is not there fails in seconds, in one line that names it, and creates nothing: a Ray
cluster, an endpoint or a tracking server that does not answer, a path that is not a registry
entry, a feedback database that does not exist. Each command runs as a user runs it; its
timeout, generous next to the seconds it needs, stands for the minutes of retries it replaces."""

from __future__ import annotations

import os
import subprocess

import pytest
from running import ATTUNE, REPO

from attune.cluster import check_cluster_answers, free_port
from attune.config import ConfigError

# Far more than the few seconds each takes (a loaded machine's imports included), far less than
# the retries each used to wait through.
ENDS_WITHIN_S = 120


def fails_in_one_line(*argv: str, **env: str) -> str:
    """The command's one line on stderr; it must end with exit 2 and no traceback."""
    done = subprocess.run([*ATTUNE, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=ENDS_WITHIN_S, env={**os.environ, **env})
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attune: "), done.stderr[-3000:]
    return lines[0]


def test_a_ray_address_where_no_cluster_runs(tiny_base, tmp_path):
    port = free_port()
    line = fails_in_one_line("train", "recipes/tiny-full.yaml",
                             f"output.registry={tmp_path}/registry", f"output.runs={tmp_path}/runs",
                             f"tracking.uri=sqlite:///{tmp_path}/m.db",
                             RAY_ADDRESS=f"127.0.0.1:{port}")
    assert line.startswith(f"attune: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers at "
                           f"127.0.0.1:{port} (Connection refused); start one"), line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("address, said", [
    ("ray://127.0.0.1:{port}", "no Ray Client server answers at 127.0.0.1:{port} "),
    ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:{port} "),
    ("http://127.0.0.1:{port}", "a dashboard's address, as `attune submit --address` takes; "),
])
def test_each_form_of_ray_address_is_checked(address, said):
    port = free_port()
    address, said = address.format(port=port), said.format(port=port)
    with pytest.raises(ConfigError) as refused:
        check_cluster_answers(address)
    assert str(refused.value).startswith(f"RAY_ADDRESS={address}: {said}"), refused.value
