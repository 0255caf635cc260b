"""Score a registry entry on held-out chats, record the scores in its manifest, and gate
promotion on them.

    record = evaluate("~/.attune/registry/tiny-full", "data/transformer_qa.jsonl")
    check_requirements(record["scores"], ["exact_match>=0.9"])

Scores: `eval_loss`, the mean next-token loss over the answers' tokens, counted as training's
evaluation counts it (the recipe's rows, the same labels); `exact_match`, the share of greedy
answers to each chat's first question equal to its first answer; with the entry served,
`<task>.<metric>` of lm-evaluation-harness's tasks run against its endpoint (attune.harness).
"""

from __future__ import annotations

import contextlib
import operator
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from attune.config import ConfigError
from attune.harness import check_endpoint, harness_scores
from attune.registry import read_manifest, update_manifest
from attune.store import filesystem
from attune.tracking import log_scores
from attune.train.datasets import local_rows
from attune.train.records import files_hash, read_records

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
               "==": operator.eq}
REQUIREMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|==|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


@dataclass
class Served:
    """Where the entry is served, for lm-evaluation-harness's tasks."""
    base_url: str  # ends in /v1
    api_key: str
    model: str  # the entry's model id there
    tasks: list[str]


def evaluate(location: str, data_file: str, data_format: str = "messages",
             batch_size: int = 16, served: Served | None = None) -> dict:
    """Score the entry at `location` on `data_file` (and, where it is `served`, with the harness's
    tasks) and write the scores into its manifest as `eval`; returns that record."""
    records = read_records([data_file], data_format)  # a bad line names its file and line
    recipe = read_manifest(location)["recipe"]
    if served:  # before the scoring, not after it
        check_endpoint(served.base_url, served.api_key, served.model)
    with _local_copy(location) as path:
        # torch loads only to score: `attune promote --require` reads the scores without it
        from attune.answers import exact_match, greedy_answers, load_for_generation

        model, tokenizer = load_for_generation(path)
        scores = {"eval_loss": _eval_loss(model, path, records, recipe["data"]["max_seq_len"],
                                          batch_size)}
        pairs = [_first_exchange(r) for r in records if r.messages]
        if pairs:
            expected = [answer for _, answer in pairs]
            longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in expected)
            answers = greedy_answers(model, tokenizer, [q for q, _ in pairs],
                                     max_new_tokens=longest + 8)
            scores["exact_match"] = exact_match(answers, expected)
    if served:
        scores.update(harness_scores(served.base_url, served.api_key, served.model, pairs,
                                     served.tasks))
    record = {"scores": scores, "data": data_file, "data_sha256": files_hash([data_file]),
              "examples": len(records),
              "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    manifest = update_manifest(location, {"eval": record})
    log_scores(manifest, scores)  # as eval/<score>, beside its run's training metrics
    return record


def _eval_loss(model, path: str, records: list, max_seq_len: int, batch_size: int) -> float:
    # torch loads only to score, as above
    import torch

    from attune.train.loss import CausalLMLoss

    rows = local_rows(records, "sft", path, None, max_seq_len, packing=False)
    loss = CausalLMLoss(model)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {key: torch.tensor(np.stack([r[key] for r in rows[start:start + batch_size]]))
                     for key in ("input_ids", "position_ids", "labels")}
            summed, count = loss(**batch)
            total, tokens = total + summed.item(), tokens + int(count)
    return total / max(tokens, 1)


def _first_exchange(record) -> tuple[str, str]:
    user = next(m["content"] for m in record.messages if m["role"] == "user")
    answer = next(m["content"] for m in record.messages if m["role"] == "assistant")
    return user, answer


@contextlib.contextmanager
def _local_copy(location: str):
    """The entry as a local directory: itself, or a temporary copy of one in an object store
    (not modeling's per-node cache: an entry trained again under its name is scored anew)."""
    if "://" not in location:
        yield str(Path(location).expanduser())
        return
    fs, path = filesystem(location)
    with tempfile.TemporaryDirectory(prefix="attune-eval-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs)
        yield tmp


def parse_requirement(text: str) -> tuple[str, str, float]:
    """'exact_match>=0.9' -> ('exact_match', '>=', 0.9)."""
    match = REQUIREMENT.match(text)
    if not match:
        raise ConfigError(f"--require {text!r}: expected SCORE OP NUMBER, e.g. 'exact_match>=0.9' "
                          f"(OP one of {', '.join(COMPARISONS)})")
    name, op, value = match.groups()
    return name, op, float(value)


def check_requirements(manifest: dict, requirements: list[str]) -> None:
    """Raise ConfigError, with the entry's scores, unless every requirement holds."""
    parsed = [parse_requirement(r) for r in requirements]  # every one well-formed before any check
    if not parsed:
        return
    scores = (manifest.get("eval") or {}).get("scores")
    if scores is None:
        raise ConfigError(f"{manifest['name']} has no evaluation scores; run `attune eval` on it "
                          "first")
    failed = []
    for name, op, value in parsed:
        if name not in scores:
            raise ConfigError(f"--require {name}: no such score (the entry has "
                              f"{', '.join(sorted(scores))})")
        if not COMPARISONS[op](scores[name], value):
            failed.append(f"{name} {scores[name]:.4g} (needs {op} {value:g})")
    if failed:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(scores.items()))
        raise ConfigError(f"not promoting {manifest['name']}: {'; '.join(failed)}. Its scores "
                          f"on {manifest['eval']['data']}: {shown}")
