"""Supervised fine-tuning: the next-token loss on the answers (or on all of a `text` record)."""

from __future__ import annotations

import torch

from attune.train.methods.base import Method
from attune.train.rows import pack, pad
from attune.train.tokenizing import IGNORE, tokenize


class NextTokenLoss:
    """The mean loss over every labelled token."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        total, _ = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         labels=batch["labels"])
        return total, {}


class SFT(Method):
    name = "sft"
    formats = ("messages", "prompt_completion", "alpaca", "text")

    def rows(self, records, tokenizer, max_seq_len, packing):
        samples = [tokenize(r, tokenizer, max_seq_len) for r in records]
        return (pack if packing else pad)(samples, max_seq_len, tokenizer.pad_token_id)

    def objective(self, recipe, model, reference):
        return NextTokenLoss()
