"""Ray's LLMServer with one fix, one saving and adapters from a directory; the rest is Ray's.

The fix: concurrent first requests for a LoRA adapter load it once. Ray 2.60's
VLLMEngine.resolve_lora checks whether the adapter is loaded, then awaits the load; two requests
arriving together both load, and the second fails with "has already been loaded" (a 500 to the
client). Serialising the resolve per adapter closes the gap.

The saving: a stream's last events (the chunk with its finish_reason, the usage chunk if asked
for, `data: [DONE]`) travel to the ingress as one message instead of two or three.

The class keeps Ray's name, so deployments are still called "LLMServer:<model id>".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.llm.deployment import LLMServer as _RayLLMServer

from attune.serve.adapters import AdapterLoader

# How vLLM's streamed chunks say a choice has finished ("length", "stop", ...): JSON with no
# spaces, as pydantic writes it; a quote inside generated text is escaped, so text cannot match.
FINISHED = '"finish_reason":"'


class LLMServer(_RayLLMServer):
    def _init_multiplex_loader(self, model_downloader_cls=None):
        # adapters from a directory too, not only from an object store (attune.serve.adapters)
        super()._init_multiplex_loader(model_downloader_cls or AdapterLoader)

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        locks = self.__dict__.setdefault("_adapter_locks", {})
        lock = locks.setdefault(serve.get_multiplexed_model_id(), asyncio.Lock())
        async with lock:
            await super()._maybe_resolve_lora_from_multiplex()

    async def _run_request(self, request, *, engine_method: str, batch_output_stream: bool = False,
                           raw_request_info=None):
        ends_together = (batch_output_stream and getattr(request, "stream", False)
                         and getattr(request, "n", 1) in (1, None)
                         and self._get_batch_interval_ms() == 0)
        stream = await super()._run_request(
            request, engine_method=engine_method, raw_request_info=raw_request_info,
            batch_output_stream=batch_output_stream and not ends_together)
        return end_in_one_message(stream) if ends_together else stream


async def end_in_one_message(stream: AsyncIterator) -> AsyncIterator[list]:
    """Ray's unbatched stream (each event a list of one), except that everything from the
    finishing chunk on goes as one list. After that chunk vLLM only writes the usage chunk and
    `data: [DONE]`, without waiting for the engine, so holding them back costs no time; one
    choice per request (n=1) is the caller's to ensure, as with n>1 a choice finishing early
    would hold back the others' tokens."""
    end = None
    async for event in stream:
        if end is not None:
            end.append(event)
        elif isinstance(event, str) and FINISHED in event:
            end = [event]
        else:
            yield [event]
    if end:
        yield end
