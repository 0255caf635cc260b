"""The method seam: a method registered from outside attune (here, SFT with label smoothing,
defined in this file) is validated with the recipe, makes the rows and is what the real
training loop minimises; the built-in methods answer the questions the loop, the data and the
memory plan ask.

    pytest tests/test_methods.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

from attune.config import ConfigError, StrictConfig
from attune.modeling import model_config
from attune.recipe import load_recipe
from attune.train import methods
from attune.train.datasets import batches, local_rows
from attune.train.loop import Loop, train_loop
from attune.train.loss import hf_model
from attune.train.memory_plan import model_shape, plan
from attune.train.methods.sft import SFT
from attune.train.parallel import unwrap
from attune.train.records import read_records
from attune.train.tokenizing import IGNORE

REPO = Path(__file__).resolve().parents[1]


class SmoothedOptions(StrictConfig):
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Share of each target's "
                                   "probability spread over the whole vocabulary.")


class SmoothedLoss:
    """Cross-entropy with label smoothing over the labelled tokens. A toy: it calls the model
    under its wrapper, so one worker only (DDP's hooks run in the wrapper's forward)."""

    def __init__(self, smoothing: float):
        self.smoothing, self.calls = smoothing, 0

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        self.calls += 1
        logits = hf_model(unwrap(model))(input_ids=batch["input_ids"],
                                         position_ids=batch["position_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, label_smoothing=self.smoothing, reduction="sum")
        # a per-unit sum the loop reports as a mean: the smoothing itself, to see it arrive
        return loss, {"smoothing": self.smoothing * self.count(batch)}


class SmoothedSFT(SFT):
    name = "sft-smoothed"
    Options = SmoothedOptions

    def objective(self, recipe, model, reference):
        self.last = SmoothedLoss(recipe.method.options.label_smoothing)
        return self.last


@pytest.fixture
def smoothed():
    method = methods.register(SmoothedSFT())
    yield method
    methods.unregister(method.name)


def recipe_with(*overrides: str):
    return load_recipe(REPO / "recipes/tiny-full.yaml", [
        "optim.max_steps=6", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=3e-3",
        "eval.every_steps=3", "eval.log_every_steps=1", "scaling.num_workers=1", *overrides])


def test_a_method_registered_from_a_test_trains_through_the_real_loop(smoothed, tiny_base):
    recipe = recipe_with("method.objective=sft-smoothed", "method.label_smoothing=0.2")
    assert recipe.method.options.label_smoothing == 0.2
    records = read_records(recipe.data.train_files, recipe.data.format)[:32]
    rows = local_rows(records, recipe.method.objective, tiny_base, None,
                      recipe.data.max_seq_len, packing=True)
    reports = []
    train_loop(recipe, tiny_base, Loop(
        train_batches=lambda epoch: batches(rows, 4, seed=epoch),
        eval_batches=lambda: batches(rows[:4], 4, seed=0),
        steps_per_epoch=math.ceil(len(rows) / 4), checkpoint_root=None,
        report=lambda metrics, checkpoint: reports.append(metrics)))
    assert [m["step"] for m in reports] == [3, 6]
    # the loop minimised the method's loss: 6 steps of one micro-batch, then an eval pass each
    # time it reported (one batch)
    assert smoothed.last.calls == 6 + 2
    assert all(m["smoothing"] == pytest.approx(0.2) for m in reports)
    assert reports[-1]["eval_loss"] < reports[0]["eval_loss"]


def test_a_methods_own_fields_are_checked_with_the_recipe(smoothed):
    with pytest.raises(ConfigError, match=r"method.label_smothing: unknown key \(did you mean "
                                          r"'label_smoothing'\?\)"):
        recipe_with("method.objective=sft-smoothed", "method.label_smothing=0.2")
    with pytest.raises(ConfigError, match=r"method.label_smoothing: Input should be less than 1"):
        recipe_with("method.objective=sft-smoothed", "method.label_smoothing=1.5")
    with pytest.raises(ConfigError, match=r"method.label_smoothing: a field of method.objective "
                                          r"sft-smoothed, not of sft"):
        recipe_with("method.label_smoothing=0.2")
    assert recipe_with("method.objective=sft-smoothed").method.options.label_smoothing == 0.1


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"method.objective: unknown training method 'ppo' "
                                          r"\(known: sft, dpo, grpo\)"):
        recipe_with("method.objective=ppo")


def test_a_method_takes_only_its_own_data_formats():
    with pytest.raises(ConfigError, match=r"data.format: method.objective sft trains on messages "
                                          r"or prompt_completion or alpaca or text, not preference "
                                          r"\(which dpo trains on\)"):
        recipe_with("data.format=preference")


def test_the_memory_plan_counts_dpos_reference_and_pairs(tiny_base):
    shape = model_shape(model_config(tiny_base))
    sft = recipe_with("optim.micro_batch_size=2", "memory.activation_checkpointing=false")
    full, lora = (recipe_with("optim.micro_batch_size=2", "memory.activation_checkpointing=false",
                              "data.format=preference", "method.objective=dpo", f"method.type={t}")
                  for t in ("full", "lora"))
    sft_plan, full_plan, lora_plan = (plan(shape, r) for r in (sft, full, lora))
    # a frozen copy of the weights under full fine-tuning; none under LoRA (adapters off)
    assert full_plan.terms["reference model"] == sft_plan.terms["parameters"]
    assert "reference model" not in lora_plan.terms
    # two sequences per pair, and a pair's rows are never packed (no block mask)
    assert full_plan.terms["logits"] == 2 * sft_plan.terms["logits"]
    assert full_plan.terms["activations"] > 1.9 * sft_plan.terms["activations"]
