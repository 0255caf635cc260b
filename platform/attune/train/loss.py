"""The next-token loss, inside the module that DDP, FSDP and torch.compile wrap.

    model = CausalLMLoss(hf_or_peft_model, chunk_tokens=1024, autocast_dtype=None)
    loss_sum, labelled = model(input_ids=..., position_ids=..., labels=...)

With `chunk_tokens`, the output layer and the cross-entropy run on that many labelled tokens at
a time and are recomputed in the backward pass, so the [tokens, vocab] logits (and their fp32
copy) never exist at once; unlabelled positions (prompts, padding) get no logits at all.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attune.train.tokenizing import IGNORE


class CausalLMLoss(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, chunk_tokens: int | None = None,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens if chunk_tokens and _chunkable(hf_model(lm)) else None
        self.autocast_dtype = autocast_dtype  # bf16 compute over fp32 weights (not under FSDP)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                per_sequence: bool = False, per_token: bool = False):
        """Summed next-token loss over labelled tokens, and how many there were; with
        `per_sequence`, each row's summed loss (its labelled tokens' negative log-probability);
        with `per_token`, each token's as [rows, length - 1] (0 where unlabelled)."""
        targets = labels[:, 1:].flatten()
        labelled = targets != IGNORE
        with self._autocast(input_ids.device):
            if self.chunk_tokens is None:
                # use_cache=False: with a cache, transformers skips the packed-sequence mask.
                logits = self.lm(input_ids=input_ids, position_ids=position_ids,
                                 use_cache=False).logits
                losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets,
                                         ignore_index=IGNORE, reduction="none")
            else:
                losses = self._chunked_losses(input_ids, position_ids, targets, labelled)
        if per_token:
            if self.chunk_tokens:  # the chunked losses are the labelled tokens' only
                losses = losses.new_zeros(labelled.shape).masked_scatter(labelled, losses)
            return losses.view(len(labels), -1)
        if per_sequence:
            row_of = torch.arange(len(labels), device=labels.device).repeat_interleave(
                labels.shape[1] - 1)
            if self.chunk_tokens:  # the chunked losses are the labelled tokens' only
                row_of = row_of[labelled]
            return losses.new_zeros(len(labels)).index_add(0, row_of, losses)
        return losses.sum(), labelled.sum()

    def _chunked_losses(self, input_ids, position_ids, targets, labelled) -> torch.Tensor:
        """The labelled tokens' losses, the output layer run a chunk at a time."""
        hf = hf_model(self.lm)
        hidden = hf.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        hidden = hidden[:, :-1].flatten(0, 1)[labelled]
        targets = targets[labelled]
        head = hf.get_output_embeddings()
        return torch.cat([checkpoint(_chunk_losses, hidden[start:start + self.chunk_tokens],
                                     targets[start:start + self.chunk_tokens], head.weight,
                                     head.bias, use_reentrant=False)
                          for start in range(0, len(targets), self.chunk_tokens)]
                         or [hidden.new_zeros(0, dtype=torch.float32)])

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def _chunk_losses(hidden, targets, weight, bias):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under peft's wrappers (PeftModel.base_model.model)."""
    return getattr(getattr(model, "base_model", None), "model", model)


def _chunkable(hf) -> bool:
    # Models that reshape their logits (soft-capping, scaling) keep transformers' own head.
    config = hf.config
    return (hasattr(hf, "get_decoder") and hf.get_output_embeddings() is not None
            and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logits_scaling", 1) == 1)
