"""GRPO's step around the loop's (`GRPOOnline`): each rank's prompts -> rollouts from the engines
-> rewards -> group advantages -> training rows; after the update, the new weights to the
engines (rank 0, every `sync_every` steps), restarted engines synced again, the step's metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator

import torch

from attune.train import parallel
from attune.train.methods.grpo_loss import group_advantages
from attune.train.rewards import load_rewards, score
from attune.train.rollouts import Adapter, Rollouts
from attune.train.tokenizing import IGNORE


class GRPOOnline:
    """GRPO's step, around the loop's: prompts -> rollouts -> rewards -> advantages -> training
    rows; after the update, the new weights to the engines (rank 0, every `sync_every` steps)."""

    def __init__(self, recipe, rollouts: Rollouts):
        self.o, self.recipe, self.rollouts = recipe.method.options, recipe, rollouts
        self.rewards = load_rewards(self.o.rewards)
        self.max_len = recipe.data.max_seq_len
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.step_start = time.perf_counter()

    def start(self, model, step: int) -> None:
        self.device = next(model.parameters()).device  # for the ranks' sums
        if step > 0:  # resumed: the engines have the base model's weights (or older ones)
            self._sync(model, step)
        self.step_start = time.perf_counter()

    def batches(self, data_batches: Iterator[dict]) -> Iterator[dict]:
        accumulate = self.recipe.optim.grad_accum_steps
        for i, prompts in enumerate(data_batches):
            if i % accumulate == 0:  # a step's first micro-batch: its time starts here, not at
                self.step_start = time.perf_counter()  # the last one's end (eval, checkpoints)
            batch = self._experience(prompts, self.o.temperature)
            if self.o.engine_sleep and i % accumulate == accumulate - 1:
                parallel.barrier()  # every rank sampled this step's completions
                if parallel.rank() == 0:
                    self.rollouts.sleep()
            yield batch

    def after_step(self, model, step: int) -> None:
        if self.o.engine_sleep and parallel.rank() == 0:
            self.rollouts.wake(["weights"])  # the weights on the GPU again, for the sync
        # An engine whose process died came back (Ray restarts it) with the base weights.
        stale = self.rollouts.stale() if parallel.rank() == 0 else []
        if stale and self.o.weight_sync == "nccl":
            # Its NCCL group went with its process: a restart of the workers (Ray Train's
            # FailureConfig) resumes from the last checkpoint with new engines and a new group.
            raise RuntimeError(f"rollout engine(s) {stale} restarted; under weight_sync nccl the "
                               "run restarts its workers from the last checkpoint")
        if step % self.o.sync_every == 0:
            self._sync(model, step)  # every engine, the restarted ones too
        elif stale:
            self.rollouts.resync(stale)
        if self.o.engine_sleep and parallel.rank() == 0:
            self.rollouts.wake(["kv_cache"])  # and room to sample the next step's completions
        # every rank reports them, and none samples before every engine has this step's weights
        (restarts,) = parallel.all_reduce_sum([self.rollouts.restarts], self.device)
        self._add("engine_restarts", restarts, per_step=True)
        seconds = self.rollouts.take_seconds()
        total = time.perf_counter() - self.step_start
        self._add("time/rollout_s", seconds["rollout"], per_step=True)
        self._add("time/sync_s", seconds["sync"], per_step=True)
        self._add("time/update_s", total - seconds["rollout"] - seconds["sync"], per_step=True)

    def take_metrics(self) -> dict[str, float]:
        metrics = {k: v / max(self.counts[k], 1) for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return metrics

    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """The mean reward of samples of the held-out prompts; every rank gets the same rows, so
        each samples its share of them and the sums are added up."""
        rank, world = parallel.rank(), parallel.world_size()
        sums = [0.0] * (len(self.rewards) + 2)  # weighted total, each reward, completions
        for i, prompts in enumerate(batches):
            if i % world != rank:
                continue
            _, scores = self._sample(prompts, self.o.temperature)
            for per_reward in (s for group in scores for s in group):
                sums[0] += sum(r.weight * v for r, v in zip(self.rewards, per_reward))
                for j, v in enumerate(per_reward):
                    sums[1 + j] += v
                sums[-1] += 1
        total, *each, count = parallel.all_reduce_sum(sums, self.device)
        return {"eval_reward": total / max(count, 1),
                **{f"eval_reward/{r.name}": v / max(count, 1) for r, v in zip(self.rewards, each)}}

    def _sync(self, model, step: int) -> None:
        if self.o.weight_sync == "nccl":
            self.rollouts.sync_nccl(parallel.unwrap(model), version=step)
            return
        start = time.perf_counter()
        weights = engine_weights(model, self.recipe)  # every rank: gathered under FSDP
        self.rollouts.seconds["sync"] += time.perf_counter() - start  # copying out is syncing too
        if parallel.rank() == 0:
            self.rollouts.sync(weights, version=step)
        self.rollouts.version = step

    def _sample(self, prompts: dict, temperature: float):
        lengths = prompts["prompt_len"].tolist()
        ids = [row[:n].tolist() for row, n in zip(prompts["prompt_ids"], lengths)]
        most = min(self.o.max_completion_tokens, self.max_len - max(lengths))
        groups = self.rollouts.generate(ids, n=self.o.num_generations, temperature=temperature,
                                        max_tokens=most)
        scores = [[score(self.rewards, str(text), c.text, json.loads(str(fields)), str(source))
                   for c in group]
                  for group, text, fields, source in zip(groups, prompts["prompt_text"],
                                                         prompts["fields"], prompts["source"])]
        return groups, scores

    def _experience(self, prompts: dict, temperature: float) -> dict:
        start = time.perf_counter()
        groups, scores = self._sample(prompts, temperature)
        weights = torch.tensor([r.weight for r in self.rewards])
        per_reward = torch.tensor([s for group in scores for s in group])  # [completions, rewards]
        rewards = per_reward @ weights
        advantages = group_advantages(rewards, self.o.num_generations, self.o.scale_rewards)
        completions = [c for group in groups for c in group]
        tokens = sum(len(c.token_ids) for c in completions)
        self._add("reward", float(rewards.mean()))
        self._add("reward_std", float(rewards.view(-1, self.o.num_generations).std(1).mean()))
        for reward, values in zip(self.rewards, per_reward.T):
            self._add(f"reward/{reward.name}", float(values.mean()))
        self._add("completion_tokens", tokens / len(completions))
        self._add("completions_finished", sum(c.finished for c in completions) / len(completions))
        self._add("rollout_tokens_per_s", tokens / max(time.perf_counter() - start, 1e-9))
        lengths = prompts["prompt_len"].tolist()
        prompt_ids = [row[:n].tolist() for row, n in zip(prompts["prompt_ids"], lengths)
                      for _ in range(self.o.num_generations)]
        return completion_batch(prompt_ids, completions, advantages)

    def _add(self, name: str, value: float, per_step: bool = False) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = 1 if per_step else self.counts.get(name, 0) + 1


def completion_batch(prompt_ids: list[list[int]], completions: list, advantages: torch.Tensor) -> dict:
    """One row per completion, right-padded to the longest: labels on the completion only, the
    engine's log-probabilities aligned with labels[:, 1:]."""
    length = max(len(p) + len(c.token_ids) for p, c in zip(prompt_ids, completions))
    ids = torch.zeros(len(completions), length, dtype=torch.long)
    labels = torch.full((len(completions), length), IGNORE, dtype=torch.long)
    sampling = torch.zeros(len(completions), length - 1)
    for i, (prompt, c) in enumerate(zip(prompt_ids, completions)):
        p, n = len(prompt), len(c.token_ids)
        ids[i, :p + n] = torch.tensor(prompt + c.token_ids)
        labels[i, p:p + n] = torch.tensor(c.token_ids)
        sampling[i, p - 1:p - 1 + n] = torch.tensor(c.logprobs)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).expand_as(ids),
            "advantages": advantages.float(), "sampling_logps": sampling,
            "num_tokens": torch.tensor([len(p) + len(c.token_ids) for p, c in zip(prompt_ids, completions)])}


def engine_weights(model, recipe) -> "dict | Adapter":
    """What the engines need from the model: the full weights, or LoRA's adapter alone."""
    weights = parallel.trainable_state_dict(model)
    if recipe.method.type != "lora":
        return weights
    return Adapter({k.replace(".default.", "."): v for k, v in weights.items()},
                   scale=recipe.method.alpha / recipe.method.rank)
