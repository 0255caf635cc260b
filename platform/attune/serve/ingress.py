"""Ray's OpenAI ingress, strict about what it accepts.

Two gaps closed on top of `OpenAiIngress`: a chat message with a role no chat template knows
("wizard") is refused with a 400 instead of being rendered into the prompt, and errors Ray raises
as plain HTTP exceptions (an unknown model) come back in OpenAI's error shape, not FastAPI's
`{"detail": ...}`, and so do Serve's plain-text overload refusals.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from starlette.exceptions import HTTPException

from attune.serve.auth import openai_error

ROLES = {"system", "developer", "user", "assistant", "tool"}


def unknown_role(messages: list) -> str | None:
    """What is wrong with the first message whose role no chat template knows, if one is."""
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in ROLES:
            return f"messages[{i}].role: {role!r} is not one of {sorted(ROLES)}"
    return None


class Ingress(OpenAiIngress):
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        if problem := unknown_role(body.messages):
            raise OpenAIHTTPException(status_code=400, type="invalid_request_error", message=problem)
        return await super().chat(body, request)


def _error_body(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return openai_error(status, message, kind, code=status)


def add_openai_error_handler(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def openai_shaped(request: Request, exc: HTTPException) -> Response:
        return Response(_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                        headers=exc.headers, media_type="application/json")


class RetryAfterMiddleware:
    """Overload answers (429, 503: a replica's queue is full) tell the client when to retry, in
    OpenAI's error shape: Serve answers its own BackPressureError with a plain-text 503 through
    an exception handler it installs on the app when the replica starts, over any of ours."""

    def __init__(self, app, seconds: int = 1):
        self.app, self.value = app, str(seconds).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}  # a plain-text overload answer's start, until its body is complete
        body = bytearray()

        async def send_overload_answers_right(message):
            if message["type"] == "http.response.start" and message["status"] in (429, 503):
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"retry-after"]
                message = {**message, "headers": [*headers, (b"retry-after", self.value)]}
                if not any(k.lower() == b"content-type" and b"json" in v for k, v in headers):
                    held.update(message)
                    return
            elif message["type"] == "http.response.body" and held:
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                text = body.decode(errors="replace").strip() or "overloaded, retry later"
                payload = _error_body(held["status"], text)
                headers = [h for h in held["headers"]
                           if h[0].lower() not in (b"content-type", b"content-length")]
                await send({**held, "headers": [*headers, (b"content-type", b"application/json"),
                                                (b"content-length", str(len(payload)).encode())]})
                message = {"type": "http.response.body", "body": payload}
            await send(message)

        await self.app(scope, receive, send_overload_answers_right)
