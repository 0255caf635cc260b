"""`attune submit`: run an attune command as a Ray job, shipping attune with it.

    RAY_AUTH_MODE=token attune submit --address http://HEAD:8265 train recipes/tiny-full.yaml

For clusters whose image does not have attune installed: the job's runtime env carries the
working directory (recipes, data) and the package itself (`py_modules`), and the entrypoint is
`python -m attune ...`. Ray 2.60 clusters use token auth: the client needs RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

import attune

# Settings of this machine that a job must not carry to the cluster's nodes.
NODE_LOCAL = {"ATTUNE_HOME"}
# What a job needs beside the code: where the registry and runs go is the recipe's business.
EXCLUDES = [".venv", ".git", "**/__pycache__", "*.png", "bench/results", "tests/artifacts"]


def runtime_env() -> dict:
    package_dir = str(Path(attune.__file__).parent)
    env_vars = {k: v for k, v in os.environ.items()
                if k.startswith("ATTUNE_") and k not in NODE_LOCAL}
    return {"working_dir": ".", "py_modules": [package_dir], "excludes": EXCLUDES,
            "env_vars": env_vars}


def submit(args: list[str], address: str | None = None, wait: bool = True) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    client = JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")
    entrypoint = "python -m attune " + " ".join(shlex.quote(a) for a in args)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env())
    print(f"[attune] submitted {job_id}: {entrypoint}", flush=True)
    if not wait:
        return 0
    asyncio.run(_follow_logs(client, job_id))
    status = client.get_job_status(job_id)
    print(f"[attune] job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _follow_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):  # ends when the job does
        sys.stdout.write(lines)
        sys.stdout.flush()
