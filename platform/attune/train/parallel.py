"""Data parallelism for the training loop: DDP or FSDP2, and the state dicts that go with them.

All of it is a no-op when torch.distributed is not initialised, so the loop runs alone too.
Applied in one fixed order: LoRA and activation checkpointing first (by the caller), then
sharding or replication, then the weights broadcast from rank 0 into ranks built on meta.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from attune.train.loss import hf_model


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` on every rank (anything picklable: Ray actor handles too)."""
    if world_size() == 1:
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shards(strategy: str) -> bool:
    """Whether `wrap` shards with FSDP2 (which then owns mixed precision and offloading)."""
    return is_distributed() and strategy == "fsdp"


def wrap(model: torch.nn.Module, strategy: str, device: torch.device, *, frozen: bool = False,
         mixed_precision: bool = False, cpu_offload: bool = False) -> torch.nn.Module:
    """Replicate (DDP) or shard (FSDP2, per decoder layer then the whole model); a `frozen` model
    (no gradients) is sharded likewise but not replicated by DDP. A model built on the meta
    device gets empty storage here; `broadcast_from_rank0` fills it."""
    on_meta = any(p.is_meta for p in model.parameters())
    if not shards(strategy):
        model = _materialized(model, device) if on_meta else model.to(device)
        # One rank has nothing to replicate: DDP would only copy every gradient into its buckets
        # and all-reduce them with itself (a Ray Train worker alone is still distributed).
        if world_size() == 1 or frozen:
            return model
        # DDP's constructor broadcasts rank 0's parameters and buffers to every rank.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    options = {}
    if mixed_precision:  # bf16 compute; fp32 master weights stay sharded, gradients reduce in fp32
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # fully_shard moves each unit to the device before it keeps its shard (or offloads it).
    for block in decoder_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    if on_meta:
        _materialized(model, "cpu" if cpu_offload else device)
        if cpu_offload:  # the shards live on the host; buffers (rotary frequencies) on the device
            for module in model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    setattr(module, name, buffer.to(device))
    return model


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, which transformers names as not to be split: FSDP's units,
    and what torch.compile compiles one by one."""
    names = set(getattr(hf_model(model.lm), "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def _materialized(model: torch.nn.Module, device) -> torch.nn.Module:
    """Empty storage for a model built on meta; tied weights (Qwen2's embeddings and output
    layer) get one storage again, as to_empty gives each module its own."""
    model.to_empty(device=device)
    hf_model(model.lm).tie_weights()
    return model


def broadcast_from_rank0(model: torch.nn.Module, full_state: dict | None) -> None:
    """Rank 0's weights (read before sharding) into every rank's shards, and its buffers (such as
    rotary frequencies, which no state dict holds) into every rank (collective)."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        set_model_state_dict(model, full_state or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
    else:  # replicated, not sharded: every rank's whole copy
        for param in model.parameters():
            dist.broadcast(param.detach(), src=0)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


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
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {_strip(k): v for k, v in state.items() if _strip(k) in trainable}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers (or peft) model under the loss and DDP's wrappers."""
    return getattr(model, "module", model).lm


def _strip(name: str) -> str:
    # DDP adds "module.", the loss "lm."; checkpoints use the model's own names
    return name.removeprefix("module.").removeprefix("lm.")
