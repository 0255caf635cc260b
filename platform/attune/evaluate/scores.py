"""What `attune eval` computes and records: a registry entry's scores on held-out chats, written
into its manifest (where `attune promote --require` reads them) and its MLflow run.

    record = evaluate("~/.attune/registry/tiny-full", "data/transformer_qa.jsonl")
    record["scores"]  # {"eval_loss": 0.0102, "exact_match": 1.0}

Scores: `eval_loss`, the mean next-token loss over the answers' tokens, counted as training's
evaluation counts it (the recipe's rows, the same labels); `exact_match`, the share of greedy
answers to each chat's first question equal to its first answer; with the entry served,
`<task>.<metric>` of lm-evaluation-harness's tasks run against its endpoint (lm_eval_harness.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from attune.evaluate.greedy_answers import exact_match, greedy_answers, load_for_generation
from attune.evaluate.lm_eval_harness import check_endpoint, harness_scores
from attune.registry import read_manifest, update_manifest
from attune.store import filesystem
from attune.tracking import log_scores
from attune.train.datasets import local_rows
from attune.train.loss import CausalLMLoss
from attune.train.records import files_hash, read_records


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
