"""Direct Preference Optimization on preference pairs (data.format: preference), against a
reference: a frozen copy of the base model for full fine-tuning, the same model with its
adapters switched off under LoRA. Each pair is one row of the chosen and one of the rejected
conversation, both labelled on the answer only; the loss equals TRL's (tests/test_dpo.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from attune.config import StrictConfig
from attune.train.methods.base import ADAPTERS_OFF, FROZEN_COPY, Method
from attune.train.parallel import unwrap
from attune.train.tokenizing import IGNORE, tokenize_chat


class DPOOptions(StrictConfig):
    beta: float = Field(0.1, gt=0, description="DPO's beta: how far the model may move from the "
                        "reference (smaller: further).")
    preference_loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="DPO's sigmoid loss, or IPO's squared loss on length-normalised "
        "log-ratios.")
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of the chosen answers' mean token loss added to the "
        "preference loss (RPO); keeps the chosen answers likely where pure DPO only pushes the "
        "rejected ones down. 0: pure DPO.")


class DPO(Method):
    name = "dpo"
    formats = ("preference",)
    Options = DPOOptions
    packs = False  # one padded row per side: the two are compared as wholes

    def sequences_per_example(self, recipe):
        return 2  # the chosen and the rejected conversation

    def rows(self, records, tokenizer, max_seq_len, packing):
        return [pair_row(tokenize_pair(r, tokenizer, max_seq_len)["sides"], max_seq_len,
                         tokenizer.pad_token_id) for r in records]

    def reference(self, recipe):
        return FROZEN_COPY if recipe.method.type == "full" else ADAPTERS_OFF

    def objective(self, recipe, model, reference):
        if reference is None:  # under LoRA: the same weights with the adapters off
            def reference(**inputs):
                with adapters_off(model):
                    return model(**inputs)
        o = recipe.method.options
        return DPOLoss(o.beta, o.preference_loss, reference, sft_weight=o.sft_weight)


class DPOLoss:
    """Direct Preference Optimization (Rafailov et al. 2023): per pair,
    -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
    over the answers' tokens; 'ipo' is IPO's squared loss on length-normalised log-ratios, as TRL
    computes it. `sft_weight` adds the chosen answer's mean token loss (RPO, Pang et al. 2024),
    which keeps the chosen answers likely while the rejected ones are pushed down. `reference`
    gives the reference model's per-row losses."""

    def __init__(self, beta: float, kind: str, reference: Callable[..., torch.Tensor],
                 sft_weight: float = 0.0):
        self.beta, self.kind, self.reference = beta, kind, reference
        self.sft_weight = sft_weight

    def count(self, batch: dict) -> int:
        return len(batch["chosen_input_ids"])

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = pair_inputs(batch)
        policy = -model(**inputs, per_sequence=True)  # each row's log-probability of its answer
        with torch.no_grad():
            reference = -self.reference(**inputs, per_sequence=True)
        chosen_ratio, rejected_ratio = (policy - reference).chunk(2)
        chosen_tokens, rejected_tokens = (inputs["labels"][:, 1:] != IGNORE).sum(1).clamp(
            min=1).chunk(2)
        if self.kind == "sigmoid":
            losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        else:  # ipo
            delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
            losses = (delta - 1 / (2 * self.beta)) ** 2
        if self.sft_weight:
            losses = losses - self.sft_weight * policy.chunk(2)[0] / chosen_tokens
        chosen_reward = self.beta * chosen_ratio.detach()
        rejected_reward = self.beta * rejected_ratio.detach()
        return losses.sum(), {
            "reward_accuracy": float((chosen_reward > rejected_reward).sum()),
            "reward_margin": float((chosen_reward - rejected_reward).sum())}


def pair_inputs(batch: dict) -> dict:
    """The chosen rows, then the rejected ones, as one batch for one forward pass."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return {"input_ids": ids, "position_ids": positions,
            "labels": torch.cat([batch["chosen_labels"], batch["rejected_labels"]])}


def tokenize_pair(record, tokenizer, max_seq_len: int) -> dict:
    """The chosen and the rejected conversation, each labelled on its answer only."""
    sides = {}
    for side in ("chosen", "rejected"):
        messages = record.messages + [{"role": "assistant", "content": getattr(record, side)}]
        ids, labels = tokenize_chat(messages, tokenizer)
        start = len(tokenizer.apply_chat_template(record.messages, tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
        labels[:start] = [IGNORE] * start  # earlier assistant turns are the prompt's
        sides[side] = (ids[:max_seq_len], labels[:max_seq_len])
    return {"sides": sides, "truncated": any(len(ids) >= max_seq_len for ids, _ in sides.values())}


def pair_row(sides: dict, length: int, pad_id: int) -> dict:
    row = {"num_tokens": np.int64(sum(len(ids) for ids, _ in sides.values()))}
    for side, (ids, labels) in sides.items():
        fill = length - len(ids)
        row[f"{side}_input_ids"] = np.array(ids + [pad_id] * fill, dtype=np.int64)
        row[f"{side}_labels"] = np.array(labels + [IGNORE] * fill, dtype=np.int64)
    return row


@contextlib.contextmanager
def adapters_off(model):
    with unwrap(model).disable_adapter():
        yield
