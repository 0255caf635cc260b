"""Group Relative Policy Optimization (Shao et al. 2024) and the variants' loss aggregations:
rewards a program checks (attune.train.rewards), normalised within each prompt's group of
completions, a clipped policy ratio, a KL penalty to the reference policy.

    method.objective: grpo       # data.format: prompts; method.rewards: [{function: ...}, ...]

Each step, every rank takes its micro-batches of prompts, has the rollout engines sample
`num_generations` completions of each (attune.train.rollouts), scores them with the recipe's
rewards, and trains on them; then rank 0 pushes the new weights to the engines (`GRPOOnline`).

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

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from attune.config import ConfigError, StrictConfig
from attune.train import parallel
from attune.train.methods.base import ADAPTERS_OFF, FROZEN_COPY, Method
from attune.train.methods.dpo import adapters_off
from attune.train.rewards import RewardConfig, RewardError, load_rewards, score
from attune.train.rollouts import Adapter, EngineSpec, Rollouts
from attune.train.tokenizing import IGNORE


class GRPOOptions(StrictConfig):
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (a group); "
                                 "advantages are each completion's reward against its group's.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    max_completion_tokens: int = Field(64, ge=1, description="Longest completion sampled, in "
                                       "tokens (also dr_grpo's normaliser).")
    epsilon: float = Field(0.2, gt=0, description="The policy ratio is clipped to 1 - epsilon.")
    epsilon_high: float | None = Field(None, gt=0, description="Its upper clip, 1 + epsilon_high "
                                       "(DAPO's clip-higher); None: epsilon.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference policy "
                        "(0: no reference model at all).")
    loss_aggregation: Literal["sequence", "token", "dr_grpo"] = Field(
        "token", description="sequence: each completion's mean token loss, averaged (the GRPO "
        "paper); token: every completion token of the step weighs the same (DAPO); dr_grpo: the "
        "token sum over completions x max_completion_tokens (Dr. GRPO, no length bias).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the standard deviation of the group's rewards, "
        "of the whole batch's, or not at all (Dr. GRPO).")
    importance_sampling_cap: float | None = Field(
        3.0, gt=0, description="Truncated importance sampling: weigh each token by the trainer's "
        "over the engine's probability, capped here, for the two computing log-probs apart. "
        "None: no correction.")
    rewards: list[RewardConfig] = Field(
        default_factory=list, min_length=1, description="The reward functions, summed with their "
        "weights: built-ins or your own module:function (attune.train.rewards).")
    sync_every: int = Field(1, ge=1, description="Push the trained weights to the engines every "
                            "this many steps (1: every step, fully on-policy).")
    weight_sync: Literal["object_store", "nccl"] = Field(
        "object_store", description="How weights reach the engines: through Ray's object store "
        "into vLLM's in-place reload (anywhere; LoRA sends only the adapter), or over NCCL with "
        "vLLM's weight transfer API (full fine-tunes on GPUs; no copy through host memory).")
    num_engines: int = Field(1, ge=1, description="vLLM rollout engines, each a Ray actor in its "
                             "own placement-group bundle.")
    engine_cpus: float = Field(1, gt=0, description="CPUs in each engine's bundle.")
    engine_gpus: float = Field(0, ge=0, description="GPUs in each engine's bundle (0: on CPU). "
                               "A fraction shares a GPU with a training worker that takes a "
                               "fraction too (scaling.gpus_per_worker: 0.5).")
    engine_memory_fraction: float = Field(
        0.3, gt=0, le=0.95, description="Share of its GPU's memory an engine takes (vLLM's "
        "gpu_memory_utilization): its weights and KV cache. Where engines share the training "
        "workers' GPUs (engine_gpus < 1) the memory plan counts their weights and a step's KV cache.")
    engine_sleep: bool = Field(
        False, description="Engines that share the workers' GPUs (engine_gpus < 1) give them back "
        "for each update: vLLM's sleep mode drops the KV cache and moves the weights to host "
        "memory after the rollouts, and wakes them for the weight sync (GPUs only).")
    engine_placement: Literal["pack", "spread"] = Field(
        "pack", description="The engines' placement group: pack (as few nodes as fit, beside "
        "the trainers where they fit) or spread (one per node as far as they go).")


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

    def __init__(self, options: GRPOOptions, reference: Callable[..., torch.Tensor] | None = None):
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


class GRPO(Method):
    name = "grpo"
    formats = ("prompts",)
    Options = GRPOOptions
    packs = False  # a prompt is one row, sampled from as a whole

    def sequences_per_example(self, recipe):
        return recipe.method.options.num_generations

    def rows(self, records, tokenizer, max_seq_len, packing):
        return [prompt_row(r, tokenizer, max_seq_len) for r in records]

    def check(self, recipe, records):
        """Every reward imports, and scores every line with an empty completion (which a model
        may well sample) without raising: a missing field is found before the engines start."""
        o = recipe.method.options
        if o.weight_sync == "nccl" and not (o.engine_gpus >= 1 and recipe.scaling.gpus_per_worker):
            raise ConfigError("method.weight_sync: nccl sends weights GPU to GPU: give the engines "
                              "GPUs of their own (method.engine_gpus: 1) and the workers GPUs "
                              "(scaling.gpus_per_worker), or use object_store")
        if o.engine_sleep and not o.engine_gpus:
            raise ConfigError("method.engine_sleep: vLLM's sleep mode frees GPU memory; the "
                              "engines run on CPU (method.engine_gpus: 0)")
        if o.weight_sync == "nccl" and recipe.method.type == "lora":
            raise ConfigError("method.weight_sync: nccl sends full weights; LoRA sends its adapter "
                              "through the object store (weight_sync: object_store)")
        rewards = load_rewards(o.rewards)
        for r in records:
            try:
                score(rewards, prompt_text(r.messages), "", r.fields or {}, r.source)
            except RewardError as e:
                raise ConfigError(f"{e} (tried with an empty completion before training)") from None

    def reference(self, recipe):
        if not recipe.method.options.beta:
            return None
        return FROZEN_COPY if recipe.method.type == "full" else ADAPTERS_OFF

    def objective(self, recipe, model, reference):
        if reference is None and self.reference(recipe) == ADAPTERS_OFF:
            def reference(**inputs):
                with adapters_off(model):
                    return model(**inputs)
        return GRPOLoss(recipe.method.options, reference)

    def engines(self, recipe):
        o = recipe.method.options
        return EngineSpec(count=o.num_engines, cpus=o.engine_cpus, gpus=o.engine_gpus,
                          memory_fraction=o.engine_memory_fraction, weight_sync=o.weight_sync,
                          sleep=o.engine_sleep,
                          strategy=o.engine_placement.upper(), max_model_len=recipe.data.max_seq_len,
                          seed=recipe.optim.seed)

    def online(self, recipe, rollouts):
        return GRPOOnline(recipe, rollouts)

    def memory_terms(self, shape, recipe, sizes):
        terms = super().memory_terms(shape, recipe, sizes)  # the reference copy, with beta
        o = recipe.method.options
        beside = recipe.scaling.gpus_per_worker and 0 < o.engine_gpus < 1
        if beside and not o.engine_sleep:  # an engine awake beside a worker through its update
            per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2  # K and V, bf16
            sequences = recipe.optim.micro_batch_size * o.num_generations
            terms["engine weights (bf16)"] = shape.params * 2
            terms["engine KV cache"] = (
                per_token * sequences * recipe.data.max_seq_len)
        return terms


def prompt_row(record, tokenizer, max_seq_len: int) -> dict:
    """A prompt's tokens (padded to max_seq_len), its text for the rewards, the line's other fields."""
    ids = tokenizer.apply_chat_template(record.messages, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    if len(ids) >= max_seq_len:
        raise ValueError(f"{record.source}: the prompt's {len(ids)} tokens leave no room for a "
                         f"completion within data.max_seq_len {max_seq_len}")
    return {"prompt_ids": np.array(ids + [0] * (max_seq_len - len(ids)), dtype=np.int64),
            "prompt_len": np.int64(len(ids)), "num_tokens": np.int64(len(ids)),
            "prompt_text": np.str_(prompt_text(record.messages)),
            "fields": np.str_(json.dumps(record.fields or {})), "source": np.str_(record.source)}


def prompt_text(messages: list[dict]) -> str:
    """What a reward gets as the prompt: the chat's last user turn."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


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
