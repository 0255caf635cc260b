"""attune generate: the session's tiny entries answer the bundled questions through Ray Data,
with vLLM engines and with the session's endpoint as the engine; greedy answers equal the
endpoint's, a dead run resumes without asking again, bad lines are named, rewards make pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI
from running import REPO

from attune.cli import main
from attune.generate import GenerateConfig, generate
from attune.generate.inputs import read_prompts
from attune.train.records import DataError, read_records

QUESTIONS = REPO / "data" / "transformer_qa.jsonl"
MAX_TOKENS = 24


def shortest(prompt: str, completion: str, **fields) -> float:
    """A reward for the pairs test: the shorter answer is the better one."""
    return -float(len(completion))


def questions(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(QUESTIONS.read_text().splitlines(keepends=True)[:n]))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def endpoint_answers(endpoint, model: str, data: Path) -> list[dict]:
    client = OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0)
    answers = []
    for row in lines(data):
        r = client.chat.completions.create(model=model, messages=row["messages"][:-1],
                                           temperature=0, max_tokens=MAX_TOKENS)
        answers.append({"completion": r.choices[0].message.content,
                        "finish_reason": r.choices[0].finish_reason,
                        "prompt_tokens": r.usage.prompt_tokens,
                        "completion_tokens": r.usage.completion_tokens})
    return answers


def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What is BERT?"}\n\n{"prompt": "Unclosed\n'
                    '{"messages": [{"role": "robot", "content": "x"}]}\n{"text": "no prompt"}\n')
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "some-entry", "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"attune: {data}:3: not valid JSON (Invalid control " \
                                      "character at at column 21)\n"
    assert not out.exists()
    rows, bad = read_prompts(str(data), skip_bad_lines=True)
    assert [r["id"] for r in rows] == ["1"]
    assert [b.split(": ", 1)[0] for b in bad] == [f"{data}:3", f"{data}:4", f"{data}:5"]
    assert "needs 'messages' (a chat) or 'prompt'" in bad[2]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["tiny_full_entry", "tiny_lora_entry"])
def test_greedy_answers_equal_the_endpoints(served_endpoint, entry, request, tmp_path):
    """One engine each: the full fine-tune's weights; the base model with the adapter on it."""
    data = questions(tmp_path, 8)
    out = tmp_path / "answers.jsonl"
    summary = generate(GenerateConfig(entry=request.getfixturevalue(entry), data=str(data),
                                      out=str(out), max_tokens=MAX_TOKENS))
    assert (summary.answered, summary.resumed) == (8, 0)
    written = sorted(lines(out), key=lambda row: int(row["id"]))
    for row, source in zip(written, lines(data)):  # the input line's fields, kept
        assert row["messages"] == source["messages"]
    model = {"tiny_full_entry": served_endpoint.finetuned_model_id,
             "tiny_lora_entry": served_endpoint.lora_model_id}[entry]
    expected = endpoint_answers(served_endpoint, model, data)
    assert [{k: row[k] for k in expected[0]} for row in written] == expected
    assert summary.completion_tokens == sum(a["completion_tokens"] for a in expected)


@pytest.mark.slow
def test_the_endpoint_engine_resumes_a_dead_run_without_asking_again(served_endpoint, tmp_path):
    data = questions(tmp_path, 6)
    out = tmp_path / "answers.jsonl"
    config = GenerateConfig(entry="tiny-full", data=str(data), out=str(out), max_tokens=MAX_TOKENS,
                            endpoint=served_endpoint.base_url, api_key=served_endpoint.api_key,
                            model=served_endpoint.finetuned_model_id)
    generate(config)
    first = sorted(lines(out), key=lambda row: int(row["id"]))
    # a run that died after three answers, half way through writing the fourth
    kept = [dict(row, completion=f"kept {row['id']}") for row in first[:3]]
    out.write_text("".join(json.dumps(row) + "\n" for row in kept) + json.dumps(first[3])[:20])
    summary = generate(config)
    assert (summary.answered, summary.resumed) == (3, 3)
    again = sorted(lines(out), key=lambda row: int(row["id"]))
    assert again[:3] == kept  # not asked again
    assert again[3:] == first[3:]
    assert [a["completion"] for a in endpoint_answers(
        served_endpoint, served_endpoint.finetuned_model_id, data)][3:] == \
        [row["completion"] for row in again[3:]]


@pytest.mark.slow
def test_rewards_turn_samples_into_preference_pairs(served_endpoint, tmp_path):
    data = questions(tmp_path, 4)
    out, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    summary = generate(GenerateConfig(
        entry="tiny-full", data=str(data), out=str(out), pairs=str(pairs), samples=4,
        temperature=1.5, max_tokens=MAX_TOKENS, endpoint=served_endpoint.base_url,
        api_key=served_endpoint.api_key, model=served_endpoint.finetuned_model_id,
        rewards=[{"function": "test_generate:shortest"}]))
    samples = lines(out)
    assert summary.answered == len(samples) == 16
    by_id = {}
    for row in samples:
        by_id.setdefault(row["id"], []).append(row["completion"])
    records = read_records([str(pairs)], "preference")  # what DPO reads
    written = lines(pairs)
    untied = [key for key, answers in by_id.items() if len({len(a) for a in answers}) > 1]
    assert summary.pairs == len(records) == len(untied) > 0
    for pair in written:
        answers = by_id[pair["id"]]
        assert pair["chosen"] == min(answers, key=len) or len(pair["chosen"]) == min(map(len, answers))
        assert len(pair["rejected"]) == max(map(len, answers))


def test_bad_settings_are_one_line_errors(capsys):
    args = ["generate", "some-entry", "--data", str(QUESTIONS), "--out", "unused.jsonl"]
    assert main([*args, "--samples", "0"]) == 2
    assert capsys.readouterr().err == "attune: attune generate: samples: Input should be greater " \
                                      "than or equal to 1 (got 0)\n"
    assert main([*args, "--samples", "1", "--reward", "contains_answer", "--pairs", "p.jsonl"]) == 2
    assert capsys.readouterr().err == "attune: --reward needs --samples 2 or more: a pair is two " \
                                      "answers\n"
    assert main([*args, "--engine", "endpoint"]) == 2
    assert "expected 'vllm' or 'endpoint URL'" in capsys.readouterr().err
