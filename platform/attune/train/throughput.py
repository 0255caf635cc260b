"""Throughput accounting: tokens per second into model FLOPs utilisation (MFU) on known GPUs.

    flops = flops_per_token(model, seq_len);  peak = peak_flops(device)   # None: no MFU
"""

from __future__ import annotations

import torch

from attune.train.loss import hf_model

# Dense bf16 peak FLOP/s, for MFU; devices not listed report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def flops_per_token(model, seq_len: int) -> float:
    # Forward 2N, backward 2N through the activations and 2N' for the weight gradients (N' the
    # trainable parameters: all of them, or a LoRA run's adapters), plus attention scores:
    # 12 * layers * hidden * seq. Recomputation under activation checkpointing is not counted.
    config = hf_model(model).config
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * n + 2 * trainable + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)
