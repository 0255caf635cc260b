"""The API-key middleware alone (no Ray): keys from a file that changes while the app serves, as a
rotated Kubernetes Secret does (its mounted file swapped by a symlink) or an edited file does.

    .venv/bin/python -m pytest tests/test_serve_auth.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from attune.serve import auth
from attune.serve.auth import ApiKeyMiddleware

ENV = "ATTUNE_TEST_AUTH_KEYS"  # a variable of this test's own, unset: keys come from the file


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def status(app, key: str) -> int:
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", f"Bearer {key}".encode())]}
    asyncio.run(app(scope, None, send))
    return sent[0]["status"]


def eventually(condition, deadline_s: float = 60.0) -> None:
    """Poll until `condition()` holds; the deadline is generous, the polling fine."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "the middleware never saw the new keys"
        time.sleep(0.05)


def rewritten(directory: Path) -> tuple[Path, Callable[[str], object]]:
    """A plain file, rewritten in place."""
    path = directory / "api-keys"
    return path, path.write_text


def swapped(directory: Path) -> tuple[Path, Callable[[str], object]]:
    """The kubelet's layout for a Secret volume: api-keys -> ..data/api-keys, ..data -> a
    timestamped directory; an update writes a new directory and renames a new ..data link over the
    old one (atomic), then deletes the old directory."""
    versions = iter(range(1, 100))

    def publish(text: str) -> None:
        old = (directory / "..data").resolve() if (directory / "..data").exists() else None
        new = directory / f"..2026_01_01_00_00_0{next(versions)}"
        new.mkdir()
        (new / "api-keys").write_text(text)
        (directory / "..data_tmp").symlink_to(new.name)
        os.replace(directory / "..data_tmp", directory / "..data")
        if old:
            shutil.rmtree(old)

    (directory / "api-keys").symlink_to("..data/api-keys")
    return directory / "api-keys", publish


@pytest.mark.parametrize("layout", [rewritten, swapped])
def test_a_changed_key_file_counts_without_a_restart(tmp_path, monkeypatch, layout):
    # The kubelet takes up to a minute or so to update a mounted Secret; attune adds at most this.
    assert auth.RELOAD_EVERY_S <= 5
    monkeypatch.setattr(auth, "RELOAD_EVERY_S", 0.1)  # the same path, sooner
    monkeypatch.delenv(ENV, raising=False)
    path, publish = layout(tmp_path)
    publish("# keys\nkey-a\n")
    app = ApiKeyMiddleware(_ok, env_var=ENV, key_file=str(path), required=True)
    assert (status(app, "key-a"), status(app, "key-b")) == (200, 401)

    publish("key-a\nkey-b\n")  # a new key works
    eventually(lambda: status(app, "key-b") == 200)
    publish("key-b\n")  # a revoked key is refused
    eventually(lambda: status(app, "key-a") == 401)
    assert status(app, "key-b") == 200
    publish("")  # no key left: everything refused, not an open endpoint
    eventually(lambda: status(app, "key-b") == 401)
    assert status(app, "") == 401
