"""The end-of-session check for processes left running (tests/leftovers.py, conftest.py)."""

import os
import subprocess
import sys
import time

from leftovers import MARKER, left_behind, marked_processes, orphaned_ray_processes


def orphan(marker: str | None) -> int:
    """A `sleep` whose parent is gone (as a leaked Ray worker's is); returns its pid."""
    env = {**os.environ, MARKER: marker} if marker else {
        k: v for k, v in os.environ.items() if k != MARKER}
    out = subprocess.run(
        [sys.executable, "-c", "import subprocess, sys; "
         "print(subprocess.Popen(['sleep', '600'], start_new_session=True,"
         " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
        env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_a_process_left_with_the_marker_is_named_and_killed():
    left = orphan("planted-0123")
    unrelated = orphan(None)
    try:
        assert left_behind("planted-0123", grace_s=1) == {left: "sleep 600"}
        time.sleep(0.5)
        assert marked_processes("planted-0123") == {}
        os.kill(unrelated, 0)  # another run's process is not this session's to kill
    finally:
        os.kill(unrelated, 9)


def test_the_sessions_own_processes_carry_its_marker():
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert child.pid in marked_processes(os.environ[MARKER])
    finally:
        child.kill()
        child.wait()


def test_a_ray_agent_that_lost_its_marker_and_its_raylet_is_found_by_where_it_works(tmp_path):
    """As Ray's agents are once their raylet is killed: retitled over their environment, their
    parent gone; they still work in the directory the session ran in."""
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    out = subprocess.run(
        [sys.executable, "-c", "import subprocess; print(subprocess.Popen(['bash', '-c', "
         "'exec -a ray::PlantedAgent sleep 600'], start_new_session=True,"
         " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    agent = int(out.stdout)
    try:
        deadline = time.monotonic() + 10
        while not orphaned_ray_processes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)  # until bash has exec'd under its new name
        assert orphaned_ray_processes(tmp_path) == {agent: "ray::PlantedAgent 600"}
        assert left_behind("planted-none", grace_s=0, cwd=tmp_path) == {agent: "ray::PlantedAgent 600"}
        # killed: gone once the kernel has delivered the SIGKILL (a moment later on a busy machine)
        deadline = time.monotonic() + 30
        while orphaned_ray_processes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert orphaned_ray_processes(tmp_path) == {}
    finally:
        subprocess.run(["kill", "-9", str(agent)], capture_output=True)
