"""Prints `name!=version` for each pin of a lock file that is younger than the cut-off.

    python3 requirements/cooldown.py requirements/cpu-dev.txt 2026-12-04T00:00:00Z

lock.sh feeds these back to the resolver as constraints. uv's --exclude-newer alone is not enough:
an index page served without upload times (PEP 700) lets a release of this morning through, and
such a release can still be pulled or broken. A version counts as old enough only when the index's
JSON page lists a file of it uploaded before the cut-off. Standard library only: it runs before
any environment exists.
"""

import concurrent.futures
import json
import re
import sys
import urllib.request
from datetime import datetime

INDEX = "https://pypi.org/simple"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def pins(lock_path: str) -> list[tuple[str, str]]:
    with open(lock_path) as lock:
        return [m.groups() for m in map(PIN.match, lock) if m]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _file_version(filename: str) -> str:
    if filename.endswith(".whl"):
        return filename.split("-")[1]
    return re.sub(r"\.(tar\.gz|zip|tar\.bz2)$", "", filename).rsplit("-", 1)[-1]


def _uploaded(name: str, version: str) -> datetime | None:
    """The earliest upload time of any file of name==version, or None where the index lists none."""
    request = urllib.request.Request(
        f"{INDEX}/{_normalized(name)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    times = [datetime.fromisoformat(f["upload-time"].replace("Z", "+00:00"))
             for f in files if f.get("upload-time") and _file_version(f["filename"]) == version]
    return min(times) if times else None


def too_new(lock_path: str, cutoff: datetime) -> list[str]:
    """Pins that are not listed with an upload time before `cutoff`, as pip constraints."""
    locked = [(n, v) for n, v in pins(lock_path) if "+" not in v]  # local builds: not on the index
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        uploaded = list(pool.map(lambda pin: _uploaded(*pin), locked))
    return [f"{n}!={v}" for (n, v), t in zip(locked, uploaded) if t is None or t >= cutoff]


if __name__ == "__main__":
    print(*too_new(sys.argv[1], datetime.fromisoformat(sys.argv[2].replace("Z", "+00:00"))),
          sep="\n")
