"""GRPO: attune's loss against TRL's on the same batch and model, to 1e-5, for each loss
aggregation, with clipping, the KL penalty and truncated importance sampling all active; the
group advantages as TRL computes them; the rewards and their one-line errors.

    pytest tests/test_grpo.py

TRL (a test dependency only) computes its loss in `GRPOTrainer._compute_loss`, its per-token
log-probabilities through its fused LM head; it runs on a stand-in for the trainer object that
holds the settings and metrics that method reads, as tests/test_dpo.py does for DPO.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from types import MethodType, SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from trl_reference import lora_policy, trl_trainers

from attune.config import ConfigError
from attune.train.loss import CausalLMLoss
from attune.train.methods.dpo import adapters_off
from attune.train.methods.grpo import GRPOLoss, GRPOOptions, group_advantages
from attune.train.rewards import RewardConfig, RewardError, load_rewards, score
from attune.train.tokenizing import IGNORE


_, GRPOTrainer = trl_trainers()
from trl.trainer.utils import nanstd  # noqa: E402 (TRL's import kept the environment above)
PROMPT = [{"role": "user", "content": "How many layers does BERT-base have?"}]
# one group: four completions of different lengths for one prompt
COMPLETIONS = ["12.", "BERT-base has 12 layers.", "24.", "It has twelve encoder layers, like GPT-1."]
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.5])
TRL_AGGREGATION = {"sequence": "grpo", "token": "dapo", "dr_grpo": "dr_grpo"}


@pytest.fixture(scope="module")
def lora_model(tiny_base):
    return lora_policy(tiny_base)


def rollout_batch(tokenizer) -> tuple[dict, int, int]:
    """attune's rows: the prompt then a completion, labels on the completion, right-padded;
    and the prompt's and the longest completion's lengths."""
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for text in COMPLETIONS]
    longest = max(len(c) for c in completions)
    rows = [prompt + c + [tokenizer.pad_token_id] * (longest - len(c)) for c in completions]
    labels = [[IGNORE] * len(prompt) + c + [IGNORE] * (longest - len(c)) for c in completions]
    ids = torch.tensor(rows)
    return {"input_ids": ids, "labels": torch.tensor(labels),
            "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}, len(prompt), longest


def trl_loss(model, batch: dict, prompt_len: int, length: int, o: GRPOOptions) -> float:
    """TRL's loss through its own `_compute_loss`, fed the same tensors as attune's rows."""
    completion = slice(prompt_len - 1, prompt_len - 1 + length)  # labels[:, 1:] -> completion
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext,
                                  gather=lambda t: t, gather_for_metrics=lambda t: t,
                                  reduce=lambda t, reduction=None: t, is_main_process=True,
                                  num_processes=1)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, beta=o.beta, loss_type=TRL_AGGREGATION[o.loss_aggregation],
        epsilon_low=o.epsilon, epsilon_high=o.epsilon_high or o.epsilon, top_entropy_quantile=1.0,
        aux_loss_enabled=False, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=True, vllm_importance_sampling_correction=True, _entropy_bonus_enabled=False,
        max_completion_length=o.max_completion_tokens, current_gradient_accumulation_steps=1,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False), _metrics={
            "train": defaultdict(list), "eval": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = MethodType(
        GRPOTrainer._get_per_token_logps_and_entropies, trainer)
    completion_mask = (batch["labels"][:, prompt_len:] != IGNORE).long()
    ratio = torch.clamp(torch.exp(batch["old_logps"] - batch["sampling_logps"]),
                        max=o.importance_sampling_cap)
    inputs = {"prompt_ids": batch["input_ids"][:, :prompt_len],
              "prompt_mask": torch.ones_like(batch["input_ids"][:, :prompt_len]),
              "completion_ids": batch["input_ids"][:, prompt_len:], "completion_mask": completion_mask,
              "advantages": batch["advantages"], "old_per_token_logps": batch["old_logps"][:, completion],
              "ref_per_token_logps": batch["ref_logps"][:, completion],
              "importance_sampling_ratio": ratio[:, completion],
              "num_items_in_batch": completion_mask.sum()}
    return float(GRPOTrainer._compute_loss(trainer, model, inputs))


@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_the_grpo_loss_equals_trls(lora_model, tiny_base, aggregation, chunk_tokens):
    batch, prompt_len, length = rollout_batch(AutoTokenizer.from_pretrained(tiny_base))
    model = CausalLMLoss(lora_model, chunk_tokens)
    mask = batch["labels"][:, 1:] != IGNORE
    generator = torch.Generator().manual_seed(1)

    def near(logps, spread):  # other log-probs of the same tokens: a ratio away from 1, clipped
        return torch.where(mask, logps + spread * torch.randn(logps.shape, generator=generator), 0.0)

    def reference(**inputs):
        with adapters_off(model):
            return model(**inputs)

    o = GRPOOptions(loss_aggregation=aggregation, beta=0.04, epsilon=0.2, epsilon_high=0.28,
                    max_completion_tokens=16, importance_sampling_cap=2.0)
    with torch.no_grad():
        policy = -model(**batch, per_token=True)
        batch |= {"advantages": group_advantages(REWARDS, group_size=4),
                  "old_logps": near(policy, 0.3), "sampling_logps": near(policy, 0.5),
                  "ref_logps": -reference(**batch, per_token=True)}
        objective = GRPOLoss(o, reference)
        total, sums = objective(model, batch)
        expected = trl_loss(lora_model, batch, prompt_len, length, o)
    assert float(total) / objective.count(batch) == pytest.approx(expected, abs=1e-5)
    assert 0 < sums["clip_fraction"] < objective.count(batch)  # the clip was exercised
    assert sums["kl"] > 0 and sums["logp_gap"] > 0


def test_group_advantages_are_trls():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 1.0])
    grouped = rewards.view(-1, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4), expected.flatten())
    assert torch.allclose(group_advantages(rewards, 4, scale="none"),
                          (grouped - grouped.mean(1, keepdim=True)).flatten())
    # a group whose rewards are all equal teaches nothing
    assert torch.equal(group_advantages(torch.ones(4), 4), torch.zeros(4))


def test_the_built_in_rewards():
    rewards = load_rewards([RewardConfig(function="contains_answer"),
                            RewardConfig(function="matches_format", args={"pattern": r"[A-Z].*\."}),
                            RewardConfig(function="length_penalty", args={"max_chars": 10})])
    assert score(rewards, "q", "BERT-base has 12 layers.", {"answer": "12"}, "qa.jsonl:1") == [
        1.0, 1.0, -1.4]
    assert score(rewards, "q", "twelve", {"answer": "12"}, "qa.jsonl:1") == [0.0, 0.0, 0.0]
    numeric, exact = load_rewards([RewardConfig(function="numeric_match"),
                                   RewardConfig(function="exact_match", args={"field": "label"})])
    assert score([numeric, exact], "q", "it is 1,024", {"answer": "1024", "label": "It is 1,024 "},
                 "x:1") == [1.0, 1.0]


def test_a_reward_that_fails_is_one_line_naming_it_and_the_example(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def broken(prompt, completion, **fields):\n    return fields['missing']\n\n"
        "def not_a_number(prompt, completion, **fields):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken, text = load_rewards([RewardConfig(function="my_rewards:broken"),
                                 RewardConfig(function="my_rewards:not_a_number")])
    with pytest.raises(RewardError, match=r"^reward my_rewards:broken on qa.jsonl:7: raised "
                                          r"KeyError: 'missing'$"):
        score([broken], "q", "a", {}, "qa.jsonl:7")
    with pytest.raises(RewardError, match=r"^reward my_rewards:not_a_number on qa.jsonl:7: "
                                          r"returned 'high', not a finite number$"):
        score([text], "q", "a", {}, "qa.jsonl:7")
    with pytest.raises(ConfigError, match=r"method.rewards\[0\].function: cannot import "
                                          r"no_such_module"):
        load_rewards([RewardConfig(function="no_such_module:f")])
    with pytest.raises(ConfigError, match=r"method.rewards\[0\].function: 'exactmatch' is neither "
                                          r"a built-in reward"):
        load_rewards([RewardConfig(function="exactmatch")])


def test_the_rollout_engine_answers_every_call_of_vllms_weight_sync_client():
    """`weight_sync: nccl` drives the engines with vLLM's own RayVLLMWeightSyncClient, which calls
    these methods on each actor handle; a vLLM that renames one fails here, not on a GPU cluster."""
    import inspect

    from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient

    from attune.train.rollouts import RolloutEngine

    called = {name for name, _ in inspect.getmembers(RayVLLMWeightSyncClient, inspect.isfunction)
              if not name.startswith("_")}
    assert {"init_weight_transfer_engine", "start_weight_update", "update_weights",
            "finish_weight_update"} <= called
    assert all(callable(getattr(RolloutEngine, name, None)) for name in called), called
    # and vLLM's sleep mode, for engines beside the workers on their GPUs
    from vllm import LLM

    assert {"sleep", "wake_up"} <= set(dir(LLM)) and {"sleep", "wake_up"} <= set(dir(RolloutEngine))


@pytest.mark.parametrize("overrides, message", [
    (["method.weight_sync=nccl"], "method.weight_sync: nccl sends weights GPU to GPU"),
    (["method.weight_sync=nccl", "method.type=lora", "method.engine_gpus=1",
      "scaling.gpus_per_worker=1"], "LoRA sends its adapter through the object store"),
    (["method.engine_sleep=true"], "vLLM's sleep mode frees GPU memory; the engines run on CPU"),
])
def test_gpu_only_engine_settings_are_refused_where_they_cannot_run(tiny_base, overrides, message):
    from attune.recipe import load_recipe
    from attune.train.preflight import check_recipe

    recipe = load_recipe("recipes/tiny-grpo.yaml", [f"model.name_or_path={tiny_base}", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_recipe(recipe)
