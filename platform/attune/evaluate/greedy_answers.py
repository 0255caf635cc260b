"""Greedy answers of a model to the bundled questions, with plain transformers, and their exact
match.

    python -m attune.evaluate.greedy_answers ~/.attune/registry/tiny-full   # on the training set

Used by `make demo` (base vs fine-tuned side by side) and by the tests of what a model learned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from attune.modeling import load_tokenizer, resolve
from attune.registry import MANIFEST, check_local_model


def load_for_generation(location: str):
    """A registry entry (full or LoRA, merged) or a base model directory, with its tokenizer."""
    check_local_model(location)
    path = Path(location).expanduser()
    tokenizer = load_tokenizer(str(path))
    if (path / "adapter_config.json").exists():
        base = _base_model(path)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(path))
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    return model.eval(), tokenizer


def _base_model(adapter: Path) -> str:
    """The adapter's base model on this machine: the entry's manifest names it, and the name is
    resolved here (the adapter config holds the path it had where it was trained)."""
    if (adapter / MANIFEST).exists():
        return resolve(json.loads((adapter / MANIFEST).read_text())["base_model"])
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 24,
                   batch_size: int = 64) -> list[str]:
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True)
                   for q in questions[start:start + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def qa_pairs(path: str = "data/transformer_qa.jsonl") -> list[tuple[str, str]]:
    """(first user message, first assistant message) of each chat in a `messages` JSONL file."""
    pairs = []
    for line in Path(path).read_text().splitlines():
        messages = json.loads(line)["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        assistant = next(m["content"] for m in messages if m["role"] == "assistant")
        pairs.append((user, assistant))
    return pairs


def exact_match(answers: list[str], expected: list[str]) -> float:
    return sum(a == e.strip() for a, e in zip(answers, expected)) / len(expected)


if __name__ == "__main__":
    model, tokenizer = load_for_generation(sys.argv[1])
    pairs = qa_pairs(sys.argv[2] if len(sys.argv) > 2 else "data/transformer_qa.jsonl")
    got = greedy_answers(model, tokenizer, [q for q, _ in pairs])
    print(f"exact match: {exact_match(got, [a for _, a in pairs]):.1%} of {len(pairs)}")
