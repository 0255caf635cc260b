"""Build the attune image on this machine with podman, and run commands inside it.

    python tests/podman_image.py build              # what `make image` runs: the cpu image
    python tests/podman_image.py run attune --help  # a command inside the built image

No image registry is reachable here and `podman run` cannot set rlimits, so: the base is
Debian's minbase from debootstrap, imported once; podman keeps its storage under
$ATTUNE_IMAGE_DIR, default /var/tmp/attune-image, with the driver $ATTUNE_IMAGE_DRIVER (vfs;
overlay rebuilds after a source change in seconds, not minutes); and a command runs in the
image's root by chroot, as a container runtime would run it: the image's user, environment and
working directory, an overlay that keeps its writes from the image, and namespaces of its own
(mounts, processes, a network with loopback only). Its processes end with it, its mounts with
them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("ATTUNE_IMAGE_DIR", "/var/tmp/attune-image"))
# podman's storage driver: vfs (every layer a full copy of the tree) or overlay
DRIVER = os.environ.get("ATTUNE_IMAGE_DRIVER", "vfs")
BASE = "localhost/debian:bookworm"
# torch==2.13.0+cpu is not on PyPI; this machine has it in a folder of wheels (as `make setup`).
WHEELS = Path("/opt/wheels")
# The test session's marker (tests/leftovers.py), passed in so a process that escaped is found.
MARKER = "ATTUNE_TEST_SESSION"


def tag(extra: str = "cpu") -> str:
    version = REPO.joinpath("pyproject.toml").read_text().split('version = "')[1].split('"')[0]
    return f"localhost/attune:{version}-{extra}"


def podman(*args: str, **kwargs) -> subprocess.CompletedProcess:
    # podman's default ulimits are refused here.
    conf = HOME / "containers.conf"
    if not conf.exists():
        HOME.mkdir(parents=True, exist_ok=True)
        conf.write_text("[containers]\ndefault_ulimits = []\n")
    command = ["podman", "--root", str(HOME / "storage"), "--runroot", str(HOME / "run"),
               "--storage-driver", DRIVER, *args]
    kwargs.setdefault("check", True)
    return subprocess.run(command, env={**os.environ, "CONTAINERS_CONF": str(conf)}, **kwargs)


def ensure_base() -> None:
    """Debian bookworm minbase as localhost/debian:bookworm (about a minute, once)."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    rootfs = HOME / "debootstrap"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], check=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    podman("import", "-", BASE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
    tar.wait()
    shutil.rmtree(rootfs)


def build(extra: str = "cpu") -> str:
    """Build the image from the Dockerfile on the local base; returns its tag."""
    ensure_base()
    args = ["--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", f"EXTRA={extra}"]
    if extra == "cpu" and any(WHEELS.glob("torch-2.13.0+cpu*.whl")):
        args += ["--build-arg", "TORCH_SOURCE=--find-links /mnt"]
    if os.environ.get("PIP_CERT"):  # this machine's pip trusts a CA of its own: so does the build
        args += ["--build-arg", "PIP_CERT=/mnt/ca.crt"]
    image = tag(extra)
    with build_mounts() as mounts:
        podman("build", "--isolation", "chroot", "--network", "host", *args, *mounts,
               "-t", image, str(REPO))
    # the image this one replaced (with vfs, each of its layers is a full copy of the tree)
    podman("image", "prune", "-f", stdout=subprocess.DEVNULL)
    return image


@contextmanager
def build_mounts():
    """podman's options that mount the local wheels and pip's CA into the build, at /mnt: a
    directory every Debian image has, so that no mount point is left behind in the image."""
    staged = HOME / "build-mnt"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        for wheel in WHEELS.glob("torch-2.13.0+cpu*.whl"):
            try:
                os.link(wheel, staged / wheel.name)
            except OSError:  # another filesystem
                shutil.copy(wheel, staged)
        if os.environ.get("PIP_CERT"):
            shutil.copy(os.environ["PIP_CERT"], staged / "ca.crt")
        yield ["-v", f"{staged}:/mnt:ro"]
    finally:
        shutil.rmtree(staged)


@dataclass
class Container:
    """The image's root under an overlay of its own; `run` runs a command in it. Files written
    by one run are there for the next (as in one container started again)."""

    root: Path  # the image's root, read only through the overlay
    scratch: Path  # the overlay's upper and work dirs, and its mount point
    config: dict  # the image's config: User, Env, WorkingDir

    def run(self, command: list[str], env: dict[str, str] | None = None,
            binds: dict[str, str] | None = None, timeout: float = 600,
            **kwargs) -> subprocess.CompletedProcess:
        """`command` as the image's user in its working dir; `env` on top of the image's
        environment; `binds` host dir -> dir in the image. Output captured, as text."""
        target = self.scratch / "root"
        environment = list(self.config.get("Env") or [])
        environment += [f"{name}={value}" for name, value in (env or {}).items()]
        if os.environ.get(MARKER):
            environment.append(f"{MARKER}={os.environ[MARKER]}")
        user = self.config.get("User") or "0:0"
        workdir = self.config.get("WorkingDir") or "/"
        r = shlex.quote(str(target))
        lines = [
            "set -e",
            f"mount -t overlay overlay -o lowerdir={self.root},upperdir={self.scratch}/upper,"
            f"workdir={self.scratch}/work {r}",
            f"mount -t proc proc {r}/proc",
            f"mount -t sysfs -o ro sysfs {r}/sys",
            f"mount --rbind /dev {r}/dev",
            f"mount -t tmpfs -o mode=1777 tmpfs {r}/dev/shm",  # Ray's object store: its own
            f"echo \"127.0.0.1 localhost $(hostname)\" > {r}/etc/hosts",
            "ip link set lo up",
        ]
        for source, inside in (binds or {}).items():
            lines += [f"mkdir -p {r}{shlex.quote(inside)}",
                      f"mount --bind {shlex.quote(source)} {r}{shlex.quote(inside)}"]
        inner = shlex.join(["sh", "-c", 'cd "$0" && exec "$@"', workdir, *command])
        lines.append(shlex.join(["exec", "chroot", f"--userspec={user}", str(target),
                                 "/usr/bin/env", "-i", *environment]) + " " + inner)
        # --kill-child: the namespace's first process dies with unshare (a timeout kills
        # unshare), and every other process in the namespace with that one.
        return subprocess.run(
            ["unshare", "--mount", "--pid", "--net", "--fork", "--kill-child",
             "--propagation", "private", "sh", "-c", "\n".join(lines)],
            capture_output=True, text=True, timeout=timeout, **kwargs)


@contextmanager
def container(image: str):
    """A Container of `image`: the image mounted while it lasts, its scratch removed after."""
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image,
                               capture_output=True, text=True).stdout)
    root = podman("image", "mount", image, capture_output=True, text=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="container-", dir=HOME))
    try:
        for name in ("upper", "work", "root"):
            (scratch / name).mkdir()
        yield Container(Path(root), scratch, config)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        podman("image", "unmount", image, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build").add_argument("--extra", default="cpu", choices=["cpu", "gpu"])
    run = sub.add_parser("run")
    run.add_argument("--extra", default="cpu", choices=["cpu", "gpu"])
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.action == "build":
        print(build(args.extra))
        return 0
    with container(tag(args.extra)) as box:
        done = box.run(args.command, timeout=3600)
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
