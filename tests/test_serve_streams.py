"""How the default app's streams end: the model server sends its last events as one message,
and the ingress ends the client's response at `data: [DONE]` (test_serve checks the same on
the real stack)."""

from __future__ import annotations

import asyncio
import json

import pytest


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def chunk(content: str | None = None, finish: str | None = None, index: int = 0) -> str:
    delta = {} if content is None else {"content": content}
    return sse({"choices": [{"index": index, "delta": delta, "finish_reason": finish}]})


DONE = "data: [DONE]\n\n"
USAGE = sse({"choices": [], "usage": {"completion_tokens": 3}})


async def events(*items):
    for item in items:
        await asyncio.sleep(0)
        yield item


def collect(stream) -> list:
    async def run():
        return [message async for message in stream]
    return asyncio.run(run())


def test_the_finishing_chunk_usage_and_done_go_as_one_message():
    from attune.serve.server import end_in_one_message

    role = sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    # Generated text that spells out the marker is escaped inside the JSON: no false end.
    quoting = chunk('he said "finish_reason":"stop"')
    messages = collect(end_in_one_message(events(role, chunk("a"), quoting, chunk("b", "length"),
                                                 USAGE, DONE)))
    assert messages == [[role], [chunk("a")], [quoting], [chunk("b", "length"), USAGE, DONE]]


def test_a_stream_that_fails_before_finishing_sends_what_it_had():
    from attune.serve.server import end_in_one_message

    async def failing():
        yield chunk("a")
        raise RuntimeError("engine died")

    async def run():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for message in end_in_one_message(failing()):
                got.append(message)
        return got

    assert asyncio.run(run()) == [[chunk("a")]]


class FakeEngine:
    """Stands in for vLLM behind Ray's LLMServer: a stream of SSE events per request."""

    async def chat(self, request, raw_request_info):
        for item in (chunk("a"), chunk("b", "stop"), DONE):
            yield item


class Request:
    def __init__(self, stream=True, n=1):
        self.stream, self.n = stream, n


def model_server(batching_interval_ms: float):
    """attune's LLMServer without an engine start: only what `_run_request` reads."""
    from ray.serve.llm import LLMConfig

    from attune.serve import server

    instance = server.LLMServer.__new__(server.LLMServer)
    instance.engine = FakeEngine()
    instance._llm_config = LLMConfig(
        model_loading_config={"model_id": "m"}, accelerator_config={"kind": "cpu"},
        experimental_configs={"stream_batching_interval_ms": batching_interval_ms})
    return instance


@pytest.mark.parametrize("request_, interval_ms, expected", [
    (Request(), 0, [[chunk("a")], [chunk("b", "stop"), DONE]]),
    # Two choices: one finishing must not hold back the other's tokens; Ray's stream as it was.
    (Request(n=2), 0, [[chunk("a")], [chunk("b", "stop")], [DONE]]),
    # Ray's interval batching, where asked for, gathers on its own: left to it.
    (Request(), 10_000, [[chunk("a"), chunk("b", "stop"), DONE]]),
])
def test_the_model_server_ends_streams_in_one_message_only_where_that_holds_nothing_back(
        monkeypatch, request_, interval_ms, expected):
    from ray import serve

    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")  # no LoRA, no replica
    server = model_server(interval_ms)

    async def run():
        stream = await server._run_request(request_, engine_method="chat",
                                           batch_output_stream=True)
        return [message async for message in stream]

    assert asyncio.run(run()) == expected


def test_the_ingress_ends_the_response_at_done_and_reads_the_rest_in_the_background(monkeypatch):
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

    from attune.serve.ingress import Ingress

    release, upstream_done = asyncio.Event(), asyncio.Event()

    async def model_server_stream(self, **kwargs):
        yield [chunk("a")]
        yield [chunk("b", "stop"), DONE]
        await release.wait()  # the model server's stream ends after the client's
        upstream_done.set()

    monkeypatch.setattr(OpenAiIngress, "_get_response", model_server_stream)
    ingress = Ingress.__new__(Ingress)  # no handles needed: the model server is faked above
    ingress._draining = set()

    async def run():
        got = [message async for message in ingress._get_response(body=None, call_method="chat")]
        assert not upstream_done.is_set()  # the client's answer did not wait for the end
        assert len(ingress._draining) == 1
        release.set()
        await asyncio.wait_for(upstream_done.wait(), timeout=5)
        await asyncio.sleep(0)
        return got

    assert asyncio.run(run()) == [[chunk("a")], [chunk("b", "stop"), DONE]]
    assert not ingress._draining  # the rest of the model server's stream was read to its end
