"""Training benchmark: Ray Train's overhead over the plain loop, and packing efficiency.

    .venv/bin/python bench/train.py [--rounds 4]          (or: make bench-train)

1. Tokens/s of the same loop, model, data and 60 steps, run (a) plain in this process and (b) in
   one Ray Train worker fed by Ray Data, in pairs whose order alternates (a b, b a, a b, ...) so
   that drift on a shared machine hits both sides. The same work on both: 2 torch threads, the
   same rows, evaluation at steps 30 and 60 and a checkpoint at step 60 (both outside the
   measured window); only (b) hands its reports to Ray Train (and MLflow, as `attune train`
   does). The figure is the median over the pairs of b / a, with the lowest and highest; each
   side's tokens/s are those of steps 31-60 (steady state: steps 1-30 hold start-up, e.g. Ray
   Data's first fetch). Ray starts before the first pair, so both sides run beside its idle
   daemons (the embedded cluster `attune train` starts): the figure is what Ray Train adds.
2. Packing efficiency on the bundled data: non-pad tokens / row capacity, packed vs one sample
   per row padded to the longest in its micro-batch.
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from attune import modeling  # noqa: E402
from attune.cluster import ensure_ray  # noqa: E402
from attune.recipe import load_recipe  # noqa: E402
from attune.train import datasets  # noqa: E402
from attune.train.datasets import local_rows  # noqa: E402
from attune.train.loop import Loop, train_loop  # noqa: E402
from attune.train.preflight import check_recipe  # noqa: E402
from attune.train.records import read_records  # noqa: E402
from attune.train.rows import pack  # noqa: E402
from attune.train.tokenizing import tokenize  # noqa: E402

THREADS = 2
STEPS = 60
OVERRIDES = [f"optim.max_steps={STEPS}", "optim.micro_batch_size=4", "optim.warmup_steps=5",
             "scaling.num_workers=1", f"scaling.cpus_per_worker={THREADS}",
             # two measuring windows; the figure is the second
             f"eval.every_steps={STEPS // 2}", f"eval.log_every_steps={STEPS // 2}",
             f"checkpoint.every_steps={STEPS}", "data.eval_files=[]"]


def plain_tokens_per_s(recipe) -> float:
    """The loop in this process, with what a Ray Train worker gets: rows, eval rows, a checkpoint."""
    torch.set_num_threads(THREADS)
    checked = check_recipe(recipe)
    d = recipe.data
    rows, eval_rows = (local_rows(records, recipe.method.objective, checked.base_path, d.chat_template,
                                  d.max_seq_len, d.packing)
                       for records in (checked.train_records, checked.eval_records))
    micro = recipe.optim.micro_batch_size
    with tempfile.TemporaryDirectory(prefix="attune-bench-ckpt-") as checkpoints:
        metrics = train_loop(recipe, checked.base_path, Loop(
            train_batches=lambda epoch: datasets.batches(rows, micro, seed=recipe.optim.seed + epoch),
            eval_batches=lambda: datasets.batches(eval_rows, micro, seed=0),
            steps_per_epoch=math.ceil(len(rows) / micro), checkpoint_root=checkpoints))
    return metrics["tokens_per_s"]


def ray_tokens_per_s(recipe) -> float:
    from attune.train.trainer import fine_tune

    entry = fine_tune(recipe)
    return json.loads((Path(entry) / "attune.json").read_text())["final_metrics"]["tokens_per_s"]


def packing_efficiency(recipe, base: str) -> dict:
    tokenizer = modeling.load_tokenizer(base)
    records = read_records(recipe.data.train_files, recipe.data.format)
    lengths = [len(tokenize(r, tokenizer, 512)["input_ids"]) for r in records]
    out = {}
    for seq in (256, 512, 1024):
        samples = [{"input_ids": [0] * n, "labels": [0] * n} for n in lengths]
        rows = pack(samples, seq, pad_id=0)
        out[f"packed_{seq}"] = sum(lengths) / (len(rows) * seq)
    micro = recipe.optim.micro_batch_size
    order = np.random.default_rng(0).permutation(len(lengths))
    batches = [[lengths[i] for i in order[s:s + micro]] for s in range(0, len(order), micro)]
    out["padded_to_longest_in_batch"] = sum(lengths) / sum(max(b) * len(b) for b in batches)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4, help="pairs of plain and Ray runs")
    args = parser.parse_args()
    os.environ.setdefault("ATTUNE_HOME", "/tmp/attune-bench")
    ensure_ray()
    sides = {"plain": plain_tokens_per_s, "ray_train": ray_tokens_per_s}
    runs = {side: [] for side in sides}
    load = []
    for i in range(args.rounds):
        for side in (["plain", "ray_train"] if i % 2 == 0 else ["ray_train", "plain"]):
            recipe = load_recipe("recipes/tiny-full.yaml", [f"name=bench-{i}-{time.time_ns()}", *OVERRIDES])
            runs[side].append(sides[side](recipe))
        load.append(os.getloadavg()[0])
    ratios = [r / p for p, r in zip(runs["plain"], runs["ray_train"])]
    step_ms = 1000 * recipe.optim.micro_batch_size * recipe.data.max_seq_len / statistics.median(runs["plain"])
    result = {
        "steps": STEPS, "threads": THREADS, "rounds": args.rounds, "approx_step_ms": step_ms,
        "plain_tokens_per_s": runs["plain"], "ray_train_tokens_per_s": runs["ray_train"],
        "ratios": ratios,
        "ratio_ray_over_plain": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "load_average_1min_after_each_round": load,
        "packing": packing_efficiency(recipe, modeling.resolve(recipe.model.name_or_path)),
    }
    out = Path("bench/results/train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
