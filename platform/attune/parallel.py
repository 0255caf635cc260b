"""Data parallelism for the training loop: DDP or FSDP2, and the state dicts that go with them.

All of it is a no-op when torch.distributed is not initialised, so the loop runs alone too.
Applied in one fixed order: LoRA first (by the caller), then sharding or replication.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """Replicate (DDP) or shard (FSDP2, per decoder layer then the whole model)."""
    model.to(device)
    if not is_distributed():
        return model
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # transformers names the blocks that must not be split; those are the FSDP units.
    unit_names = set(getattr(_hf_model(model), "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in unit_names:
            fully_shard(module)
    fully_shard(model)
    return model


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    # peft wraps the transformers model: PeftModel.base_model.model
    return getattr(getattr(model, "base_model", None), "model", model)


def sync_gradients(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on micro-batches that only accumulate."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights that training changes, on CPU; complete on rank 0."""
    trainable = {_strip(n) for n, p in model.named_parameters() if p.requires_grad}
    if is_distributed():
        state = get_model_state_dict(model, options=_FULL)
    else:
        state = {_strip(k): v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if k in trainable}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP's and torch.compile's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _strip(name: str) -> str:
    # DDP adds "module.", torch.compile "_orig_mod."; checkpoints use the model's own names
    return name.replace("_orig_mod.", "").removeprefix("module.")


def optimizer_state(model, optimizer) -> dict:
    if is_distributed():
        return get_optimizer_state_dict(model, optimizer, options=_FULL)
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if is_distributed():
        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
