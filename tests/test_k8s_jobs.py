"""The RayJobs' entrypoints, exactly as the rendered cpu overlay has them, run as Ray jobs on a
local `ray start --head` cluster (what KubeRay's submitter does), with tiny overrides appended.

    pytest tests/test_k8s_jobs.py

The job's runtime env stands in for the pod: ATTUNE_STORE as the model-store ConfigMap sets it,
`attune` on PATH as in the image, the repo as working_dir as /app is in the image.
"""

from __future__ import annotations

import os
import sys
import time
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
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = runtime_env()
    env["env_vars"].update(ATTUNE_STORE=str(store),
                           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # The head's token, sent explicitly: this process may have read RAY_AUTH_MODE before the
    # head existed (importing Ray's Serve schema does), and Ray caches that.
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    client = JobSubmissionClient(address, headers={
        "Authorization": f"Bearer {token_path.read_text().strip()}"})
    deadline = time.time() + timeout_s
    while True:  # a head that just started may not have its job agent yet (KubeRay waits too)
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(3)
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"{entrypoint}: still {status} after {timeout_s} s\n"
                        f"{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{entrypoint}: {status}\n{logs[-3000:]}"
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


def test_tune_entrypoint_succeeds(ray_head, cpu_jobs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    entrypoint = cpu_jobs["attune-tune"]["spec"]["entrypoint"] + (
        " num_samples=1 scheduler.type=fifo budget.max_concurrent_trials=1"
        " optim.max_steps=24 eval.every_steps=8 checkpoint.every_steps=24")
    logs = run_job(ray_head, entrypoint, tmp_path)
    assert "registry entry:" in logs
    assert list((tmp_path / "registry").glob("*/attune.json"))
    assert (tmp_path / "runs" / "tiny-full-asha").is_dir()
