"""What a training step minimises: the next-token loss (SFT) or DPO's preference loss.

    objective = objective_for(recipe, model, reference)
    loss_sum, sums = objective(model, batch)    # the loop divides by objective.count over all ranks

Each returns a sum over its units (labelled tokens for SFT, preference pairs for DPO) and the
loop scales by the count over every rank, so micro-batches, accumulation and workers weigh each
unit alike. `sums` are more per-unit sums to report as means (DPO's reward accuracy and margin).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attune.loss import IGNORE
from attune.parallel import unwrap


class NextTokenLoss:
    """Supervised fine-tuning: the mean loss over every labelled token."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        total, _ = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         labels=batch["labels"])
        return total, {}


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


def objective_for(recipe, model, reference_model=None):
    """The recipe's objective. DPO's reference: the separate frozen model for full fine-tuning;
    under LoRA the same model with its adapters switched off (no second copy)."""
    if recipe.method.objective == "sft":
        return NextTokenLoss()
    if reference_model is not None:
        reference = reference_model
    else:
        def reference(**inputs):
            with adapters_off(model):
                return model(**inputs)
    m = recipe.method
    return DPOLoss(m.beta, m.preference_loss, reference, sft_weight=m.sft_weight)


@contextlib.contextmanager
def adapters_off(model):
    with unwrap(model).disable_adapter():
        yield
