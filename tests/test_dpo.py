"""DPO: attune's loss against TRL's on the same batch and model, to 1e-5; DPO moving a model's
answers from the rejected to the chosen ones.

    pytest tests/test_dpo.py

TRL (a test dependency only) computes its loss in `DPOTrainer._compute_loss`, log-probabilities
(its fused LM head) and reference (the adapters switched off) included; it runs here on a stand-in
for the trainer object that holds the settings and metrics that method reads.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from conftest import train
from trl_reference import lora_policy, trl_trainers
from attune import corpus
from attune.evaluate.greedy_answers import greedy_answers, load_for_generation
from attune.train.loss import CausalLMLoss
from attune.train.methods.dpo import DPOLoss, adapters_off, pair_inputs
from attune.train.tokenizing import IGNORE


DPOTrainer, _ = trl_trainers()

PAIRS = [("How many layers does BERT-base have?", "12.", "24."),
         ("Who released BERT-base?", "Google.", "OpenAI, in 2019."),
         ("Which family does GPT-3 belong to?", "Decoder-only.", "Encoder-only.")]


def pair_batch(tokenizer) -> dict:
    """Chosen and rejected rows, right-padded to one length, labels on the answers only."""
    rows = {"chosen": [], "rejected": []}
    for question, *answers in PAIRS:
        prompt = [{"role": "user", "content": question}]
        start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                  return_dict=False))
        for side, answer in zip(rows, answers):
            ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}],
                                                return_dict=False)
            rows[side].append((ids, [IGNORE] * start + ids[start:]))
    length = max(len(ids) for side in rows.values() for ids, _ in side)
    batch = {}
    for side, samples in rows.items():
        fill = [length - len(ids) for ids, _ in samples]
        batch[f"{side}_input_ids"] = torch.tensor(
            [ids + [tokenizer.pad_token_id] * n for (ids, _), n in zip(samples, fill)])
        batch[f"{side}_labels"] = torch.tensor(
            [labels + [IGNORE] * n for (_, labels), n in zip(samples, fill)])
    return batch


def trl_loss(model, batch: dict, beta: float, loss_type: str) -> float:
    """TRL's DPO loss for the batch, through its own `_compute_loss`."""
    inputs = pair_inputs(batch)
    accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m,
                                  gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=model, ref_model=None, accelerator=accelerator, beta=beta, loss_types=[loss_type],
        loss_weights=[1.0], f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False,
        precompute_ref_logps=False, aux_loss_enabled=False, label_smoothing=0.0,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), _tp_size=1,
        _total_train_tokens=0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trl_inputs = {"input_ids": inputs["input_ids"],
                  "attention_mask": (inputs["labels"] != IGNORE) | _not_padding(batch),
                  "completion_mask": (inputs["labels"] != IGNORE).long()}
    return float(DPOTrainer._compute_loss(trainer, model, trl_inputs, return_outputs=False))


def _not_padding(batch: dict) -> torch.Tensor:
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    lengths = torch.cat([_lengths(batch["chosen_labels"]), _lengths(batch["rejected_labels"])])
    return torch.arange(ids.shape[1]).expand_as(ids) < lengths[:, None]


def _lengths(labels: torch.Tensor) -> torch.Tensor:
    # rows end at their last labelled token (the answer's end of turn)
    positions = torch.arange(labels.shape[1]).expand_as(labels)
    return torch.where(labels != IGNORE, positions, -1).max(1).values + 1


@pytest.fixture(scope="module")
def lora_model(tiny_base):
    return lora_policy(tiny_base)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_the_dpo_loss_equals_trls(lora_model, tiny_base, loss_type, chunk_tokens):
    batch = pair_batch(AutoTokenizer.from_pretrained(tiny_base))
    model = CausalLMLoss(lora_model, chunk_tokens)

    def reference(**inputs):
        with adapters_off(model):
            return model(**inputs)

    objective = DPOLoss(beta=0.1, kind=loss_type, reference=reference)
    with torch.no_grad():
        total, sums = objective(model, batch)
        expected = trl_loss(lora_model, batch, 0.1, loss_type)
    pairs = objective.count(batch)
    assert float(total) / pairs == pytest.approx(expected, abs=1e-5)
    assert float(total) / pairs != pytest.approx(0.6931, abs=1e-3)  # not the untrained log 2
    assert 0 <= sums["reward_accuracy"] <= pairs


@pytest.mark.slow
def test_dpo_moves_the_greedy_answers_from_rejected_to_chosen(tiny_full_entry):
    """Ray Train, 2 workers: DPO on the bundled pairs, from the supervised tiny-full entry."""
    pairs = corpus.preference_pairs()[:24]
    questions = [p["prompt"] for p in pairs]

    def answers(entry: str) -> list[str]:
        model, tokenizer = load_for_generation(entry)
        return greedy_answers(model, tokenizer, questions)

    before = answers(tiny_full_entry)
    assert sum(a == p["rejected"] for a, p in zip(before, pairs)) >= 20  # the bare facts
    entry = train("recipes/tiny-dpo.yaml", f"model.name_or_path={tiny_full_entry}")
    after = answers(entry)
    chosen = sum(a == p["chosen"] for a, p in zip(after, pairs))
    rejected = sum(a == p["rejected"] for a, p in zip(after, pairs))
    assert chosen >= len(pairs) // 2 and rejected <= 2, list(zip(questions, after))
