"""Where a running app finds LoRA adapters: an object store (Ray's own loader) or a directory.

    lora_store: s3://bucket/adapters       # Ray Serve LLM lists and downloads adapters from it
    lora_store: /srv/attune/.adapters      # a directory every serving node sees (one machine, a
                                           # shared volume): vLLM loads adapters from it in place

Either way an adapter lives at `<lora_store>/<base model id>/<entry name>/` and is served as the
model `<base model id>:<entry name>`. Ray Serve LLM takes only object-store URIs, so for a
directory attune's ingress lists the adapters and attune's model server resolves them.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException
from ray.serve.llm import LLMConfig

from attune.ray_internals import (
    DiskMultiplexConfig,
    LoraModelLoader,
    get_base_model_id,
    get_lora_id,
    global_id_manager,
)

# Where an LLMConfig carries its adapters' directory (Ray's own field accepts only URIs).
ADAPTERS_DIR = "attune_adapters_dir"
ADAPTER_CONFIG = "adapter_config.json"


def is_directory(store: str) -> bool:
    return "://" not in store


def adapter_names(base_path: str) -> list[str]:
    """The adapters in a base model's directory of the store."""
    root = Path(base_path)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / ADAPTER_CONFIG).is_file())


async def adapter_metadata(model_id: str, base_path: str) -> dict:
    """What Ray's ingress asks of an adapter (its model card's metadata), for a directory."""
    path = Path(base_path) / get_lora_id(model_id)
    if not (path / ADAPTER_CONFIG).is_file():
        raise HTTPException(404, f"The model {model_id!r} does not exist.")
    return {"model_id": model_id, "base_model_id": get_base_model_id(model_id),
            "max_request_context_length": None, "bucket_uri": str(path)}


class AdapterLoader(LoraModelLoader):
    """Ray's loader, which downloads an adapter from the store; from a directory, vLLM reads the
    adapter where it is."""

    async def load_model_from_config(self, lora_model_id: str, llm_config: LLMConfig):
        directory = llm_config.experimental_configs.get(ADAPTERS_DIR)
        if directory is None:
            return await super().load_model_from_config(lora_model_id, llm_config)
        metadata = await adapter_metadata(lora_model_id, directory)
        return DiskMultiplexConfig.model_validate({
            "model_id": lora_model_id, "max_total_tokens": None,
            "local_path": metadata["bucket_uri"], "lora_assigned_int_id": global_id_manager.next()})
