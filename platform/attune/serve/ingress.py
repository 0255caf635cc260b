"""Ray's OpenAI ingress, strict about what it accepts and light on every streamed token.

Errors Ray raises as plain HTTP exceptions (an unknown model) come back in OpenAI's error shape,
not FastAPI's `{"detail": ...}`, and so do Serve's plain-text overload refusals. Request bodies
are checked before they get here (attune.serve.request_body, in both apps).

Every token the default app streams crosses this replica, so two of Ray's per-chunk costs are
taken out: the model handles use Serve's gRPC channel, and Ray's exception middleware is plain
ASGI. A response also ends at its `data: [DONE]`, not a message later when the model server's
stream has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray.serve.llm.ingress import OpenAiIngress
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware

from attune.ray_internals import (
    ModelList,
    get_lora_model_ids,
    get_request_id,
    get_response_for_error,
    handle_validation_error,
    serve_constants,
)
from attune.serve.adapters import adapter_metadata, adapter_names, is_directory
from attune.serve.auth import ApiKeyMiddleware, openai_error
from attune.serve.request_body import BodyCheckMiddleware

# The name of the BaseHTTPMiddleware dispatch Ray LLM's ingress `init()` adds (Ray 2.60).
RAY_ERRORS_DISPATCH = "_handle_application_exceptions"

logger = logging.getLogger(__name__)

# The last event of every OpenAI stream; vLLM sends it itself.
STREAM_END = "data: [DONE]\n\n"


class Ingress(OpenAiIngress):
    def __init__(self, llm_deployments: dict, *args, **kwargs):
        # A handle carries the transport of the process that created it, here the one that built
        # the app (`attune serve`, `serve deploy`'s build task), where RAY_SERVE_USE_GRPC_BY_DEFAULT
        # is unset: every streamed chunk would go back as a Ray object (a thread-pool hop and an
        # RPC per chunk in the model server). The replica's own environment (REPLICA_ENV) decides,
        # as its Serve read it: the constant is looked up here, in the replica.
        by_reference = not serve_constants.RAY_SERVE_USE_GRPC_BY_DEFAULT
        super().__init__({model_id: handle.options(_by_reference=by_reference)
                          for model_id, handle in llm_deployments.items()}, *args,
                         _get_lora_model_metadata_func=self._adapter_metadata, **kwargs)
        self._draining: set[asyncio.Task] = set()  # asyncio holds tasks by weak reference only

    async def _get_response(self, **kwargs) -> AsyncIterator:
        # The client's stream ends with `data: [DONE]`; the model server's ends a message later,
        # when its generator has returned, which under load is one more turn of two busy event
        # loops (over 10 ms at concurrency 32). The response ends at [DONE]; the rest of the
        # model server's stream is read in the background, so its request ends as normal.
        stream = super()._get_response(**kwargs)
        async for response in stream:
            yield response
            if _ends_stream(response):
                task = asyncio.create_task(_drain(stream))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
                return

    async def _adapter_metadata(self, model_id: str, base_path: str) -> dict:
        if is_directory(base_path):
            return await adapter_metadata(model_id, base_path)
        return await self._default_get_lora_model_metadata_func(model_id, base_path)

    async def models(self) -> ModelList:
        """Ray's listing, where a directory store's adapters are listed by attune (Ray lists
        only object stores)."""
        cards = {}
        for base_id in self._model_cards:
            cards[base_id] = await self.model(base_id)
            base_path = self._lora_paths.get(base_id)
            if base_path is None:
                continue
            ids = ([f"{base_id}:{name}" for name in adapter_names(base_path)]
                   if is_directory(base_path) else get_lora_model_ids(base_path, base_id))
            for model_id in ids:
                if card := await self.model(model_id):
                    cards[model_id] = card
        return ModelList(data=list(cards.values()))


def _ends_stream(response) -> bool:
    """Whether a model server's message (an SSE string, or a batch of them) ends the stream."""
    last = response[-1] if isinstance(response, list) and response else response
    return isinstance(last, str) and last.endswith(STREAM_END)


async def _drain(stream: AsyncIterator) -> None:
    try:
        async for _ in stream:
            pass
    except Exception:  # the client has its whole answer; still worth a line in the replica's log
        logger.warning("A model server's stream failed after its [DONE]", exc_info=True)


def _error_body(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return openai_error(status, message, kind, code=status)


def add_checks(app: FastAPI, api_keys: dict) -> None:
    """attune's middleware in front of an OpenAI app, Ray's ingress's or (direct streaming)
    vLLM's: the API key (ApiKeyMiddleware's options), then Retry-After on overload answers, then
    the request body."""
    app.middleware_stack = None  # vLLM's app built its stack already: Starlette builds it again
    app.add_middleware(BodyCheckMiddleware)  # each added middleware wraps those added before
    app.add_middleware(RetryAfterMiddleware)
    app.add_middleware(ApiKeyMiddleware, **api_keys)


def add_openai_error_handler(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def openai_shaped(request: Request, exc: HTTPException) -> Response:
        return Response(_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                        headers=exc.headers, media_type="application/json")


class ApplicationErrorsMiddleware:
    """Ray LLM's last word on an exception from a route, as plain ASGI: a JSON error body
    (OpenAI's shape, from Ray's own helpers) instead of a bare 500.

    Ray installs the same as a Starlette BaseHTTPMiddleware, which runs every request in a task
    of its own and passes every streamed chunk through a memory stream: one more hand-over per
    token on the ingress's event loop. `use_plain_asgi_errors` swaps it for this.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def note_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, note_start)
        except Exception as error:  # CancelledError is a BaseException: it passes, as in Ray's
            if started:  # too late for an error answer: the client sees the stream cut
                raise
            response = await _error_response(Request(scope, receive), error)
            await response(scope, receive, send)


async def _error_response(request: Request, error: Exception) -> Response:
    if isinstance(error, RequestValidationError):
        return await handle_validation_error(request, error)
    answer = get_response_for_error(error, get_request_id(request))
    return JSONResponse(content=answer.model_dump(), status_code=answer.error.code)


def use_plain_asgi_errors(app: FastAPI) -> None:
    """Put ApplicationErrorsMiddleware where Ray's `init()` put its BaseHTTPMiddleware."""
    for i, entry in enumerate(app.user_middleware):
        dispatch_name = getattr(entry.kwargs.get("dispatch"), "__name__", None)
        if entry.cls is BaseHTTPMiddleware and dispatch_name == RAY_ERRORS_DISPATCH:
            app.user_middleware[i] = Middleware(ApplicationErrorsMiddleware)
            return
    raise RuntimeError(f"Ray LLM's {RAY_ERRORS_DISPATCH} middleware is not on the ingress app")


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
