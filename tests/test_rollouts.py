"""Rollouts from a vLLM engine in a Ray actor: what it samples, and that after a weight sync it
generates with the trainer's new weights (its log-probabilities of a fixed completion equal the
trainer's).

    pytest tests/test_rollouts.py
"""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attune.train.loss import CausalLMLoss
from attune.train.rollouts import rollout_engine
from attune.train.tokenizing import IGNORE

pytestmark = pytest.mark.slow
# fp32 on both sides, but vLLM's CPU kernels and transformers' SDPA sum in other orders: per-token
# log-probs agree to about 1e-5; the test allows 1e-3, far below what one training step moves.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_base):
    actor = rollout_engine(tiny_base, max_model_len=128)
    yield actor
    ray.kill(actor)


def trainer_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    ids = torch.tensor([prompt + completion])
    labels = torch.tensor([[IGNORE] * len(prompt) + completion])
    with torch.no_grad():
        losses = CausalLMLoss(model)(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                                     labels=labels, per_token=True)
    return (-losses[0, len(prompt) - 1:]).tolist()


def test_the_engine_samples_groups_with_their_log_probabilities(engine, tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True, return_dict=False)
               for q in ("How many layers does BERT-base have?", "Who released GPT-2?")]
    groups = ray.get(engine.generate.remote(prompts, n=4, temperature=1.0, max_tokens=12, seed=0))
    assert [len(g) for g in groups] == [4, 4]
    for completion in (c for g in groups for c in g):
        assert 1 <= len(completion.token_ids) == len(completion.logprobs) <= 12
        assert all(lp <= 0 for lp in completion.logprobs)
    assert len({tuple(c.token_ids) for c in groups[0]}) > 1  # sampled, not four greedy copies


def test_after_a_sync_the_engine_scores_with_the_trainers_new_weights(engine, tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How many layers does "
                                             "BERT-base have?"}], add_generation_prompt=True,
                                           return_dict=False)
    completion = tokenizer("BERT-base has 12 layers.", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    before = trainer_logprobs(model, prompt, completion)
    assert ray.get(engine.completion_logprobs.remote(prompt, completion)) == pytest.approx(
        before, abs=TOLERANCE)

    # one optimizer step towards the completion, as a training step would take
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([prompt + completion])
    loss, count = CausalLMLoss(model)(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                                      labels=torch.tensor([[IGNORE] * len(prompt) + completion]))
    (loss / count).backward()
    optimizer.step()
    after = trainer_logprobs(model, prompt, completion)
    assert sum(after) > sum(before) + 1  # the step moved the completion's likelihood

    ray.get(engine.load_weights.remote(ray.put(model.state_dict())))
    assert ray.get(engine.completion_logprobs.remote(prompt, completion)) == pytest.approx(
        after, abs=TOLERANCE)
