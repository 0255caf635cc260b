"""The recipe's data as Ray Datasets: validated on the driver, tokenized and packed by Ray Data.

    prepared = prepare_data(recipe, check_recipe(recipe))

Every line is read and checked on the driver first (attune.preflight), so a bad line fails with
its file:line before any worker starts; the tokenizing runs in Ray Data tasks on the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray.data

from attune import data, modeling
from attune.preflight import CheckedRecipe, check_recipe
from attune.recipe import Recipe


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
    tokenize = dict(fn_kwargs=dict(tokenizer_ref=modeling.node_ref(recipe.model.name_or_path),
                                   chat_template=d.chat_template, max_seq_len=d.max_seq_len,
                                   packing=d.packing),
                    batch_size=4096)
    train_ds = ray.data.from_items(data.as_items(train_records)).map_batches(data.tokenize_batch, **tokenize)
    eval_ds = ray.data.from_items(data.as_items(eval_records)).map_batches(data.tokenize_batch, **tokenize)
    train_ds, eval_ds = train_ds.materialize(), eval_ds.materialize()
    rows = train_ds.count()
    # A task per block rather than Dataset.sum, whose shuffle actors take seconds to start.
    tokens = sum(row["num_tokens"] for row in train_ds.map_batches(_block_tokens, batch_size=None).take_all())
    stats = {"train_examples": len(train_records), "eval_examples": len(eval_records),
             "train_rows": rows, "train_tokens": int(tokens),
             "fill": tokens / (rows * d.max_seq_len * (2 if d.format == "preference" else 1))}
    files = d.train_files + d.eval_files
    return PreparedData(train_ds, eval_ds, rows, eval_ds.count(), data.files_hash(files), stats)


def _block_tokens(batch: dict) -> dict:
    return {"num_tokens": [int(batch["num_tokens"].sum())]}
