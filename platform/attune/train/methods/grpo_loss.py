"""GRPO's loss (Shao et al. 2024) and the variants' aggregations: group-normalised advantages,
a clipped policy ratio, a KL penalty to the reference policy, truncated importance sampling.

    advantages = group_advantages(rewards, group_size=8)
    objective = GRPOLoss(GRPOOptions(...), reference)
    loss_sum, sums = objective(model, batch)   # the loop divides by objective.count(batch)

A batch holds one row per completion: prompt and completion tokens, labels on the completion
only, the completion's `advantages`, and per token (aligned with labels[:, 1:]) the
`sampling_logps` the engine reported while sampling and, where the rows are trained on more than
once, the policy's `old_logps` at rollout. The loss equals TRL's `GRPOTrainer._compute_loss` on
the same batch (tests/test_grpo.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attune.train.tokenizing import IGNORE


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Each completion's reward minus its group's mean, over the group's (or batch's) standard
    deviation (Bessel-corrected, + 1e-4 as TRL adds); rewards are grouped prompt by prompt."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale == "group":
        advantages = advantages / (grouped.std(1).repeat_interleave(group_size) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages


class GRPOLoss:
    """The clipped policy-gradient loss with a KL penalty; `reference` gives the reference
    model's per-token losses (a frozen copy, or the adapters off), needed only with beta > 0."""

    def __init__(self, options, reference: Callable[..., torch.Tensor] | None = None):
        # options: the recipe's GRPOOptions (attune.train.methods.grpo), which imports this module
        self.o, self.reference = options, reference

    def count(self, batch: dict) -> int:
        completion = batch["labels"][:, 1:] != IGNORE
        if self.o.loss_aggregation == "token":
            return int(completion.sum())
        rows = int(completion.any(1).sum())
        return rows * (self.o.max_completion_tokens if self.o.loss_aggregation == "dr_grpo" else 1)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        o = self.o
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
        mask = (batch["labels"][:, 1:] != IGNORE).float()
        logps = -model(**inputs, per_token=True)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        ratio = torch.exp(logps - old)
        clipped = torch.clamp(ratio, 1 - o.epsilon, 1 + (o.epsilon_high or o.epsilon))
        advantages = batch["advantages"].unsqueeze(1)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        sums = {}
        if o.importance_sampling_cap is not None and "sampling_logps" in batch:
            weight = torch.clamp(torch.exp(old - batch["sampling_logps"]), max=o.importance_sampling_cap)
            per_token = per_token * weight
            sums["logp_gap"] = self._aggregate((old - batch["sampling_logps"]).abs(), mask)
        if o.beta:
            with torch.no_grad():
                reference = -self.reference(**inputs, per_token=True)
            kl = torch.exp(reference - logps) - (reference - logps) - 1
            per_token = per_token + o.beta * kl
            sums["kl"] = self._aggregate(kl.detach(), mask)
        was_clipped = ((ratio < 1 - o.epsilon) & (advantages < 0)) | (
            (ratio > 1 + (o.epsilon_high or o.epsilon)) & (advantages > 0))
        sums["clip_fraction"] = self._aggregate(was_clipped.float(), mask)
        return self._aggregate(per_token, mask, keep_graph=True), sums

    def _aggregate(self, values: torch.Tensor, mask: torch.Tensor, keep_graph: bool = False):
        """The sum over this batch's units (completions or tokens) that count() counts."""
        if self.o.loss_aggregation == "sequence":
            total = ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
        else:
            total = (values * mask).sum()
        return total if keep_graph else float(total)
