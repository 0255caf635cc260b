"""Each chat family through the whole path: train, serve with vLLM, chat; answers end where the
template ends a turn (finish_reason "stop", not "length").

    pytest tests/test_families.py

Per family (attune:tiny-qwen2, attune:tiny-llama3) a short full fine-tune, then a LoRA fine-tune
on top of it, so that one engine serves both: the full entry as the base model, the adapter on it.
A recipe's own ChatML template on attune:tiny-llama, whose tokenizer has no <|im_end|>, is the
third model. One app, one Ray session.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI
from ray import serve

from attune import chat_templates
from attune.evaluate.greedy_answers import greedy_answers, load_for_generation, qa_pairs
from attune.modeling import load_tokenizer
from attune.recipe import load_recipe
from attune.serve import ServeConfig
from attune.serve.local import run
from attune.train.tokenizing import IGNORE, tokenize_chat
from attune.train.trainer import fine_tune
from conftest import API_KEY, REPO

pytestmark = pytest.mark.slow

FULL_STEPS, LORA_STEPS = 150, 20
QUESTIONS = [q for q, _ in qa_pairs()[::29]]  # 8 of them


def short(recipe: str, steps: int, *overrides: str, chat_template: str | None = None) -> str:
    recipe = load_recipe(REPO / "recipes" / recipe,
                         [f"optim.max_steps={steps}", f"checkpoint.every_steps={steps}",
                          f"eval.every_steps={steps}", *overrides])
    if chat_template:  # as `data: {chat_template: ...}` in a recipe
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
            update={"chat_template": chat_template})})
    return fine_tune(recipe)


@pytest.fixture(scope="module")
def families(ray_cluster, serve_port, object_store):
    """model id -> registry entry, all served by one app."""
    entries = {}
    for family in ("qwen2", "llama3"):
        full = short(f"tiny-{family}-full.yaml", FULL_STEPS)
        lora = short(f"tiny-{family}-lora.yaml", LORA_STEPS, f"model.name_or_path={full}")
        entries[f"{family}-full"], entries[f"{family}-full:tiny-{family}-lora"] = full, lora
    entries["chatml-llama"] = short("tiny-full.yaml", FULL_STEPS, "name=tiny-llama-chatml",
                                    chat_template=chat_templates.CHATML)
    config = ServeConfig(
        base_models=[{"id": model, "name_or_path": entry} for model, entry in entries.items()
                     if ":" not in model],
        entries=[entry for model, entry in entries.items() if ":" in model],
        lora_store=f"{object_store}/family-adapters")
    endpoint = run(config, port=serve_port, name="families")
    client = OpenAI(base_url=endpoint.base_url, api_key=API_KEY, max_retries=0)
    yield client, entries
    serve.delete("families")


def chat(client: OpenAI, model: str, question: str):
    return client.chat.completions.create(model=model, temperature=0, max_tokens=48,
                                          messages=[{"role": "user", "content": question}])


def test_every_family_answers_and_stops_where_its_template_ends_a_turn(families):
    client, entries = families
    for model, entry in entries.items():
        tokenizer = load_tokenizer(entry if ":" not in model else entries[model.split(":")[0]])
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda q: chat(client, model, q), QUESTIONS))
        assert [r.choices[0].finish_reason for r in replies] == ["stop"] * len(QUESTIONS), model
        assert all(r.choices[0].message.content.strip() for r in replies), model
        assert not any(chat_templates.end_of_turn(tokenizer) in r.choices[0].message.content
                       for r in replies), model
        # the prompt vLLM built is the one training put before an answer, token for token
        for question, reply in zip(QUESTIONS, replies):
            ids, labels = tokenize_chat([{"role": "user", "content": question},
                                               {"role": "assistant", "content": "x"}], tokenizer)
            prompt = next(i for i, label in enumerate(labels) if label != IGNORE)
            assert reply.usage.prompt_tokens == prompt, (model, question)


def test_each_familys_lora_adapter_answers_as_its_merged_model(families):
    client, entries = families
    for model, entry in entries.items():
        if ":" not in model:
            continue
        served = [chat(client, model, q).choices[0].message.content.strip() for q in QUESTIONS]
        merged, tokenizer = load_for_generation(entry)  # peft's merge_and_unload, in torch
        assert served == greedy_answers(merged, tokenizer, QUESTIONS, max_new_tokens=48), model
