"""The model a worker trains: the base model (with fresh LoRA adapters for a LoRA run) inside
its loss, compiled, wrapped for DDP or FSDP2, with its weights on every rank.

    model = placed_model(recipe, base_path, device)               # what the loop trains
    reference = placed_model(recipe, base_path, device, frozen=True)   # a frozen copy (DPO)
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import is_flash_attn_2_available

from attune.modeling import load_model, training_dtype
from attune.recipe import Recipe
from attune.train import parallel
from attune.train.loss import CausalLMLoss


def build_model(recipe: Recipe, base_path: str, device: torch.device, on_meta: bool = False,
                frozen: bool = False) -> CausalLMLoss:
    """The base model (with fresh LoRA adapters for a LoRA run) inside its loss; `on_meta`
    builds the shapes only, for weights that rank 0 broadcasts; `frozen`, the base model only,
    without gradients."""
    on_gpu = device.type == "cuda"
    dtype = torch.float32 if recipe.mixed_precision else training_dtype(recipe.model.dtype, on_gpu)
    attn = attention_implementation(recipe.model.attn_implementation, on_gpu)
    if on_meta:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path),
                                                  dtype=dtype, attn_implementation=attn)
    else:
        lm = load_model(base_path, dtype, attn)
    if frozen:
        lm.requires_grad_(False)
    elif recipe.activation_checkpointing:
        lm.gradient_checkpointing_enable({"use_reentrant": False})
    if recipe.method.type == "lora" and not frozen:
        m = recipe.method
        lm = get_peft_model(lm, LoraConfig(
            r=m.rank, lora_alpha=m.alpha, lora_dropout=m.dropout,
            target_modules=m.target_modules, task_type="CAUSAL_LM"))
    # Under FSDP its MixedPrecisionPolicy casts; elsewhere autocast does.
    autocast = (torch.bfloat16 if recipe.mixed_precision
                and not parallel.shards(recipe.scaling.strategy) else None)
    return CausalLMLoss(lm, recipe.memory.loss_chunk_tokens, autocast)


def attention_implementation(setting: str, on_gpu: bool) -> str:
    """'auto': flash_attention_2 on GPU where flash-attn is installed (packed rows then attend
    through variable-length kernels, from the positions' restarts), else SDPA with a mask."""
    if setting != "auto":
        return setting
    return "flash_attention_2" if on_gpu and is_flash_attn_2_available() else "sdpa"


def placed_model(recipe: Recipe, base_path: str, device: torch.device, frozen: bool = False):
    """The model built, compiled, sharded or replicated, with its weights on every rank.
    `frozen`: DPO's reference for full fine-tuning (no adapters, no gradients)."""
    # Rank 0 reads the weights; the other ranks build on meta and get them by broadcast.
    from_rank0 = recipe.memory.load_on_rank0 and parallel.world_size() > 1
    model = build_model(recipe, base_path, device, on_meta=from_rank0 and parallel.rank() != 0,
                        frozen=frozen)
    full_state = model.state_dict() if from_rank0 and parallel.rank() == 0 else None
    if recipe.model.compile:
        # Block by block, the way FSDP2 and activation checkpointing take them; their hooks and
        # the loss's data-dependent chunks stay outside the compiled graphs.
        for block in parallel.decoder_blocks(model):
            block.forward = torch.compile(block.forward)
    model = parallel.wrap(model, recipe.scaling.strategy, device, frozen=frozen,
                          mixed_precision=recipe.mixed_precision,
                          cpu_offload=recipe.memory.cpu_offload)
    if from_rank0 and (frozen or parallel.shards(recipe.scaling.strategy)):
        parallel.broadcast_from_rank0(model, full_state)  # DDP's constructor did it otherwise
    return model
