"""The Dockerfile installs the lock of pyproject.toml, runs as the user the manifests expect, and
carries no secrets.

    pytest tests/test_k8s_image.py

These checks read the Dockerfile the way the builder would (instructions, continuation lines)
and hold it to the project's files; tests/test_image.py builds it and runs inside it (--image).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def of(name: str) -> list[str]:
    return [args for word, args in instructions() if word == name]


def pins() -> dict[str, str]:
    """name -> version for every `name==version` in pyproject.toml, extras included."""
    specs = PROJECT["dependencies"] + [s for extra in PROJECT["optional-dependencies"].values()
                                       for s in extra]
    return {re.split(r"[\[=]", s)[0].lower(): s.split("==")[1] for s in specs if "==" in s}


@pytest.fixture(scope="module")
def install_branches() -> dict[str, str]:
    """The `case "$EXTRA"` branches of the install step: extra -> its shell commands."""
    (run,) = [r for r in of("RUN") if '"$EXTRA"' in r]
    return dict(re.findall(r"(\w+)\)\s*(.*?);;", run))


def test_base_image_python_satisfies_requires_python():
    (base_arg,) = of("FROM")
    assert base_arg == "${BASE_IMAGE}"  # users and this machine's build (tests/podman_image.py) pick it
    (base,) = [a.split("=", 1)[1] for a in of("ARG") if a.startswith("BASE_IMAGE=")]
    major, minor = map(int, re.match(r"python:(\d+)\.(\d+)", base).groups())
    low, high = re.match(r">=(\d+\.\d+),<(\d+\.\d+)", PROJECT["requires-python"]).groups()
    assert tuple(map(int, low.split("."))) <= (major, minor) < tuple(map(int, high.split(".")))


def test_installs_the_lock_of_each_vllm_extra(install_branches):
    """The extra's lock file, by hash and without resolving anything; then the project alone.
    tests/test_lock.py holds each lock to pyproject.toml."""
    extras = set(PROJECT["optional-dependencies"]) - {"dev"}
    assert set(install_branches) - {"*"} == extras == {"cpu", "gpu"}
    for extra in extras:
        words = list(shlex.shlex(install_branches[extra], posix=True, punctuation_chars=True))
        lock = f"requirements/{extra}.txt"
        assert lock in words and (REPO / lock).exists(), f"{extra}: does not install its lock"
        assert {"--require-hashes", "--no-deps"} <= set(words), extra
    assert "pip install --no-deps ." in "\n".join(of("RUN"))
    (default,) = [a for a in of("ARG") if a.startswith("EXTRA=")]
    assert default.split("=")[1] in extras


def test_dependencies_install_before_the_source_is_copied():
    """So that a change to the source reuses the dependencies' layer."""
    steps = instructions()
    install = next(i for i, (word, args) in enumerate(steps) if '"$EXTRA"' in args)
    copied_before = [args for word, args in steps[:install] if word == "COPY"]
    assert copied_before == ["requirements/cpu.txt requirements/gpu.txt ./requirements/"]


def test_every_version_named_in_the_dockerfile_is_pyprojects_pin():
    named = re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", "\n".join(of("RUN")))
    assert named, "the Dockerfile pins nothing itself; then this test checks nothing"
    for name, version in named:
        assert pins().get(name.lower()) == version.split("+")[0], f"{name}=={version}"


def dockerignored() -> list[str]:
    return [line for line in (REPO / ".dockerignore").read_text().split()
            if not line.startswith("#")]


def test_copies_what_exists_and_what_jobs_read():
    copied = set()
    for args in of("COPY"):
        *sources, _ = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            if source == ".":  # the build context: what .dockerignore lets through
                copied |= {path.name for path in REPO.iterdir()
                           if not any(fnmatch(path.name, pattern) for pattern in dockerignored())}
            else:
                copied.add(source.rstrip("/"))
    # the job entrypoints name recipes/ and tuning/; recipes read data/
    assert {"pyproject.toml", "platform", "recipes", "tuning", "data", "deployments"} <= copied


def test_has_what_vllm_needs_at_run_time():
    """A C++ compiler (torch.compile on CPU, Triton on GPU) and libnuma (vLLM's CPU kernels);
    the path where GKE mounts NVIDIA's libraries. tests/test_image.py runs them (--image)."""
    (apt,) = [r for r in of("RUN") if "apt-get install" in r]
    assert {"g++", "libnuma1"} <= set(re.search(r'packages="([^"]*)"', apt)[1].split())
    env = " ".join(of("ENV"))
    assert "/usr/local/nvidia/lib64" in re.search(r"LD_LIBRARY_PATH=(\S+)", env)[1].split(":")


def test_workdir_is_the_jobs_working_dir():
    (workdir,) = of("WORKDIR")
    for path in (REPO / "k8s" / "base").glob("ray-job.*.yaml"):
        runtime_env = yaml.safe_load(yaml.safe_load(path.read_text())["spec"]["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == workdir, path


def test_runs_as_the_non_root_user_the_manifests_expect():
    user = of("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    for path in (REPO / "k8s" / "base").glob("ray-*.yaml"):
        for uid in re.findall(r"runAsUser: (\d+)", path.read_text()):
            assert uid == user, f"{path}: runAsUser {uid}, the image runs as {user}"


def test_no_secrets_in_the_image():
    secretish = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.I)
    for word in ("ENV", "ARG"):
        for args in of(word):
            for name in re.findall(r"(?:^|\s)([A-Za-z_]\w*)=", args) or [args.split("=")[0]]:
                assert not secretish.search(name), f"{word} {name}: secrets come from Kubernetes"
    ignored = dockerignored()
    for pattern in (".git", ".venv", ".env", "**/*.env", "**/api-keys*", ".aws"):
        assert pattern in ignored, f".dockerignore: add {pattern}"
