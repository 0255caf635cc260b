"""The recipe's data as Ray Datasets: validated on the driver, made into rows by Ray Data.

    prepared = prepare_data(recipe, check_recipe(recipe))
    rows = local_rows(records, "sft", tokenizer_path, None, 512, packing=True)   # without Ray

Every line is read and checked on the driver first (attune.train.preflight), so a bad line fails with
its file:line before any worker starts; the tokenizing runs in Ray Data tasks on the cluster.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import ray.data
import torch

from attune import modeling
from attune.recipe import Recipe
from attune.train import methods
from attune.train.preflight import CheckedRecipe, check_recipe
from attune.train.records import Record, files_hash


@dataclass
class PreparedData:
    train: ray.data.Dataset
    eval: ray.data.Dataset
    rows: int
    eval_rows: int
    files_hash: str
    stats: dict


def prepare_data(recipe: Recipe, checked: CheckedRecipe | None = None) -> PreparedData:
    """Tokenize the recipe's records with Ray Data: those `check_recipe` read, or read (and
    checked line by line) here."""
    checked = checked or check_recipe(recipe)
    d = recipe.data
    train_records, eval_records = checked.train_records, checked.eval_records
    # the base model by name: each task loads the tokenizer on its own node
    tokenize = dict(fn_kwargs=dict(objective=recipe.method.objective,
                                   tokenizer_ref=modeling.node_ref(recipe.model.name_or_path),
                                   chat_template=d.chat_template, max_seq_len=d.max_seq_len,
                                   packing=d.packing),
                    batch_size=4096)
    train_ds = ray.data.from_items(as_items(train_records)).map_batches(tokenize_batch, **tokenize)
    eval_ds = ray.data.from_items(as_items(eval_records)).map_batches(tokenize_batch, **tokenize)
    train_ds, eval_ds = train_ds.materialize(), eval_ds.materialize()
    rows = train_ds.count()
    # A task per block rather than Dataset.sum, whose shuffle actors take seconds to start.
    tokens = sum(row["num_tokens"] for row in train_ds.map_batches(_block_tokens, batch_size=None).take_all())
    stats = {"train_examples": len(train_records), "eval_examples": len(eval_records),
             "train_rows": rows, "train_tokens": int(tokens),
             "fill": tokens / (rows * d.max_seq_len * methods.get(recipe.method.objective).sequences_per_example(recipe))}
    files = d.train_files + d.eval_files
    return PreparedData(train_ds, eval_ds, rows, eval_ds.count(), files_hash(files), stats)


def _block_tokens(batch: dict) -> dict:
    return {"num_tokens": [int(batch["num_tokens"].sum())]}


class Tokenize:
    """Ray Data `map_batches` callable: raw records in, rows of fixed length out."""

    def __init__(self, objective: str, tokenizer_ref: str, chat_template: str | None,
                 max_seq_len: int, packing: bool):
        # the base model as this node has it (modeling.node_ref)
        self.tokenizer = modeling.load_tokenizer(modeling.resolve_on_node(tokenizer_ref),
                                                 chat_template)
        self.max_seq_len = max_seq_len
        self.packing = packing
        self.method = methods.get(objective)

    def __call__(self, batch: dict) -> dict:
        records = [Record(s, json.loads(m) if m else None, t or None, c or None, r or None,
                          json.loads(f) if f else None)
                   for s, m, t, c, r, f in zip(batch["source"], batch["messages"], batch["text"],
                                               batch["chosen"], batch["rejected"], batch["fields"])]
        rows = self.method.rows(records, self.tokenizer, self.max_seq_len, self.packing)
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


@functools.lru_cache(maxsize=4)
def _tokenizer_for(objective: str, tokenizer_ref: str, chat_template: str | None,
                   max_seq_len: int, packing: bool) -> Tokenize:
    return Tokenize(objective, tokenizer_ref, chat_template, max_seq_len, packing)


def tokenize_batch(batch: dict, **tokenize_args) -> dict:
    """`Tokenize` as a Ray Data task: the tokenizer is loaded once per worker process and kept,
    so the train and eval datasets reuse warm workers instead of starting an actor each."""
    return _tokenizer_for(**tokenize_args)(batch)


def as_items(records: list[Record]) -> list[dict]:
    """Records as flat rows for `ray.data.from_items` (Arrow wants one type per column)."""
    return [{"source": r.source, "messages": json.dumps(r.messages) if r.messages else "",
             "text": r.text or "", "chosen": r.chosen or "", "rejected": r.rejected or "",
             "fields": json.dumps(r.fields) if r.fields is not None else ""}
            for r in records]


def local_rows(records: list[Record], objective: str, tokenizer_path: str,
               chat_template: str | None, max_seq_len: int, packing: bool) -> list[dict]:
    """The rows Ray Data would produce, built in this process (for runs without Ray)."""
    items = as_items(records)
    batch = {key: [item[key] for item in items] for key in items[0]}
    out = Tokenize(objective, tokenizer_path, chat_template, max_seq_len, packing)(batch)
    return [{key: out[key][i] for key in out} for i in range(len(out["num_tokens"]))]


def batches(rows: list[dict], batch_size: int, seed: int):
    """Shuffled batches of stacked rows, like Ray Data's `iter_torch_batches`."""
    order = np.random.default_rng(seed).permutation(len(rows))
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        stacked = {key: np.stack([r[key] for r in chunk]) for key in chunk[0]}
        yield {k: torch.as_tensor(v) if v.dtype.kind in "biuf" else v for k, v in stacked.items()}
