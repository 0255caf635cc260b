"""Shared fixtures: one attune home, one in-process Ray cluster, entries trained once per session.

Everything here is real: the Ray cluster, Ray Train runs, the models. Tests that need a
fine-tuned model take `tiny_full_entry` / `tiny_lora_entry` rather than training their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture(scope="session", autouse=True)
def attune_home(tmp_path_factory) -> Path:
    """A fresh ATTUNE_HOME for the session (set before Ray starts, so workers inherit it)."""
    home = tmp_path_factory.mktemp("attune-home")
    os.environ["ATTUNE_HOME"] = str(home)
    os.chdir(REPO)  # recipes name data files relative to the repo
    return home


@pytest.fixture(scope="session")
def ray_cluster(attune_home):
    """One in-process Ray for the whole session, with logical CPUs to spare (see DESIGN.md)."""
    import ray

    from attune.trainer import ensure_ray

    ensure_ray(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base(attune_home) -> str:
    from attune.modeling import ensure_tiny_llama

    return str(ensure_tiny_llama())


def train(recipe_path: str, *overrides: str) -> str:
    from attune.config import load_recipe
    from attune.trainer import fine_tune

    return fine_tune(load_recipe(REPO / recipe_path, list(overrides)))


@pytest.fixture(scope="session")
def tiny_full_entry(ray_cluster) -> str:
    """The tiny model fully fine-tuned on the bundled Q&A (2 DDP workers, as `make demo` does)."""
    return train("recipes/tiny-full.yaml")


@pytest.fixture(scope="session")
def tiny_lora_entry(ray_cluster) -> str:
    """A LoRA adapter on the tiny model."""
    return train("recipes/tiny-lora.yaml")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(attune_home):
    """A separate `ray start --head` cluster, as on a real cluster; yields its dashboard address.

    Started with --block in its own process group so that the teardown stops this cluster
    alone (`ray stop` would also kill the session's in-process Ray).
    """
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    gcs, dashboard = _free_port(), _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=6",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("ray start --head did not come up")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
