"""The data pipeline: formats, loss masks, packing, and bad lines reported with file:line."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from attune import corpus
from attune.train.datasets import Tokenize, as_items
from attune.train.loss import CausalLMLoss
from attune.train.methods.dpo import tokenize_pair
from attune.train.methods.sft import NextTokenLoss
from attune.train.records import DataError, read_records, split_eval
from attune.train.rows import pack, pad
from attune.train.tokenizing import IGNORE, tokenize


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from attune.modeling import load_tokenizer

    return load_tokenizer(tiny_base)


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bundled_datasets_are_what_the_generator_writes(tmp_path):
    for name, lines in [("transformer_qa.jsonl", corpus.examples()),
                        ("transformer_qa_preferences.jsonl", corpus.preference_pairs()),
                        ("transformer_qa_prompts.jsonl", corpus.prompts())]:
        regenerated = corpus.write(tmp_path / name, lines).read_bytes()
        assert Path("data", name).read_bytes() == regenerated
    assert len(corpus.examples()) >= 200


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q?", "chosen": "A.", "rejected": ""}, "needs 'rejected': a non-empty string"),
    ({"prompt": "Q?", "rejected": "B."}, "needs 'chosen'"),
    ({"messages": [{"role": "robot", "content": "Q?"}], "chosen": "A.", "rejected": "B."},
     "messages[0] needs a role"),
])
def test_a_bad_preference_line_names_its_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path, [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}, row])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{re.escape(message)}"):
        read_records([path], "preference")


def test_a_prompts_line_keeps_its_other_fields_for_the_rewards(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "How many layers does BERT-base have?", "answer": "12", "level": 1},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Who released GPT-2?"}], "answer": "OpenAI"}])
    first, second = read_records([path], "prompts")
    assert first.messages == [{"role": "user", "content": "How many layers does BERT-base have?"}]
    assert first.fields == {"answer": "12", "level": 1} and second.fields == {"answer": "OpenAI"}
    assert [m["role"] for m in second.messages] == ["system", "user"]


@pytest.mark.parametrize("row, message", [
    ({"answer": "12"}, "needs a non-empty string 'prompt'"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
     "ends with the turn to answer"),
])
def test_a_bad_prompts_line_names_its_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path, [{"prompt": "Q?"}, row])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{re.escape(message)}"):
        read_records([path], "prompts")


def test_a_preference_pair_is_labelled_on_its_answers_only(tiny_base):
    from attune.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)
    (record,) = read_records(["data/transformer_qa_preferences.jsonl"], "preference")[1:2]
    rows = Tokenize("dpo", tiny_base, None, 64, packing=False)(
        {key: [value] for key, value in as_items([record])[0].items()})
    assert {key: value.shape for key, value in rows.items()} == {
        "num_tokens": (1,), "chosen_input_ids": (1, 64), "chosen_labels": (1, 64),
        "rejected_input_ids": (1, 64), "rejected_labels": (1, 64)}
    sides = tokenize_pair(record, tokenizer, 64)["sides"]
    for side in ("chosen", "rejected"):
        ids, labels = sides[side]
        answer = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
        assert answer == getattr(record, side) + tokenizer.eos_token


@pytest.mark.parametrize("fmt, row", [
    ("messages", {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}),
    ("prompt_completion", {"prompt": "Q?", "completion": "A."}),
    ("alpaca", {"instruction": "Q?", "input": "", "output": "A."}),
])
def test_chat_formats_train_only_on_the_assistant_answer(tmp_path, tokenizer, fmt, row):
    (record,) = read_records([write_jsonl(tmp_path, [row])], fmt)
    sample = tokenize(record, tokenizer, 128)
    trained = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "A." + tokenizer.eos_token
    assert "Q?" in tokenizer.decode(sample["input_ids"])


def test_alpaca_input_joins_the_instruction(tmp_path):
    (record,) = read_records([write_jsonl(tmp_path, [{"instruction": "Sum", "input": "1 2", "output": "3"}])], "alpaca")
    assert record.messages[0]["content"] == "Sum\n\n1 2"


def test_text_format_trains_on_every_token(tmp_path, tokenizer):
    (record,) = read_records([write_jsonl(tmp_path, [{"text": "attention is all"}])], "text")
    sample = tokenize(record, tokenizer, 128)
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("line, fmt, message", [
    ('{"messages": [', "messages", "not valid JSON"),
    ('[1, 2]', "messages", "expected a JSON object"),
    ('{"messages": []}', "messages", "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "messages", "needs a role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "messages", "no assistant message"),
    ('{"prompt": "x"}', "prompt_completion", "needs a non-empty string 'completion'"),
    ('{"txt": "x"}', "text", "needs a non-empty string 'text'"),
])
def test_a_bad_line_is_reported_with_file_and_line(tmp_path, line, fmt, message):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "prompt": "q", "completion": "a", "text": "t"}
    path = write_jsonl(tmp_path, [good, "", line])
    with pytest.raises(DataError) as e:
        read_records([path], fmt)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_packing_keeps_samples_apart(tiny_base, tokenizer):
    """Per-sample losses from one packed row equal each sample's loss alone (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    records = read_records(["data/transformer_qa.jsonl"], "messages")[:12]
    samples = [tokenize(r, tokenizer, 256) for r in records]
    (packed,) = pack(samples, 256, tokenizer.pad_token_id)

    def batch(rows):
        return {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}

    with torch.no_grad():
        logits = model(input_ids=batch([packed])["input_ids"],
                       position_ids=batch([packed])["position_ids"], use_cache=False).logits[0]
        with_loss = CausalLMLoss(model)
        alone = [NextTokenLoss()(with_loss, batch(pad([s], 256, tokenizer.pad_token_id)))[0]
                 for s in sorted(samples, key=lambda s: len(s["input_ids"]), reverse=True)]
    labels = torch.as_tensor(packed["labels"])
    per_token = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE,
                                                  reduction="none")
    starts = np.flatnonzero(packed["position_ids"] == 0)[: len(samples)]
    ends = list(starts[1:]) + [int(packed["num_tokens"])]
    packed_losses = [per_token[s:e - 1].sum() if e - 1 > s else per_token[s:e].sum()
                     for s, e in zip(starts, ends)]
    diff = max(abs(float(p) - float(a)) for p, a in zip(packed_losses, alone))
    assert diff < 1e-4


@pytest.mark.parametrize("seq", [256, 512, 1024])
def test_packing_uses_the_fewest_rows_and_drops_nothing(tokenizer, seq):
    records = read_records(["data/transformer_qa.jsonl"], "messages")
    samples = [tokenize(r, tokenizer, seq) for r in records]
    rows = pack(samples, seq, tokenizer.pad_token_id)
    total = sum(len(s["input_ids"]) for s in samples)
    assert sum(int(r["num_tokens"]) for r in rows) == total
    assert len(rows) <= -(-total // seq) + 1  # at most one row above the ceil(total / seq) bound


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    records = read_records(["data/transformer_qa.jsonl"], "messages")
    train, held = split_eval(records, 0.1, seed=3)
    assert len(held) == int(len(records) * 0.1) and len(train) + len(held) == len(records)
    assert not {r.source for r in train} & {r.source for r in held}
    assert [r.source for r in split_eval(records, 0.1, seed=3)[1]] == [r.source for r in held]
