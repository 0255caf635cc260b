"""The store every node sees: a local path (a shared volume) or an object-store URI.

    fs, path = filesystem("s3://bucket/attune/registry/tiny-full")

Registry entries, training runs and base models copied there are all read through this.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def filesystem(location: str):
    """(pyarrow filesystem, path) for a local path or a URI. S3 honours AWS_ENDPOINT_URL, so an
    S3-compatible store (MinIO, a local test server) works like AWS."""
    if "://" not in location:
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if location.startswith("s3://") and endpoint:
        scheme, _, host = endpoint.partition("://")
        fs = pafs.S3FileSystem(endpoint_override=host, scheme=scheme,
                               region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return fs, location.removeprefix("s3://")
    return pafs.FileSystem.from_uri(location)


def same_location(a: str, b: str) -> bool:
    """Whether two spellings name one place: `~/x`, `./x` and `/home/you/x`, or equal URIs."""
    return _canonical(a) == _canonical(b)


def _canonical(location: str) -> str:
    return location if "://" in location else str(Path(location).expanduser().resolve())


def say_if_maybe_node_local(locations: dict[str, str], nodes: int) -> None:
    """On a cluster of several nodes, a local path must be a directory every node mounts at that
    path; attune cannot tell one from a node's own disk, so it says what it assumes."""
    local = {key: value for key, value in locations.items() if "://" not in value}
    if nodes > 1 and local:
        names = ", ".join(f"{key}={value}" for key, value in local.items())
        print(f"[attune] {names}: local paths on a cluster of {nodes} nodes, so every node must "
              "mount them at the same path (else use an s3:// or gs:// URI)", flush=True)
