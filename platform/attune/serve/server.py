"""Ray's LLMServer with one fix: concurrent first requests for a LoRA adapter load it once.

Ray 2.60's VLLMEngine.resolve_lora checks whether the adapter is loaded, then awaits the load;
two requests arriving together both load, and the second fails with "has already been loaded"
(a 500 to the client). Serialising the resolve per adapter closes the gap; everything else is
Ray's. The class keeps Ray's name, so deployments are still called "LLMServer:<model id>".
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.llm.deployment import LLMServer as _RayLLMServer


class LLMServer(_RayLLMServer):
    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        locks = self.__dict__.setdefault("_adapter_locks", {})
        lock = locks.setdefault(serve.get_multiplexed_model_id(), asyncio.Lock())
        async with lock:
            await super()._maybe_resolve_lora_from_multiplex()
