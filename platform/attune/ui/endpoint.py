"""The OpenAI-compatible endpoint the page talks to: a client, its models, its errors in words.

The page speaks only the OpenAI protocol, so it works against attune's Ray Serve endpoint, plain
vLLM, or any compatible server. The API key is read here, on the server side, from ATTUNE_API_KEY;
it never reaches the browser.
"""

from __future__ import annotations

import os

import openai

DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"  # where `attune serve` listens
ENDPOINT_ENV = "ATTUNE_ENDPOINT"
API_KEY_ENV = "ATTUNE_API_KEY"


def default_endpoint() -> str:
    """The endpoint where none is given: $ATTUNE_ENDPOINT, else where `attune serve` listens."""
    return os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT)


def make_client(base_url: str, api_key: str | None = None) -> openai.OpenAI:
    # No retries and a short connect timeout: a down endpoint must show up in the chat within
    # seconds, not after the client's default backoff; long generations still get a minute.
    # openai's own Timeout: the client's HTTP stack is its own choice (httpx2 now, not httpx).
    return openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get(API_KEY_ENV) or "none",
                         max_retries=0, timeout=openai.Timeout(60.0, connect=5.0))


def list_models(client: openai.OpenAI) -> dict[str, dict[str, float]]:
    """Model id -> its evaluation scores (empty where it has none), for the models the endpoint
    serves right now, sorted by id; a promoted model shows up on the next call. attune's endpoint
    puts an entry's `attune eval` scores in its model card's metadata, under "scores"."""
    listed = {}
    for model in client.models.list():
        metadata = (model.model_extra or {}).get("metadata") or {}
        listed[model.id] = metadata.get("scores") or {}
    return dict(sorted(listed.items()))


def describe_scores(listed: dict[str, dict[str, float]]) -> str:
    """One Markdown line per model with scores: `tiny-full`: exact_match 1 · eval_loss 0.0102."""
    return "\n".join(f"- `{model}`: " + " · ".join(f"{name} {value:.4g}" for name, value in
                                                 sorted(scores.items()))
                     for model, scores in listed.items() if scores)


def describe_error(error: Exception, base_url: str) -> str:
    """One friendly sentence for the chat instead of a traceback."""
    if isinstance(error, openai.APITimeoutError):
        return f"The endpoint at {base_url} did not answer in time. Try again in a moment."
    if isinstance(error, openai.APIConnectionError):
        return (f"Cannot reach the endpoint at {base_url}. Is it running? "
                "The page keeps working: send again once it is back.")
    if isinstance(error, openai.AuthenticationError):
        return f"The endpoint refused the API key (set {API_KEY_ENV} where the page runs)."
    if isinstance(error, openai.NotFoundError):
        return f"The endpoint does not know this model any more: {_server_message(error)} Press ↻ to refresh the list."
    if isinstance(error, openai.APIStatusError):
        return f"The endpoint answered with an error ({error.status_code}): {_server_message(error)}"
    return f"Something went wrong while talking to the endpoint: {error}"


def _server_message(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    message = body.get("message") or body.get("error", {}).get("message") if body else None
    return str(message or error.message)
