"""TRL as the reference for attune's losses (a test dependency only): its trainers and a model
its loss methods can run on.

    DPOTrainer, GRPOTrainer = trl_trainers()
    model = lora_policy(tiny_base)    # random adapters: the policy differs from the reference
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

VLLM_LOGGING = "VLLM_LOGGING_LEVEL"


def trl_trainers():
    """TRL's DPOTrainer and GRPOTrainer, the process's environment kept: TRL's import sets
    VLLM_LOGGING_LEVEL=ERROR where it is unset (trl/_compat.py), and every vLLM engine the test
    session started afterwards inherited it, silencing the log lines other tests read."""
    before = os.environ.get(VLLM_LOGGING)
    from trl import DPOTrainer, GRPOTrainer

    if before is None:
        os.environ.pop(VLLM_LOGGING, None)
    return DPOTrainer, GRPOTrainer


def lora_policy(base_path: str):
    """The base model with random LoRA adapters (init_lora_weights=False), so the policy differs
    from the reference (the adapters off), and TRL's fused LM head, whose per-token log-probs and
    metrics TRL's loss methods read; attune's forward is the original."""
    from trl.trainer.utils import add_fused_lm_head  # after trl_trainers() kept the environment

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)).eval()
