"""Group Relative Policy Optimization as a training method: rewards a program checks
(attune.train.rewards) on completions vLLM engines sample (attune.train.rollouts).

    method.objective: grpo       # data.format: prompts; method.rewards: [{function: ...}, ...]

Each step, every rank takes its micro-batches of prompts, has the rollout engines sample
`num_generations` completions of each, scores them with the recipe's rewards, and trains on them
(`grpo_online.GRPOOnline`); then rank 0 pushes the new weights to the engines. The loss is
`grpo_loss.GRPOLoss`, equal to TRL's.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import Field

from attune.config import ConfigError, StrictConfig
from attune.train.methods.base import ADAPTERS_OFF, FROZEN_COPY, Method
from attune.train.methods.dpo import adapters_off
from attune.train.methods.grpo_loss import GRPOLoss, group_advantages  # noqa: F401
from attune.train.methods.grpo_online import GRPOOnline
from attune.train.rewards import RewardConfig, RewardError, load_rewards, score
from attune.train.rollouts import EngineSpec


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
