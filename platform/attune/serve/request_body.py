"""The chat and completion bodies the OpenAI routes accept: JSON, OpenAI's field types, known roles.

Both apps (the default ingress and direct streaming's vLLM app) check a body here before their
own validation. vLLM's request models are lax: a string where a boolean belongs passes as True,
and a message `content` that is an object passes as a lazy iterator that fails when read; in the
default app Ray's ingress reads it and answers the failure with a 500. OpenAI answers both with a
400 naming the field, and so does attune. Fields beyond OpenAI's (vLLM's own sampling settings)
are left to vLLM.
"""

from __future__ import annotations

import json

from attune.serve.auth import openai_error

ROLES = {"system", "developer", "user", "assistant", "tool"}

# A spec is a JSON type's name, [spec] for an array of it, {field: spec} for an object whose
# fields, where present and not null, are checked, or a tuple of specs for any one of them.
_SAMPLING = {
    "model": "string", "stream": "boolean",
    "stream_options": {"include_usage": "boolean", "continuous_usage_stats": "boolean"},
    "n": "integer", "max_tokens": "integer", "temperature": "number", "top_p": "number",
    "presence_penalty": "number", "frequency_penalty": "number", "seed": "integer",
    "stop": ("string", ["string"]), "logit_bias": "object", "user": "string",
}
_PART = {"type": "string", "text": "string"}
_MESSAGE = {"role": "string", "content": ("string", [_PART]), "name": "string",
            "tool_calls": ["object"], "tool_call_id": "string"}
CHAT = {**_SAMPLING, "messages": [_MESSAGE], "max_completion_tokens": "integer",
        "logprobs": "boolean", "top_logprobs": "integer", "tools": ["object"],
        "tool_choice": ("string", "object"), "parallel_tool_calls": "boolean",
        "response_format": "object"}
COMPLETION = {**_SAMPLING, "prompt": ("string", ["string"], ["integer"], [["integer"]]),
              "echo": "boolean", "logprobs": "integer", "best_of": "integer", "suffix": "string"}

_IS = {"boolean": lambda v: isinstance(v, bool),
       "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
       "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
       "string": lambda v: isinstance(v, str),
       "object": lambda v: isinstance(v, dict)}


def body_problem(path: str, body: bytes) -> tuple[str, str | None] | None:
    """What is wrong with a chat (path ending in /chat/completions) or completion body, and the
    field it is in (OpenAI's `param`); None if nothing is."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        return f"the body is not valid JSON: {error}", None
    chat = path.endswith("/chat/completions")
    if problem := _type_problem(data, CHAT if chat else COMPLETION, ""):
        return problem
    messages = data.get("messages") if chat else None
    for i, message in enumerate(messages or []):
        if (role := message.get("role")) not in ROLES:  # vLLM would render any into the prompt
            where = f"messages[{i}].role"
            return f"{where}: {role!r} is not one of {sorted(ROLES)}", where
    return None


def _type_problem(value, spec, where: str) -> tuple[str, str | None] | None:
    if isinstance(spec, tuple):
        problems = [_type_problem(value, alternative, where) for alternative in spec]
        if None in problems:
            return None
        # where one alternative has the value's own JSON type, its deeper problem says more
        same_type = [p for p, alternative in zip(problems, spec) if _has_type(value, alternative)]
        return same_type[0] if len(same_type) == 1 else _wrong_type(value, spec, where)
    if not _has_type(value, spec):
        return _wrong_type(value, spec, where)
    if isinstance(spec, list):
        for i, item in enumerate(value):
            if problem := _type_problem(item, spec[0], f"{where}[{i}]"):
                return problem
    elif isinstance(spec, dict):
        for field, field_spec in spec.items():
            if value.get(field) is not None:  # OpenAI takes null for an optional field
                name = f"{where}.{field}" if where else field
                if problem := _type_problem(value[field], field_spec, name):
                    return problem
    return None


def _has_type(value, spec) -> bool:
    """Whether the value has the spec's JSON type, not looking inside arrays or objects."""
    if isinstance(spec, list):
        return isinstance(value, list)
    return _IS["object" if isinstance(spec, dict) else spec](value)


def _wrong_type(value, spec, where: str) -> tuple[str, str | None]:
    *others, last = [_describe(s) for s in (spec if isinstance(spec, tuple) else (spec,))]
    expected = f"{', '.join(others)} or {last}" if others else last
    return f"{where or 'the body'}: expected {expected}, got {_json_type(value)}", where or None


def _describe(spec) -> str:
    if isinstance(spec, list):
        return f"an array of {_plural(spec[0])}"
    name = "object" if isinstance(spec, dict) else spec
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _plural(spec) -> str:
    if isinstance(spec, list):
        return f"arrays of {_plural(spec[0])}"
    return f"{'object' if isinstance(spec, dict) else spec}s"


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, float):
        return "a decimal number"
    return _describe(next(name for name, is_type in _IS.items() if is_type(value)))


class BodyCheckMiddleware:
    """Answers a chat or completion body with a problem (body_problem) with OpenAI's 400, before
    the app's own validation; hands every other request, and the body it read, on unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] != "POST"
                or not scope["path"].endswith("/completions")):
            return await self.app(scope, receive, send)
        received, body = [], b""
        while True:
            message = await receive()
            received.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if message["type"] == "http.request" and (problem := body_problem(scope["path"], body)):
            text, param = problem
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": openai_error(
                400, text, "invalid_request_error", code=400, param=param)})
            return

        async def replay():
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)
