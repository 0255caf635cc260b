"""The RayJobs' entrypoints, exactly as the rendered cpu overlay has them, run as Ray jobs on a
local `ray start --head` cluster (what KubeRay's submitter does), with tiny overrides appended.

    pytest tests/test_k8s_jobs.py

The job's runtime env stands in for the pod: ATTUNE_STORE as the model-store ConfigMap sets it,
`attune` on PATH as in the image, the repo as working_dir as /app is in the image.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from attune import k8s
from attune.submit import runtime_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpu_jobs() -> dict[str, dict]:
    docs = k8s.render(REPO, "cpu", check=True)
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "RayJob"}


def run_job(address: str, entrypoint: str, store: Path, timeout_s: float = 900) -> str:
    """`ray job submit ... -- ENTRYPOINT`: what KubeRay's submitter pod runs (K8sJobMode), and
    what users run against a cluster (docs/training.md). Returns the job's logs."""
    env = runtime_env()
    env["env_vars"].update(ATTUNE_STORE=str(store),
                           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    submission_id = f"test-{uuid.uuid4().hex[:8]}"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # A shell line, as the submitter pod's: its shell expands the entrypoint's ${ATTUNE_STORE}
    # (the pod has the ConfigMap's value) before `ray job submit` quotes the words for the job.
    submit = (f"{ray_bin} job submit --address {address} --submission-id {submission_id} "
              f"--runtime-env-json {shlex.quote(json.dumps(env))} -- {entrypoint}")
    cli_env = {**os.environ, "RAY_AUTH_MODE": "token", "ATTUNE_STORE": str(store)}
    deadline = time.time() + timeout_s
    while True:  # a head that just started may not have its job agent yet (KubeRay waits too)
        try:
            result = subprocess.run(["bash", "-c", submit], env=cli_env, cwd=REPO,
                                    capture_output=True, text=True,
                                    timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            subprocess.run([ray_bin, "job", "stop", "--address", address, submission_id],
                           env=cli_env, capture_output=True, timeout=60)
            pytest.fail(f"{entrypoint}: still running after {timeout_s} s")
        if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
            break
        time.sleep(3)
    logs = result.stdout
    assert result.returncode == 0, f"{entrypoint}:\n{logs[-3000:]}\n{result.stderr[-2000:]}"
    assert f"Job '{submission_id}' succeeded" in logs
    return logs


def test_finetune_entrypoint_succeeds(ray_head, cpu_jobs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    entrypoint = cpu_jobs["attune-finetune"]["spec"]["entrypoint"] + (
        " optim.max_steps=10 optim.warmup_steps=1 scaling.num_workers=1"
        " eval.every_steps=10 checkpoint.every_steps=10")
    logs = run_job(ray_head, entrypoint, tmp_path)
    entry = tmp_path / "registry" / "tiny-full"
    assert f"registry entry: {entry}" in logs
    assert (entry / "attune.json").is_file()
    assert (tmp_path / "runs" / "tiny-full").is_dir()  # where a retried job resumes from
    # each progress line once (through Ray Train's print patch, the driver showed each twice)
    assert logs.count("[attune] step 10/10 |") == 1, logs[-3000:]


def test_tune_entrypoint_succeeds(ray_head, cpu_jobs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    entrypoint = cpu_jobs["attune-tune"]["spec"]["entrypoint"] + (
        " num_samples=1 scheduler.type=fifo budget.max_concurrent_trials=1"
        " optim.max_steps=24 eval.every_steps=8 checkpoint.every_steps=24")
    logs = run_job(ray_head, entrypoint, tmp_path)
    assert "registry entry:" in logs
    assert list((tmp_path / "registry").glob("*/attune.json"))
    assert (tmp_path / "runs" / "tiny-full-asha").is_dir()
