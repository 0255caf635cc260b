"""API keys on the OpenAI routes: bearer tokens from the environment or a mounted Secret.

Keys are compared in constant time and never logged. With no key configured the endpoint
still starts on a loopback address (a laptop), and refuses to start anywhere else unless the
config says `auth: none`. The key file is read again when it changes: a rotated Secret (its
mounted file swapped by the kubelet) adds and revokes keys within seconds, without a restart.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from pathlib import Path

import ray

from attune.addresses import is_loopback
from attune.ray_internals import get_global_client
from attune.serve.config import ServeConfig

# Health and readiness stay open: Serve's own routes, and vLLM's when it is the ingress.
OPEN_PATHS = {"/-/healthz", "/-/routes", "/health", "/ping"}
# How often a request looks at the key file again: one small read every few seconds, far inside
# the minute or so a Secret's update takes to reach the pods.
RELOAD_EVERY_S = 2.0


class Keys:
    """The accepted keys: the variable's, read once, and the file's, read again when it changed."""

    def __init__(self, env_var: str, key_file: str | None):
        self.fixed = _keys(os.environ.get(env_var, "").split(","))
        self.path = key_file or os.environ.get(f"{env_var}_FILE")
        self.content, self.checked_at = None, float("-inf")
        self.keys = [k.encode() for k in self.fixed]

    def current(self) -> list[bytes]:
        now = time.monotonic()
        if self.path and now - self.checked_at >= RELOAD_EVERY_S:
            self.checked_at = now
            # Read, not stat: an edit within one timestamp tick keeps mtime and size. A few hundred
            # bytes (from tmpfs, for a Secret) cost microseconds of the event loop.
            try:
                content = Path(self.path).read_bytes()
            except OSError:  # absent (not mounted, or deleted): only the variable's keys
                content = b""
            if content != self.content:
                self.content = content
                lines = content.decode(errors="replace").splitlines()
                self.keys = [k.encode() for k in self.fixed + _keys(lines)]
        return self.keys


def _keys(lines: list[str]) -> list[str]:
    return [k for k in (line.strip() for line in lines) if k and not k.startswith("#")]


def openai_error(status: int, message: str, type_: str, code: str | int | None = None,
                 param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


def api_key_options(config: ServeConfig) -> dict:
    """ApiKeyMiddleware's options, as a serving config sets them."""
    return {"env_var": config.api_keys_env, "key_file": config.api_keys_file,
            "required": config.auth == "api_key"}


class ApiKeyMiddleware:
    """ASGI middleware in front of Ray's OpenAI ingress: 401 unless `Authorization: Bearer KEY`."""

    def __init__(self, app, *, env_var: str, key_file: str | None, required: bool):
        self.app = app
        self.keys = Keys(env_var, key_file) if required else None
        # No key at start: open on a loopback address (a laptop), refused anywhere else. Keys that
        # all go later (revoked) refuse every request: the endpoint does not turn open.
        self.open_without_keys = not required
        if required and not self.keys.current():
            host = _serve_http_host()
            if not is_loopback(host):
                raise RuntimeError(
                    f"no API key configured (set {env_var} or {env_var}_FILE) and the endpoint "
                    f"listens on {host}: refusing to serve without auth. Set `auth: none` in the "
                    "serving config to serve openly on purpose.")
            self.open_without_keys = True

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] not in OPEN_PATHS
                and not self._authorized(scope)):
            body = openai_error(401, "Missing or invalid API key: send 'Authorization: Bearer "
                                "<key>'.", "authentication_error", code="invalid_api_key")
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        keys = self.keys.current() if self.keys else []
        if not keys:
            return self.open_without_keys
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # compare against every key so that timing does not tell which one nearly matched
        matches = [hmac.compare_digest(token.strip(), key) for key in keys]
        return any(matches)


def _serve_http_host() -> str:
    """The host Serve's HTTP proxies bind, asked of the controller (we run inside a replica)."""
    return ray.get(get_global_client()._controller.get_http_config.remote()).host
